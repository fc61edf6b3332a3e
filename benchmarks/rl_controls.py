"""Does DCPO learn, or does its update only move the policy? Runs against their controls, over seeds.

For each seed, `memact train` from one start (an SFT checkpoint) with the real advantages and
with each control (`dcpo.control=shuffle`: the same advantages permuted within each group, an
update of the same size without signal; `reverse`: the sign flipped), then `memact eval` of the
start and of every run on the same held-out tasks (greedy). The report pairs each run with the
start task by task: the change in reward and accuracy, its mean and spread over seeds, and the
evaluation's own noise (the standard error of a paired difference over the tasks).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rl_controls.py --init runs/sft --out runs/controls \\
        --seeds 0,1,2 --controls none,shuffle --eval-k 1,2 --eval-n 64 --jobs 2 -- run.steps=8 ...

Everything after ``--`` goes to every `memact train` (``configs/tiny_cpu_dcpo.yaml`` unless
``--config``). Finished runs are kept: run it again with the same ``--out`` to add seeds or
controls. Writes ``OUT/REPORT.md``, ``OUT/results.json`` and ``OUT/reward_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEMACT_THREADS": os.environ.get("MEMACT_THREADS", "1")}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")


def train_run(args: argparse.Namespace, seed: int, control: str) -> Path:
    out = Path(args.out) / f"run_{control}_s{seed}"
    done = out / "checkpoints"
    final = sorted(done.glob("step_*")) if done.exists() else []
    if final and (out / "DONE").exists():
        return final[-1]
    cmd = [str(BIN / "memact"), "train", *(["--config", args.config] if args.config else []), "--out", str(out),
           f"model.path={args.init}", f"run.seed={seed}", f"dcpo.control={control}", "logging.progress=false",
           "logging.table_every=0", *args.overrides]
    out.mkdir(parents=True, exist_ok=True)
    _run(cmd, out.parent / f"train_{control}_s{seed}.log")
    (out / "DONE").write_text("")
    return sorted(done.glob("step_*"))[-1]


def eval_run(args: argparse.Namespace, policy: Path | str, name: str) -> Path:
    name = f"{name}_t{args.eval_temperature:g}" if args.eval_temperature else name
    out = Path(args.out) / f"eval_{name}"
    if (out / "episodes.jsonl").exists():
        return out / "episodes.jsonl"
    cmd = [str(BIN / "memact"), "eval", "--policy", str(policy), "--strategy", args.eval_strategy,
           "--objectives", args.eval_k, "--n",
           str(args.eval_n), "--seed", str(args.eval_seed), "--max-steps", str(args.eval_max_steps), "--temperature", str(args.eval_temperature), "--quiet",
           "--out", str(out)]
    _run(cmd, Path(args.out) / f"eval_{name}.log")
    return out / "episodes.jsonl"


def episodes(path: Path) -> dict[tuple[int, str], dict]:
    return {(r["k"], r["task_id"]): r for r in map(json.loads, path.read_text().splitlines())}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def paired(start: dict, run: dict, key: str) -> tuple[float, float]:
    """Mean task-by-task change of ``key`` against the start, and its standard error over tasks."""
    diffs = [run[t][key] - start[t][key] for t in start]
    return mean(diffs), sd(diffs) / math.sqrt(len(diffs))


def curves(out: Path, results: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    colors = {"none": "tab:blue", "shuffle": "tab:gray", "reverse": "tab:red"}
    for r in results:
        rows = [json.loads(x) for x in (out / f"run_{r['control']}_s{r['seed']}" / "metrics.jsonl").read_text().splitlines()]
        ax.plot([x["step"] for x in rows], [x.get("rollout_reward_mean", x["reward_mean"]) for x in rows],
                color=colors.get(r["control"]), alpha=0.8, label=f"{r['control']} s{r['seed']}")
    ax.set_xlabel("DCPO step")
    ax.set_ylabel("sampled reward (all rollouts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=110)
    plt.close(fig)
    return "reward_curves.png"


def main() -> int:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the start: an SFT checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="", help="memact train --config (default: tiny_cpu_dcpo.yaml)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--controls", default="none,shuffle", help="comma-separated dcpo.control values")
    p.add_argument("--eval-k", default="1,2")
    p.add_argument("--eval-n", type=int, default=64)
    p.add_argument("--eval-strategy", default="memact", help="memact eval --strategy (as the runs' rollout.strategy)")
    p.add_argument("--eval-seed", type=int, default=20_000)
    p.add_argument("--eval-max-steps", type=int, default=20)
    p.add_argument("--eval-temperature", type=float, default=0.0,
                   help="evaluation temperature (default 0, greedy; a run again with another reuses the trained runs)")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    args.overrides = overrides
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(int(s), c) for s in args.seeds.split(",") for c in args.controls.split(",")]

    def one(run: tuple[int, str]) -> dict:
        seed, control = run
        ckpt = train_run(args, seed, control)
        return {"seed": seed, "control": control, "checkpoint": str(ckpt),
                "episodes": str(eval_run(args, ckpt, f"{control}_s{seed}"))}

    with ThreadPoolExecutor(args.jobs) as pool:
        start_future = pool.submit(eval_run, args, args.init, "start")
        results = list(pool.map(one, runs))
        start = episodes(start_future.result())
    ks = sorted({k for k, _ in start})
    for r in results:
        run = episodes(Path(r["episodes"]))
        for key in ("reward", "accuracy"):
            r[f"d_{key}"], r[f"se_{key}"] = paired(start, run, key)
        r["accuracy"] = mean([x["accuracy"] for x in run.values()])
        r["reward"] = mean([x["reward"] for x in run.values()])
        r["penalised"] = mean([float(x["reward"] < 0) for x in run.values()])
        r["accuracy_k"] = {k: mean([x["accuracy"] for (kk, _), x in run.items() if kk == k]) for k in ks}
        rows = [json.loads(x) for x in (out / f"run_{r['control']}_s{r['seed']}" / "metrics.jsonl").read_text().splitlines()]
        r["kl_end"] = rows[-1]["kl"]
        r["snr_mean"] = mean([x["grad_snr"] for x in rows if "grad_snr" in x])
        r["sampled_reward_first_last"] = (rows[0].get("rollout_reward_mean"), rows[-1].get("rollout_reward_mean"))
    s_acc = mean([x["accuracy"] for x in start.values()])
    s_rew = mean([x["reward"] for x in start.values()])
    s_pen = mean([float(x["reward"] < 0) for x in start.values()])
    lines = [
        "# DCPO against its controls", "",
        f"Start: `{args.init}`. Train overrides: `{' '.join(overrides) or '(none)'}`. Evaluation: "
        f"{args.eval_n} held-out tasks per K (K = {args.eval_k}, seed {args.eval_seed}), "
        f"{'greedy' if not args.eval_temperature else f'sampled at temperature {args.eval_temperature:g}'}, the same tasks "
        "for every row; the change is paired task by task against the start, +- its standard error over the "
        "tasks (the evaluation's own noise).", "",
        "| run | seed | accuracy | " + " | ".join(f"K={k}" for k in ks)
        + " | reward | penalised | change in reward | change in accuracy | KL at the end | grad SNR (mean) "
          "| sampled reward, first -> last step |",
        "|---" * (10 + len(ks)) + "|",
        f"| start | | {s_acc:.3f} | " + " | ".join(
            f"{mean([x['accuracy'] for (kk, _), x in start.items() if kk == k]):.3f}" for k in ks)
        + f" | {s_rew:.3f} | {s_pen:.3f} | | | | | |",
    ]
    for r in sorted(results, key=lambda r: (r["control"], r["seed"])):
        f0, f1 = r["sampled_reward_first_last"]
        lines.append(
            f"| {r['control']} | {r['seed']} | {r['accuracy']:.3f} | "
            + " | ".join(f"{r['accuracy_k'][k]:.3f}" for k in ks)
            + f" | {r['reward']:.3f} | {r['penalised']:.3f} | {r['d_reward']:+.3f} +- {r['se_reward']:.3f} | "
              f"{r['d_accuracy']:+.3f} +- {r['se_accuracy']:.3f} | {r['kl_end']:.3f} | {r['snr_mean']:.2f} | "
              f"{f0:.3f} -> {f1:.3f} |")
    lines += ["", "| run | seeds | change in reward, mean (sd over seeds) | change in accuracy, mean (sd) "
                  "| every seed above the start | evaluation noise (mean se) |", "|---|---|---|---|---|---|"]
    for c in args.controls.split(","):
        rs = [r for r in results if r["control"] == c]
        dr, da = [r["d_reward"] for r in rs], [r["d_accuracy"] for r in rs]
        lines.append(f"| {c} | {len(rs)} | {mean(dr):+.3f} ({sd(dr):.3f}) | {mean(da):+.3f} ({sd(da):.3f}) | "
                     f"{'yes' if all(x > 0 for x in da) else 'no'} | {mean([r['se_accuracy'] for r in rs]):.3f} |")
    lines += ["", f"![sampled reward per step]({curves(out, results)})", ""]
    suffix = f"_t{args.eval_temperature:g}" if args.eval_temperature else ""
    (out / f"REPORT{suffix}.md").write_text("\n".join(lines))
    (out / f"results{suffix}.json").write_text(json.dumps({"start": {"accuracy": s_acc, "reward": s_rew}, "runs": results},
                                                 indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
