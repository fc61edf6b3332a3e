"""Model size x learning rate for the in-context recall warm-up, interleaved on a shared CPU.

    .venv/bin/memact new-model --preset tiny --out runs/tiny     # only for its tokenizer (optional)
    .venv/bin/python benchmarks/recall_warmup.py --configs tiny:1e-3,tiny:3e-3,tiny:1e-2,h192l4:3e-3,small:3e-3 \\
        --seconds 80 --tokenizer runs/tiny --out runs/recall_bench

(the run recorded in docs/pretrain.md: about 7.5 minutes on a shared 2-core machine).

Every configuration trains a fresh model (same tokenizer, same seed, hence the same data
stream) with ``memact.warmup.facts.Pretrainer``. The runs advance in round-robin slices
of ``--slice`` seconds in one process, so neighbours on a shared machine slow them all
alike and the tokens/s columns compare; accuracy is a function of tokens seen and does
not depend on the machine's load at all.

Budget: ``--seconds S`` gives each configuration about S seconds of training (evaluation
not counted): a short probe measures each one's tokens/s and sets its token budget (the
length of its warm-up + cosine schedule and its curriculum) to tokens/s x S. ``--tokens N``
instead gives every configuration the same N tokens. A configuration is ``PRESET:LR`` with
PRESET a name from ``memact.models.model.PRESETS`` or ``hHIDDENlLAYERS`` (e.g. ``h192l4``:
hidden 192, 4 layers, 4 heads, 2 KV heads, MLP 3x hidden).

Prints a table per configuration (tokens/s, loss, held-out recall per curriculum level,
recall on training names, id copy and note accuracy, chance levels) and held-out recall at
the first levels against tokens seen; writes ``NAME.jsonl`` curves and ``recall_vs_tokens.png``
under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from memact.env.task import ATTRIBUTES  # noqa: E402
from memact.models.model import PRESETS, ModelPreset, build_model, count_parameters, load_tokenizer  # noqa: E402
from memact.warmup.facts import PretrainConfig, Pretrainer, parse_curriculum  # noqa: E402


def parse_config(spec: str) -> tuple[str, ModelPreset, float]:
    """``"tiny:3e-3"`` or ``"h192l4:2e-3"`` -> (name, preset, lr)."""
    try:
        preset_name, lr_text = spec.split(":")
        lr = float(lr_text)
    except ValueError:
        raise SystemExit(f"bad configuration {spec!r}: expected PRESET:LR, e.g. tiny:3e-3") from None
    if preset_name in PRESETS:
        return spec, PRESETS[preset_name], lr
    m = re.fullmatch(r"h(\d+)l(\d+)", preset_name)
    if not m:
        raise SystemExit(f"unknown preset {preset_name!r} in {spec!r}: use one of {', '.join(PRESETS)} or hHIDDENlLAYERS")
    hidden, layers = int(m.group(1)), int(m.group(2))
    if hidden % 4:
        raise SystemExit(f"hidden size {hidden} in {spec!r} must be a multiple of 4 (4 heads)")
    return spec, ModelPreset(hidden, layers, 4, 2, 3 * hidden), lr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny:1e-3,tiny:3e-3,tiny:1e-2,h192l4:3e-3,small:3e-3")
    p.add_argument("--seconds", type=float, default=80.0, help="training seconds per configuration")
    p.add_argument("--tokens", type=int, default=0, help="same token budget for all (overrides --seconds)")
    p.add_argument("--slice", type=float, default=10.0, help="seconds per round-robin turn")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=768)
    p.add_argument("--curriculum", default="2,4,8,16")
    p.add_argument("--advance", default="threshold", choices=["threshold", "schedule", "both"],
                   help="curriculum rule (default threshold: a short run stays where it is still learning)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-targets", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokenizer", default="", help="a model directory whose tokenizer to use (default: train one)")
    p.add_argument("--out", default="runs/recall_bench")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        from memact.agent.rollout import default_tokenizer

        tok = default_tokenizer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = [parse_config(s) for s in args.configs.split(",") if s.strip()]
    trainers: dict[str, Pretrainer] = {}
    params: dict[str, int] = {}
    for name, preset, lr in configs:
        model = build_model(preset, len(tok), seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        cfg = PretrainConfig(tokens=args.tokens or 10**9, lr=lr, batch=args.batch, seq_len=args.seq_len,
                             curriculum=parse_curriculum(args.curriculum), eval_every=args.eval_every,
                             eval_targets=args.eval_targets, threads=args.threads, advance=args.advance)
        log = out / (re.sub(r"[^\w.-]", "_", name) + ".jsonl")
        log.unlink(missing_ok=True)
        trainers[name] = Pretrainer(model, tok, cfg, log_path=log, name=name)
        params[name] = count_parameters(model)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch threads {args.threads}, "
          f"bf16 {trainers[configs[0][0]].cfg.bf16}", flush=True)

    if not args.tokens:
        # Probe: one warm-up step (shapes, allocator), then 3 timed steps each, interleaved. The
        # probe's steps are undone by re-creating the trainer, so every run starts from step 0.
        speed = {}
        for name, _preset, _lr in configs:
            t = trainers[name]
            t.train_step()
            t0, n0 = time.perf_counter(), t.tokens
            for _ in range(3):
                t.train_step()
            speed[name] = (t.tokens - n0) / (time.perf_counter() - t0)
        for name, preset, _lr in configs:
            old = trainers[name]
            model = build_model(preset, len(tok), seed=0, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)
            old.cfg.tokens = int(round(speed[name] * args.seconds, -3))
            trainers[name] = Pretrainer(model, tok, old.cfg, log_path=old.log_path, name=name)
            print(f"{name}: probe {speed[name]:,.0f} tok/s -> budget {old.cfg.tokens:,} tokens", flush=True)

    t_start = time.perf_counter()
    while not all(t.done for t in trainers.values()):
        for t in trainers.values():
            if not t.done:
                t.train_for(seconds=args.slice)
    wall = time.perf_counter() - t_start

    print(f"\nall runs: {wall:.0f} s wall (training + evaluation), load average now {os.getloadavg()[0]:.1f}\n")
    levels = [str(n) for n in trainers[configs[0][0]].cfg.curriculum]
    chance = trainers[configs[0][0]].chance
    head = (f"| config | params | tokens | steps | tok/s | last loss | held-out recall {'/'.join(levels)} | "
            f"answer NLL (nats) | seen-name recall | id copy | note | level reached |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, t in trainers.items():
        last = t.curve[-1]
        fmt = "/".join(f"{last['recall'][k]:.2f}" for k in levels)
        nll = "/".join(f"{last['recall_nll'][k]:.2f}" for k in levels)
        seen = "/".join(f"{last['recall_seen'][k]:.2f}" for k in levels)
        copy = "/".join(f"{last['copy'][k]:.2f}" for k in levels)
        note = "/".join(f"{last['note'][k]:.2f}" for k in levels)
        reached = max(r["level"] for r in t.curve)
        print(f"| {name} | {params[name] / 1e6:.2f} M | {t.tokens:,} | {t.step} | {t.tokens / t.train_s:,.0f} | "
              f"{last['loss']} | {fmt} | {nll} | {seen} | {copy} | {note} | {reached} |")
    print(f"\nchance: attribute-only guess {'/'.join(str(chance['attribute_only'][k]) for k in levels)}; "
          f"uniform over an attribute's values {chance['uniform_value']:.3f}; id copy "
          f"{'/'.join(str(chance['copy'][k]) for k in levels)}")

    print(f"\nheld-out recall at {levels[0]} facts against tokens seen (each evaluation): tokens:acc/answer NLL")
    for name, t in trainers.items():
        pts = " ".join(f"{r['tokens'] / 1000:.0f}k:{r['recall'][levels[0]]:.2f}/{r['recall_nll'][levels[0]]:.2f}"
                       for r in t.curve)
        print(f"  {name}: {pts}")
    _plot(trainers, levels[0], out / "recall_vs_tokens.png")
    (out / "summary.json").write_text(json.dumps(
        {name: {"params": params[name], "tokens": t.tokens, "steps": t.step, "tok_s": t.tokens / t.train_s,
                "lr": t.cfg.lr, "final": t.curve[-1]} for name, t in trainers.items()}, indent=1))
    print(f"\ncurves in {out}/*.jsonl, plot {out / 'recall_vs_tokens.png'}")
    return 0


def _plot(trainers: dict[str, Pretrainer], level: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Accuracy, and the answer's NLL, which moves long before accuracy does in short runs.
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, t in trainers.items():
        tokens = [r["tokens"] / 1e6 for r in t.curve]
        ax.plot(tokens, [r["recall"][level] for r in t.curve], marker=".", label=name)
        ax2.plot(tokens, [r["recall_nll"][level] for r in t.curve], marker=".", label=name)
    first = next(iter(trainers.values()))
    ax.axhline(first.chance["attribute_only"][level], color="grey", linestyle=":", label="attribute-only guess")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel(f"held-out recall, {level} facts")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    n_values = sum(len(v) for v in ATTRIBUTES.values())
    ax2.axhline(math.log(n_values), color="grey", linestyle=":", label=f"uniform over all {n_values} values")
    ax2.axhline(math.log(len(ATTRIBUTES["pet"])), color="grey", linestyle="-.", label="uniform over the attribute's values")
    ax2.set_xlabel("training tokens (millions)")
    ax2.set_ylabel(f"held-out answer NLL (nats), {level} facts")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
