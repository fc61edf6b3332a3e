"""How fast does a tiny model learn to copy from its context? Synthetic probes, one format a run.

The agent must copy from its context (values into notes and answers, ids into
``delete_ids``, names into queries). This probe measures, on the CPU, how many optimizer
steps a freshly initialised model needs for each kind of copying, on episodes of the task's
own single-token words. The warm-up's formats (``mqar``, ``mqar_all``, ``idlist``,
``idlist_mqar``; ``memact.warmup.copy``) and four diagnostics of this probe:

* ``repeat``: n/2 to n random single-token words (entity names, values, record ids), then
  the same again. Solvable by *positional* copying (attend a fixed distance back).
* ``fact``: n facts "The {attribute} of {entity} is {value}." over a few entities and
  attributes, then the facts again in shuffled order: the value is fixed only by the
  (attribute, entity) pair, the recall the task needs, in its own words.
* ``mixed``: ``fact`` and ``mqar`` episodes, half each.
* ``mqar_vocab``: ``mqar`` with keys and values from the whole vocabulary, BPE pieces included.

Rows of ``--seq`` tokens pack whole episodes. Loss is next-token cross-entropy on every
token; accuracy and NLL are measured on the target tokens of a fixed evaluation batch.
``--pre-steps`` trains on ``repeat`` first, ``--mix`` mixes repeat episodes (24 words) in.
``--arch`` swaps the Qwen3 block for Llama or GPT-2 of the same width and depth. Results:
docs/pretrain.md, "Second round".

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/recall_probe.py --tokenizer runs/tiny \\
        --format repeat --n 24 --batch 4 --seq 128 --steps 1000 --lr 1e-3

Chance: ln 320 = 5.77 nats for a name, ln 96 = 4.56 for a value, ln 12 = 2.48 for a value
of a known attribute.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

from memact.warmup.copy import FORMATS, KIND_NAMES, Episode, episode, make_batch, recall_pairs, world_words

PROBES = ("repeat", "fact", "mixed", "mqar_vocab")


def probe_episode(fmt: str, n: int, rng: random.Random, tok, vocab: int = 0) -> Episode:
    """One episode of a warm-up format or of a probe diagnostic (``PROBES``)."""
    from memact.env.task import ATTRIBUTES, NAME_POOL, fact_sentence

    if fmt in FORMATS:
        return episode(fmt, n, rng, tok)
    if fmt == "mixed":
        fmt = rng.choice(["fact", "mqar"])
        if fmt == "mqar":
            return episode(fmt, n, rng, tok)
    if fmt == "repeat":
        words = world_words()
        if vocab:
            words = random.Random(0).sample(words, vocab)
        k = rng.randint(max(1, n // 2), n)
        seq = [tok.convert_tokens_to_ids(w) for w in rng.sample(words, k)]
        return seq + seq, [0] * k + [1] * k
    if fmt == "mqar_vocab":
        special = set(tok.all_special_ids)
        picked = rng.sample([i for i in range(len(tok)) if i not in special], 2 * n)
        return recall_pairs(picked[:n], picked[n:], rng)
    if fmt != "fact":
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS + PROBES)}")

    def enc(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    attrs = list(ATTRIBUTES)
    side = max(2, (n + 1) // 2)
    pairs = rng.sample([(e, a) for e in rng.sample(NAME_POOL, side) for a in rng.sample(attrs, side)], n)
    facts = [(e, a, rng.choice(ATTRIBUTES[a])) for e, a in pairs]
    ids = [t for f in facts for t in enc(" " + fact_sentence(*f))] + enc("\n")
    tgt = [0] * len(ids)
    for e, a, v in rng.sample(facts, n):
        head = enc(f" The {a} of {e} is ")
        ids += head + [tok.convert_tokens_to_ids(v)] + enc(".")
        tgt += [0] * len(head) + [1, 0]
    return ids, tgt


def batch(fmt: str, n: int, rng: random.Random, tok, rows: int, seq: int, mix: float = 0.0, vocab: int = 0):
    """:func:`memact.warmup.copy.make_batch` of probe episodes, a share ``mix`` of them ``repeat``."""
    def make(r: random.Random) -> Episode:
        f = "repeat" if r.random() < mix else fmt
        return probe_episode(f, 24 if f == "repeat" and fmt != "repeat" else n, r, tok, vocab)

    return make_batch(fmt, n, rng, tok, rows, seq, make=make)


def build(arch: str, preset: str, vocab: int, tok, seed: int):
    import torch

    from memact.models.model import PRESETS, build_model

    p = PRESETS[preset]
    torch.manual_seed(seed)
    if arch == "qwen3":
        return build_model(preset, vocab_size=vocab, seed=seed, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=p.hidden_size, num_hidden_layers=p.num_layers,
            num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
            intermediate_size=p.intermediate_size, tie_word_embeddings=True))
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=p.hidden_size, n_layer=p.num_layers,
                                          n_head=p.num_heads, n_positions=1024))
    raise ValueError(f"--arch must be qwen3, llama or gpt2, got {arch!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a `memact new-model` directory")
    ap.add_argument("--format", default="fact", choices=list(FORMATS + PROBES), help="see above")
    ap.add_argument("--n", type=int, default=4, help="names / pairs / facts per episode")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW lr (warm-up, cosine to 10%%)")
    ap.add_argument("--batch", type=int, default=4, help="rows per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row")
    ap.add_argument("--arch", default="qwen3", choices=["qwen3", "llama", "gpt2"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--pre-steps", type=int, default=0, help="steps of `repeat` before --format")
    ap.add_argument("--mix", type=float, default=0.0, help="share of repeat episodes mixed in")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", help="start from this model directory instead of a fresh model")
    ap.add_argument("--vocab", type=int, default=0, help="repeat: only this many distinct words (0: all)")
    ap.add_argument("--target-weight", type=float, default=1.0,
                    help="loss weight of the target tokens (the other tokens weigh 1; 0 with --targets-only)")
    ap.add_argument("--targets-only", action="store_true", help="train on the target tokens only")
    ap.add_argument("--save", help="write the trained model and the tokenizer here (a warm start for `memact sft`)")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.init:
        from memact.models.model import load_policy

        model, _ = load_policy(args.init)
        model.train()
    else:
        model = build(args.arch, args.preset, len(tok), tok, args.seed)
    print(f"{args.arch} {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, min(100, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    ex, em, et = batch(args.format, args.n, random.Random(12345), tok, 32, args.seq, vocab=args.vocab)
    rng = random.Random(args.seed)

    def evaluate() -> tuple[float, float, dict[str, float]]:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ex, attention_mask=em).logits[:, :-1]
        model.train()
        t, kind = ex[:, 1:], et[:, 1:]
        sel = kind > 0
        hit = logits.argmax(-1) == t
        per_kind = {KIND_NAMES[k]: round(hit[kind == k].float().mean().item(), 3)
                    for k in sorted(set(kind[sel].tolist()))}
        return hit[sel].float().mean().item(), F.cross_entropy(logits[sel], t[sel]).item(), per_kind

    t0, tokens, losses = time.time(), 0, []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            acc, nll, per_kind = evaluate()
            print(json.dumps({"step": step, "tokens": tokens, "recall_acc": round(acc, 3), "recall_nll": round(nll, 3),
                              **({f"acc_{k}": v for k, v in per_kind.items()} if len(per_kind) > 1 else {}),
                              "loss": round(sum(losses) / max(1, len(losses)), 3), "s": round(time.time() - t0, 1)}),
                  flush=True)
            losses = []
        if step == args.steps:
            break
        fmt = "repeat" if step < args.pre_steps else args.format
        x, m, tk = batch(fmt, args.n, rng, tok, args.batch, args.seq, args.mix if step >= args.pre_steps else 0.0,
                        args.vocab)
        logits = model(input_ids=x, attention_mask=m).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="none")
        w = m[:, 1:].reshape(-1).float()
        if args.targets_only:
            w = w * (tk[:, 1:].reshape(-1) > 0)
        elif args.target_weight != 1.0:
            w = w * torch.where(tk[:, 1:].reshape(-1) > 0, args.target_weight, 1.0)
        loss = (ce * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        tokens += int(m.sum())
        losses.append(loss.item())
    if args.save:
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)
        print(f"saved -> {args.save}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
