"""How fast does a tiny model learn to copy from its context? Three synthetic probes.

The agent must copy from its context (values into notes and answers, ids into
``delete_ids``, names into queries). This probe measures, on the CPU, how many optimizer
steps a freshly initialised model needs for each kind of copying, on episodes of the task's
own single-token words (entity names, attribute values):

* ``repeat``: n/2 to n random single-token words (entity names, values, record ids), then
  the same again. Solvable by *positional* copying (attend a fixed distance back); it
  teaches a copy circuit that works for every such token, rare ones included.
* ``mqar``: n (name, value) pairs, then the names again in shuffled order, each followed by
  its value (multi-query associative recall). Needs *content-based* lookup (an induction
  circuit: find the earlier occurrence of this name, copy what followed it).
* ``mqar_all``: ``mqar`` with keys and values drawn from every single-token word (names,
  values, record ids), so the copy works for the names and ids the agent must copy too.
* ``mixed``: ``fact`` and ``mqar`` episodes, half each.
* ``fact``: n facts "The {attribute} of {entity} is {value}." over a few entities and
  attributes, then the facts again in shuffled order: the value is fixed only by the
  (attribute, entity) pair, the recall the task needs, in its own words.

Rows of ``--seq`` tokens pack whole episodes. Loss is next-token cross-entropy on every
token; accuracy and NLL are measured on the recalled tokens (second half) of a fixed
evaluation batch. ``--pre-steps`` trains on ``repeat`` first, ``--mix`` mixes repeat
episodes in. ``--arch`` swaps the Qwen3 block (with q/k RMSNorm) for Llama or GPT-2 of the
same width and depth.

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


def episode(fmt: str, n: int, rng: random.Random, tok, vocab: int = 0) -> tuple[list[int], list[int]]:
    """(token ids, 1 where the token is a recall target) for one episode; ``vocab`` limits repeat's words."""
    from memact.env.task import ATTRIBUTES, NAME_POOL, fact_sentence

    attrs = list(ATTRIBUTES)
    tid = tok.convert_tokens_to_ids
    if fmt == "repeat":
        from memact.env.memory import ID_POOL

        words = NAME_POOL + [v for vs in ATTRIBUTES.values() for v in vs] + list(ID_POOL)
        if vocab:
            words = random.Random(0).sample(words, vocab)
        k = rng.randint(max(1, n // 2), n)
        seq = [tid(w) for w in rng.sample(words, k)]
        return seq + seq, [0] * k + [1] * k
    if fmt in ("mqar", "mqar_all"):
        if fmt == "mqar":
            keys = rng.sample(NAME_POOL, n)
            vals = [rng.choice(ATTRIBUTES[rng.choice(attrs)]) for _ in keys]
        else:  # keys and values from every single-token word: names, values and record ids
            from memact.env.memory import ID_POOL

            words = rng.sample(NAME_POOL + [v for vs in ATTRIBUTES.values() for v in vs] + list(ID_POOL), 2 * n)
            keys, vals = words[:n], words[n:]
        ids = [t for k, v in zip(keys, vals) for t in (tid(k), tid(v))]
        order = rng.sample(range(n), n)
        return ids + [t for i in order for t in (tid(keys[i]), tid(vals[i]))], [0] * 2 * n + [0, 1] * n
    if fmt != "fact":
        raise ValueError(f"--format must be repeat, mqar or fact, got {fmt!r}")

    def enc(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    side = max(2, (n + 1) // 2)
    pairs = rng.sample([(e, a) for e in rng.sample(NAME_POOL, side) for a in rng.sample(attrs, side)], n)
    facts = [(e, a, rng.choice(ATTRIBUTES[a])) for e, a in pairs]
    ids = [t for f in facts for t in enc(" " + fact_sentence(*f))] + enc("\n")
    tgt = [0] * len(ids)
    for e, a, v in rng.sample(facts, n):
        head = enc(f" The {a} of {e} is ")
        ids += head + [tid(v)] + enc(".")
        tgt += [0] * len(head) + [1, 0]
    return ids, tgt


def batch(fmt: str, n: int, rng: random.Random, tok, rows: int, seq: int, mix: float = 0.0, vocab: int = 0):
    import torch

    x = torch.full((rows, seq), tok.pad_token_id)
    mask = torch.zeros(rows, seq, dtype=torch.long)
    target = torch.zeros(rows, seq, dtype=torch.bool)
    for b in range(rows):
        ids: list[int] = []
        tg: list[int] = []
        while True:
            f = "repeat" if rng.random() < mix else (fmt if fmt != "mixed" else rng.choice(["fact", "mqar"]))
            e, t = episode(f, 24 if f == "repeat" and fmt != "repeat" else n, rng, tok, vocab)
            if len(ids) + len(e) + 1 > seq:
                break
            ids += e + [tok.eos_token_id]
            tg += t + [0]
        if not ids:
            raise ValueError(f"--seq {seq} is shorter than one {fmt} episode with n={n}")
        x[b, :len(ids)] = torch.tensor(ids)
        mask[b, :len(ids)] = 1
        target[b, :len(ids)] = torch.tensor(tg, dtype=torch.bool)
    return x, mask, target


def build(arch: str, preset: str, vocab: int, tok, seed: int):
    import torch

    from memact.policy.model import PRESETS, build_model

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
    ap.add_argument("--format", default="fact", choices=["repeat", "mqar", "mqar_all", "fact", "mixed"],
                    help="mixed: fact and mqar episodes, half each")
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
    ap.add_argument("--save", help="write the trained model and the tokenizer here (a warm start for `memact sft`)")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.init:
        from memact.policy.model import load_policy

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

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ex, attention_mask=em).logits[:, :-1]
        model.train()
        t, sel = ex[:, 1:], et[:, 1:]
        return ((logits.argmax(-1) == t)[sel].float().mean().item(),
                F.cross_entropy(logits[sel], t[sel]).item())

    t0, tokens, losses = time.time(), 0, []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            acc, nll = evaluate()
            print(json.dumps({"step": step, "tokens": tokens, "recall_acc": round(acc, 3), "recall_nll": round(nll, 3),
                              "loss": round(sum(losses) / max(1, len(losses)), 3), "s": round(time.time() - t0, 1)}),
                  flush=True)
            losses = []
        if step == args.steps:
            break
        fmt = "repeat" if step < args.pre_steps else args.format
        x, m, _ = batch(fmt, args.n, rng, tok, args.batch, args.seq, args.mix if step >= args.pre_steps else 0.0,
                        args.vocab)
        logits = model(input_ids=x, attention_mask=m).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="none")
        w = m[:, 1:].reshape(-1).float()
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
