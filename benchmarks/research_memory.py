"""What a research memory is worth: the context-reading proposer on the surrogate template, the
same seeds under each memory, side by side.

For each memory (``none``: the whole history, never pruned; ``window``: the oldest records
dropped to fit the budget, no note; ``heuristic``: the best and the last records kept, the
rest folded into a note of statistics; ``expert``: the history expert, the policy's SFT
teacher, in process; ``policy:MODEL_DIR``: a served policy, started here with ``memact serve
MODEL_DIR`` for the memory's runs; ``policy:scripted``: the same expert, served with ``--data
history:FILE``) and seed: a fresh surrogate workspace,
``memact research run --proposer context --memory M --context-budget B --seed S`` for N experiments.
Reported per memory (mean and spread over seeds): the best val_bpb found, the experiments it
took to first reach a target, the share of experiments that repeat an earlier one (the same
change from the same best train.py), the context tokens per experiment, and for a served policy
how often it pruned and how often the fallback (the expert, then the heuristic) had to act for it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/research_memory.py --out runs/research_memory \\
        --memories none,window,heuristic,expert,policy:runs/hist/sm_sft \\
        --seeds 0,1,2 --experiments 120 --context-budget 400

Writes ``OUT/REPORT.md``, ``OUT/results.json`` and ``OUT/research_memory.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from eval_servers import free_port, server_process

from memact.research.measure import measure_workspace

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def policy_server(out: Path, memory: str, args: argparse.Namespace):
    """For ``policy:X``, ``memact serve X`` on a free port for the memory's runs: yields the env
    that points ``memact research run`` at it (MEMACT_POLICY_URL); other memories need none."""
    kind, _, model = memory.partition(":")
    if kind != "policy":
        yield {}
        return
    port = free_port()
    cmd = [str(BIN / "memact"), "serve", model, "--port", str(port), "--served-model-name", model]
    if model == "scripted":
        if not args.history:
            raise SystemExit("policy:scripted serves the history expert: give --history FILE")
        cmd += ["--data", f"history:{args.history}"]
    with server_process(cmd, port, out / f"{label(memory)}.serve.log", 300) as up:
        print(f"{memory}: served in {up:.1f} s", file=sys.stderr)
        yield {"MEMACT_POLICY_URL": f"http://127.0.0.1:{port}/v1"}


def run_one(out: Path, memory: str, seed: int, args: argparse.Namespace, env: dict[str, str]) -> Path:
    ws = out / f"{label(memory)}_s{seed}"
    if ws.exists():
        shutil.rmtree(ws)
    subprocess.run([str(BIN / "memact"), "research", "init", str(ws), "--template", "surrogate"], check=True,
                   capture_output=True)
    with open(out / f"{label(memory)}_s{seed}.log", "w") as log:
        subprocess.run([str(BIN / "memact"), "research", "run", str(ws), "--budget", "1", "--experiments",
                        str(args.experiments), "--proposer", "context", "--memory", memory, "--context-budget",
                        str(args.context_budget), "--seed", str(seed)], check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, **env})
    return ws


def label(memory: str) -> str:
    """A memory spec as a file name (``policy:runs/x`` -> ``policy_runs_x``)."""
    return memory.replace(":", "_").replace("/", "_").strip("_.")


def mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.4g} ({sd:.2g})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--memories", default="none,window,heuristic")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--experiments", type=int, default=120)
    p.add_argument("--context-budget", type=int, default=400)
    p.add_argument("--target", type=float, default=1.58, help="val_bpb whose first reach is counted")
    p.add_argument("--history", default=None, help="history file the served expert (policy:scripted) answers for")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for memory in args.memories.split(","):
        with policy_server(out, memory, args) as env:
            for seed in map(int, args.seeds.split(",")):
                t0 = time.time()
                ws = run_one(out, memory, seed, args, env)
                results[(memory, seed)] = {**measure_workspace(ws, args.target), "seconds": time.time() - t0}
                r = results[(memory, seed)]
                print(f"{memory} seed {seed}: best {r['best']:.4f}, reached {args.target} at {r['reached']}, "
                      f"repeats {r['repeat_share']:.2f}, context mean {r['context_mean']:.0f}, prunes {r['prunes']}, "
                      f"fallbacks {r['fallbacks']}, {r['seconds']:.0f}s", file=sys.stderr)
    lines = ["# Research memories measured with the context-reading proposer", "",
             f"Surrogate template, {args.experiments} experiments a run, context budget {args.context_budget} proxy "
             f"tokens, seeds {args.seeds}; mean (sd) over seeds.", "",
             f"| memory | best val_bpb | experiments to reach {args.target} | repeated experiments | crashes "
             "| context tokens per experiment (mean) | largest | prunes | of them by the fallback |",
             "|---|---|---|---|---|---|---|---|---|"]
    for memory in args.memories.split(","):
        rs = [v for (m, _), v in results.items() if m == memory]
        never = sum(r["reached"] is None for r in rs)
        lines.append(f"| {memory} | {mean_sd([r['best'] for r in rs])} | {mean_sd([r['reached'] for r in rs])}"
                     f"{f' ({never} never)' if never else ''} | {mean_sd([r['repeat_share'] for r in rs])} | "
                     f"{mean_sd([r['crashes'] for r in rs])} | {mean_sd([r['context_mean'] for r in rs])} | "
                     f"{max(r['context_max'] for r in rs)} | {mean_sd([r['prunes'] for r in rs])} | "
                     f"{mean_sd([r['fallbacks'] for r in rs])} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, memory in enumerate(args.memories.split(",")):
        for (m, seed), r in results.items():
            if m == memory:
                axes[0].plot(range(1, len(r["curve"]) + 1), r["curve"], color=f"C{i}", alpha=0.7,
                             label=memory if seed == int(args.seeds.split(",")[0]) else None)
                axes[1].plot(r["context_curve"], color=f"C{i}", alpha=0.7,
                             label=memory if seed == int(args.seeds.split(",")[0]) else None)
    axes[0].set(xlabel="experiment", ylabel="best val_bpb so far", title="research progress")
    axes[1].set(xlabel="experiment", ylabel="context (proxy tokens)", title="context the proposer reads")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "research_memory.png", dpi=110)
    lines += ["", "![progress and context](research_memory.png)", ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({f"{label(m)}_s{s}": v for (m, s), v in results.items()}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
