"""DCPO update step against TRL's ``GRPOTrainer`` step: same tiny model, same tokens, tok/s.

    cd /work/main
    HF_HUB_OFFLINE=1 .venv/bin/memact new-model --preset tiny --out /tmp/trlb/tiny
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_trl.py --model /tmp/trlb/tiny \\
        --trl-python /tmp/trl-venv/bin/python --calls 3 --rounds 3

(the TRL venv: torch 2.13.0+cpu, transformers 5.24, trl 1.16.0; the driver runs each side as a
worker, ``--side trl`` under ``--trl-python`` and ``--side memact`` under this interpreter,
alternating ``--calls`` times; one worker alone: ``... bench_trl.py --side trl --model DIR``.)

Data, identical on both sides: 8 sequences of 256 prompt + 128 completion tokens, random ids
of the tokenizer's vocabulary (pad id excluded, fixed seed), no padding; advantages fixed,
+1/-1 alternating; the loss is on the 128 completion tokens. Both losses: token-level clipped
ratio (eps 0.2/0.2), mean over all completion tokens of the batch (TRL ``loss_type="dapo"``,
ours ``loss_agg=token_mean``), k3 KL to a reference at coefficient 0.001 (TRL ``beta``, ours
``dcpo.kl_coef``), temperature 1, no gradient checkpointing (GRPOConfig defaults to it on;
``--trl-checkpointing`` switches it on for TRL's model, which then also slows that venv's
plain row), AdamW lr 1e-6, gradient clipping at 1.0. Old and reference
log-probs are computed before timing (not timed) on both sides.

Timed, per round (tokens = 8 x 384 = 3,072 real tokens; tok/s = tokens / seconds):

- plain: ``model(input_ids).logits[:, :-1]`` -> cross-entropy over every position -> backward,
  no optimizer step (the common baseline, run in each venv on that venv's model object);
- trl: ``trainer.compute_loss(model, inputs)`` on a hand-built dict in the layout of
  ``GRPOTrainer._generate_and_score_completions`` (prompt/completion ids and masks,
  advantages, old/ref per-token log-probs, num_items_in_batch) -> ``accelerator.backward``
  -> ``accelerator.clip_grad_norm_(1.0)`` -> ``optimizer.step()`` -> ``zero_grad``
  (the trainer's own AdamW from ``create_optimizer``); generation and reward are not timed;
- memact: ``memact.dcpo.trainer.update`` on ``pack_mini_batches`` micro-batches through the
  DeepSpeed engine (ZeRO 0 on one CPU process, ``init_deepspeed``): log-probs of the trained
  tokens, DCPO loss, ``engine.backward``, ``engine.step`` (clip + AdamW + LR schedule).

1 torch thread, fp32. Within a worker plain and update rounds alternate after one warm-up of
each; the driver alternates workers. Medians over all rounds, and the ratios, are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

N_SEQ, PROMPT, COMPLETION = 8, 256, 128
KL, EPS, LR = 0.001, 0.2, 1e-6


def make_data(tok, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)
    ids = torch.randint(0, vocab - 1, (N_SEQ, PROMPT + COMPLETION), generator=g)
    ids = torch.where(ids >= tok.pad_token_id, ids + 1, ids)  # skip the pad id
    adv = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(N_SEQ)])
    return ids, adv


def timed_rounds(plain, step, rounds: int) -> dict:
    plain(), step()  # warm-up: kernel selection for these shapes
    p, s = [], []
    for _ in range(rounds):
        p.append(plain())
        s.append(step())
    return {"plain": p, "update": s}


def plain_fn(model, ids, tokens: int):
    import torch

    def plain() -> float:
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return tokens / (time.perf_counter() - t0)
    return plain


# ----------------------------------------------------------------------------- TRL worker


def worker_trl(args) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    cfg = GRPOConfig(output_dir="/tmp/trlb/trl-out", per_device_train_batch_size=N_SEQ, num_generations=N_SEQ,
                     max_completion_length=COMPLETION, gradient_accumulation_steps=1, learning_rate=LR,
                     beta=KL, epsilon=EPS, loss_type="dapo", temperature=1.0, max_grad_norm=1.0,
                     gradient_checkpointing=args.trl_checkpointing,
                     use_cpu=True, bf16=False, report_to=[], logging_steps=1000, save_strategy="no")
    ds = Dataset.from_dict({"prompt": ["x"] * N_SEQ})
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=cfg,
                          train_dataset=ds, processing_class=tok)
    torch.set_num_threads(args.threads)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    if args.trl_checkpointing:  # Trainer.train() would switch it on; we bypass train()
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs or {"use_reentrant": False})
    model.train()
    ids, adv = make_data(tok, args.seed)
    ones = torch.ones_like(ids)
    with torch.no_grad():
        old, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, ones, COMPLETION)
        ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, ones, COMPLETION)
    inputs = {"prompt_ids": ids[:, :PROMPT], "prompt_mask": ones[:, :PROMPT],
              "completion_ids": ids[:, PROMPT:], "completion_mask": ones[:, PROMPT:],
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(N_SEQ * COMPLETION))}
    tokens = ids.numel()
    acc, opt = trainer.accelerator, trainer.optimizer

    def step() -> float:
        t0 = time.perf_counter()
        loss = trainer.compute_loss(model, inputs)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens / (time.perf_counter() - t0)

    out = timed_rounds(plain_fn(model, ids, tokens), step, args.rounds)
    out["versions"] = (f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
                       f"gradient checkpointing {getattr(model, 'is_gradient_checkpointing', None)}")
    out["threads"] = torch.get_num_threads()
    return out


# ----------------------------------------------------------------------------- memact worker


def worker_memact(args) -> dict:
    import torch
    import transformers

    from memact.dcpo.config import load_config
    from memact.dcpo.data import TrainSequence
    from memact.dcpo.distributed import DistInfo, init_deepspeed, start_process
    from memact.dcpo.modeling import frozen_reference, load_for_training
    from memact.dcpo.trainer import fill_old_and_ref_logprobs, pack_mini_batches, update

    cfg = load_config(None, [f"model.path={args.model}", f"run.threads={args.threads}", f"optim.lr={LR}",
                             "optim.max_grad_norm=1.0", "batch.max_tokens_per_micro_batch=4096",
                             "batch.max_seq_len=2048", "batch.pad_to_multiple_of=64", f"dcpo.kl_coef={KL}",
                             f"dcpo.clip_low={EPS}", f"dcpo.clip_high={EPS}", "dcpo.loss_agg=token_mean",
                             "dcpo.entropy_coef=0.0", "dcpo.ppo_epochs=1", "dcpo.mini_batches=1",
                             "rollout.temperature=1.0"])
    start_process(cfg)
    torch.set_num_threads(args.threads)
    model, tok = load_for_training(cfg)
    ids, adv = make_data(tok, args.seed)
    seqs = [TrainSequence(tokens=ids[i].tolist(), prompt_len=PROMPT, loss_mask=[1] * COMPLETION,
                          rollout_logprobs=[0.0] * COMPLETION, advantage=float(adv[i]), traj_id=i, group=0)
            for i in range(N_SEQ)]
    engine = init_deepspeed(model, cfg)
    torch.set_num_threads(args.threads)
    minis = pack_mini_batches(seqs, cfg, tok.pad_token_id, "cpu")
    fill_old_and_ref_logprobs(engine, frozen_reference(engine.module, cfg), minis, cfg)
    tokens = sum(mb.n_real_tokens for mbs in minis for mb in mbs)
    assert tokens == ids.numel(), (tokens, ids.numel())
    shapes = [tuple(mb.input_ids.shape) for mbs in minis for mb in mbs]

    def step() -> float:
        t0 = time.perf_counter()
        update(engine, minis, cfg, DistInfo(0, 1, 0))
        return tokens / (time.perf_counter() - t0)

    out = timed_rounds(plain_fn(engine.module, ids, tokens), step, args.rounds)
    import deepspeed
    out["versions"] = (f"torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"deepspeed {deepspeed.__version__}; micro-batches {shapes}")
    out["threads"] = torch.get_num_threads()
    return out


# ----------------------------------------------------------------------------- driver


def fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:,.0f}" for x in xs)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (`memact new-model --preset tiny --out DIR`)")
    ap.add_argument("--side", choices=["both", "trl", "memact"], default="both")
    ap.add_argument("--trl-python", default="/tmp/trl-venv/bin/python")
    ap.add_argument("--calls", type=int, default=3, help="worker invocations per side (alternating)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per worker invocation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-checkpointing", action="store_true",
                    help="keep GRPOConfig's default gradient_checkpointing=True (ours has it off; default: off on both)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side != "both":
        res = (worker_trl if args.side == "trl" else worker_memact)(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    here = os.path.abspath(__file__)
    common = ["--model", args.model, "--rounds", str(args.rounds), "--threads", str(args.threads),
              "--seed", str(args.seed)] + (["--trl-checkpointing"] if args.trl_checkpointing else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    runs = {"trl": [], "memact": []}
    print(f"load average at start: {loadavg()}", flush=True)
    for c in range(args.calls):
        for side, py in (("trl", args.trl_python), ("memact", sys.executable)):
            p = subprocess.run([py, here, "--side", side, *common], env=env, capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.dirname(here)))
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                sys.exit(f"{side} worker failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            runs[side].append(r)
            print(f"call {c + 1} {side:6s}: plain {fmt(r['plain'])} | update {fmt(r['update'])} tok/s "
                  f"(load {loadavg()})", flush=True)
    tokens = N_SEQ * (PROMPT + COMPLETION)
    print(f"\n{N_SEQ} sequences x ({PROMPT} prompt + {COMPLETION} completion) = {tokens} tokens, "
          f"{args.threads} thread(s), fp32, {args.calls} calls x {args.rounds} rounds per side")
    med = {}
    for side in ("trl", "memact"):
        p = [x for r in runs[side] for x in r["plain"]]
        u = [x for r in runs[side] for x in r["update"]]
        med[side] = (statistics.median(p), statistics.median(u))
        print(f"{side:6s} [{runs[side][0]['versions']}; torch threads {runs[side][0]['threads']}]")
        print(f"  plain fwd+bwd: {med[side][0]:,.0f} tok/s   update step: {med[side][1]:,.0f} tok/s   "
              f"update/plain: {med[side][1] / med[side][0]:.2f}")
    print(f"ours/TRL update:            {med['memact'][1] / med['trl'][1]:.2f}")
    print(f"plain memact-venv/TRL-venv: {med['memact'][0] / med['trl'][0]:.2f}")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
