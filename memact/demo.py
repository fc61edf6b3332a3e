"""`memact demo`: the whole pipeline on the CPU, end to end, leaving a report.

The shipped warm-up (``memact/assets/tiny_warm``: the tiny model after ``memact pretrain``,
which the demo's time cannot afford) -> scripted trajectories -> two SFTs side by side on the
two cores: one without memory (K=1, the skill this time can teach) and one with memory
actions (K=1 and 2) -> DCPO from the no-memory policy at K = 1 and 2, with dynamic sampling and
the gradient signal-to-noise ratio logged, and beside it, on the other core, the same run with its
advantages shuffled within each group (``dcpo.control=shuffle``: an update of the same size
without signal) ->
evaluation of every policy, of the untrained start and of the scripted experts on the same
held-out tasks, greedy, and of the DCPO policies also sampled at the training temperature ->
``OUT/REPORT.md``: the table, the learned rows against their start (paired, task by task), the
DCPO reward curves against the control's and stage times. The memory policy does not learn to prune in this time (docs/reproduce.md: hours of
one core); the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DemoPreset:
    """Sizes of one demo run."""

    nomem_tasks: dict[int, int] = field(default_factory=lambda: {1: 1200})
    """Scripted no-memory trajectories per K for the no-memory SFT."""
    mem_tasks: dict[int, int] = field(default_factory=lambda: {1: 400, 2: 200})
    """Scripted trajectories with memory actions per K for the MemAct SFT."""
    nomem_epochs: int = 3
    mem_epochs: int = 2
    sft_overrides: tuple[str, ...] = ("optim.lr=1e-3", "optim.schedule=cosine", "optim.warmup_steps=50",
                                      "sft.segments_per_step=2")
    """The SFT of the warm start measured in docs/pretrain.md (small steps, cosine)."""
    dcpo_steps: int = 6
    dcpo_prompts: int = 8
    dcpo_n_traj: int = 8
    dcpo_overrides: tuple[str, ...] = ("rollout.curriculum=[1,2]", "rollout.curriculum_mode=mixed",
                                       "rollout.strategy=full", "rollout.max_steps=6", "rollout.temperature=1.0",
                                       "optim.lr=3e-4", "rollout.dynamic_sampling=true", "logging.grad_snr=true")
    """K = 1 and 2 in every step, without the memory tool. At K=1 the no-memory SFT's sampled groups
    hold both outcomes; at K=2 it answers nothing, and only its penalised episodes (broken budgets)
    give a signal. Both K are needed: DCPO at K=1 alone raised the penalised K=2 episodes from
    0.10 to 0.94 in 8 steps (a K that is not sampled drifts, as in docs/reproduce.md's runs E and
    F). lr 3e-4: at 1e-4 eight steps changed no greedy answer (docs/training.md, "Controls")."""
    control: bool = True
    """Run the shuffled-advantage control beside DCPO (the other core)."""
    eval_objectives: tuple[int, ...] = (1, 2)
    eval_n: int = 48
    eval_max_steps: int = 12
    """Step budget in evaluation: policies that never answer stop here."""


PRESETS = {
    "quick": DemoPreset(),
    "smoke": DemoPreset(nomem_tasks={1: 16}, mem_tasks={1: 8}, nomem_epochs=1, mem_epochs=1, dcpo_steps=1,
                        dcpo_prompts=2, dcpo_n_traj=2, eval_objectives=(1,), eval_n=2, eval_max_steps=4,
                        control=True),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the whole pipeline on a tiny CPU model: data, SFT, DCPO, evaluation, REPORT.md",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="run size (default quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, tasks and training (the start model is the shipped warm-up)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first (default: refuse a non-empty OUT)")
    p.set_defaults(func=run)


class _Clock:
    def __init__(self):
        self.t0 = time.time()
        self.stages: list[tuple[str, float]] = []
        self._last = self.t0

    def mark(self, stage: str) -> None:
        now = time.time()
        self.stages.append((stage, now - self._last))
        self._last = now
        print(f"[demo] {stage}: {self.stages[-1][1]:.0f}s", file=sys.stderr)


def _rollouts(policy: str, plan: dict[int, int], seed: int, path: Path, tokenizer: Path) -> dict[str, float]:
    from memact.agent.rollout import rollout
    from memact.trajectory import to_json, trajectory_stats, write_jsonl
    from memact.util.seeds import derive_seed

    rows, rewards = [], []
    for k, n in plan.items():
        trajs = rollout(policy, k, n, seed=derive_seed(seed, "demo_rollouts", 1000 * k), progress=False,
                        tokenizer_dir=str(tokenizer))
        rows += [to_json(t) for t in trajs]
        rewards.append(trajectory_stats(trajs)["reward_mean"])
    write_jsonl(path, rows)
    return {"trajectories": len(rows), "reward_mean": sum(rewards) / len(rewards)}


def _fresh_rendezvous() -> None:
    """A worker process trains alone: its own rendezvous port (``memact.dcpo.distributed.init_env``)."""
    for key in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)


def _sft(base: Path, data: Path, out: Path, epochs: int, seed: int, overrides: tuple[str, ...] = ()) -> Path:
    from memact.dcpo.config import configs_dir, load_config
    from memact.dcpo.sft import sft

    _fresh_rendezvous()
    cfg = load_config(configs_dir() / "tiny_cpu_sft.yaml", [
        f"model.path={base}", f"sft.data={data}", f"run.out_dir={out}", f"sft.epochs={epochs}", f"run.seed={seed}",
        "logging.progress=false", *overrides,
    ])
    return sft(cfg)


def _dcpo(init: Path, out: Path, preset: DemoPreset, seed: int, control: str = "none") -> Path:
    from memact.dcpo.config import configs_dir, load_config
    from memact.dcpo.trainer import train

    _fresh_rendezvous()
    cfg = load_config(configs_dir() / "tiny_cpu_dcpo.yaml", [
        f"model.path={init}", f"run.out_dir={out}", f"run.steps={preset.dcpo_steps}", f"run.seed={seed}",
        f"rollout.prompts_per_step={preset.dcpo_prompts}", f"rollout.n_traj={preset.dcpo_n_traj}",
        "logging.progress=false", "logging.table_every=0", f"dcpo.control={control}", *preset.dcpo_overrides,
    ])
    run_dir = train(cfg)
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    if not ckpts:
        raise RuntimeError(f"DCPO run {run_dir} left no checkpoint")
    return ckpts[-1]


def _curve_line(label: str, rows: list[dict]) -> str:
    """The sampled reward per step of a DCPO run, its halves, dropped groups and gradient SNR."""
    if not rows:
        return f"{label}: no steps logged."
    half = max(len(rows) // 2, 1)
    early = sum(r["rollout_reward_mean"] for r in rows[:half]) / half
    late = sum(r["rollout_reward_mean"] for r in rows[half:]) / max(len(rows) - half, 1)
    snr = ", ".join(f"{r['grad_snr']:.2f}" for r in rows if "grad_snr" in r)
    dropped = sum(r["groups_dropped_frac"] for r in rows) / len(rows)
    per_step = ", ".join(f"{r['rollout_reward_mean']:.3f}" for r in rows)
    return (f"{label}: sampled reward over all rollouts per step {per_step} (first half {early:.3f}, second "
            f"half {late:.3f}); KL to the start at the end {rows[-1]['kl']:.3f}; groups dropped {dropped:.0%} on "
            f"average; gradient signal-to-noise ratio per step {snr or '-'} (about 0 is noise).")


def _evaluate(spec, out: Path) -> list[dict]:
    """``memact.eval.evaluate.evaluate`` with the demo's log lines (a worker process may run it)."""
    from memact.eval.evaluate import evaluate

    return evaluate(spec, out, progress=False, log=lambda line: print(f"[demo] {line}", file=sys.stderr))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _plot_training(out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for rel, label in (("sft_nomem/metrics.jsonl", "SFT loss (no memory)"),
                       ("sft_mem/metrics.jsonl", "SFT loss (with memory)")):
        ys = [r["loss"] for r in _rows(out / rel) if "loss" in r]
        if ys:
            axes[0].plot(range(1, len(ys) + 1), ys, label=label, alpha=0.8)
    for run, label, color in (("dcpo", "DCPO", "tab:blue"), ("dcpo_shuffled", "shuffled control", "tab:gray")):
        rows = _rows(out / run / "metrics.jsonl")
        if rows:
            axes[1].plot([r["step"] for r in rows], [r["rollout_reward_mean"] for r in rows], marker=".",
                         color=color, label=f"{label}: sampled reward")
    for ax, title, xlabel in zip(axes, ("SFT", "DCPO (K = 1, 2)"), ("optimizer step", "DCPO step")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)
    return ["training_curves.png"]


def _paired(out: Path, name: str, start: str) -> list[dict[str, float]]:
    """Per K: accuracy, reward and share of penalised episodes of ``name`` and of ``start``, and the
    mean task-by-task change of reward and of accuracy with its standard error."""
    rows = _rows(out / "eval" / "episodes.jsonl")
    by = {(r["policy"], r["k"], r["task_id"]): r for r in rows}
    result = []
    for k in sorted({r["k"] for r in rows}):
        tasks = [t for (p, kk, t) in by if p == start and kk == k and (name, k, t) in by]
        if not tasks:
            continue
        a, b = [by[(name, k, t)] for t in tasks], [by[(start, k, t)] for t in tasks]
        cell: dict[str, float] = {"k": k, "n": len(tasks)}
        for key in ("accuracy", "reward"):
            diffs = [x[key] - y[key] for x, y in zip(a, b)]
            m = sum(diffs) / len(diffs)
            cell[key], cell[f"start_{key}"] = sum(x[key] for x in a) / len(a), sum(y[key] for y in b) / len(b)
            cell[f"d_{key}"] = m
            cell[f"se_{key}"] = (math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
                                 if len(diffs) > 1 else float("nan"))
        cell["penalised"] = sum(x["reward"] < 0 for x in a) / len(a)
        cell["start_penalised"] = sum(y["reward"] < 0 for y in b) / len(b)
        result.append(cell)
    return result


def run(args: argparse.Namespace) -> int:
    from memact.assets import tiny_warm
    from memact.engines.base import SamplingParams
    from memact.env.memory import DEFAULT_CONTEXT_BUDGET, Budget
    from memact.eval.evaluate import EvalSpec, System
    from memact.eval.report import write_report
    from memact.models.model import count_parameters, load_policy

    preset = PRESETS[args.preset]
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.fresh:
            raise SystemExit(f"memact demo: {out} is not empty; pass --fresh to replace it or choose --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    base = out / "base"
    shutil.copytree(tiny_warm(), base)
    model, _ = load_policy(base)
    parameters = count_parameters(model)
    del model
    clock.mark("the shipped warm-up model")

    data_nomem = _rollouts("scripted-nomem", preset.nomem_tasks, args.seed, out / "data" / "nomem.jsonl", base)
    data_mem = _rollouts("scripted", preset.mem_tasks, args.seed, out / "data" / "scripted.jsonl", base)
    clock.mark("scripted trajectories")

    budget = Budget(DEFAULT_CONTEXT_BUDGET, preset.eval_max_steps)
    eval_seed = 10_000 + args.seed
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=spawn) as pool:  # the two SFTs side by side, one core each
        f_nomem = pool.submit(_sft, base, out / "data" / "nomem.jsonl", out / "sft_nomem", preset.nomem_epochs,
                              args.seed, preset.sft_overrides)
        f_mem = pool.submit(_sft, base, out / "data" / "scripted.jsonl", out / "sft_mem", preset.mem_epochs,
                            args.seed, preset.sft_overrides)
        sft_nomem, sft_mem = f_nomem.result(), f_mem.result()
        clock.mark("SFT without memory and with memory (side by side)")
        # DCPO and its control side by side, then the fixed systems evaluated on one core while
        # the other evaluates the trained ones.
        f_rl = pool.submit(_dcpo, sft_nomem, out / "dcpo", preset, args.seed)
        f_ctl = pool.submit(_dcpo, sft_nomem, out / "dcpo_shuffled", preset, args.seed, "shuffle") \
            if preset.control else None
        rl = f_rl.result()
        ctl = f_ctl.result() if f_ctl is not None else None
        clock.mark("DCPO and its shuffled control (side by side)")
        fixed = [System(str(base), "full", "untrained (warm-up)"),
                 System(str(sft_mem), "memact", "MemAct-SFT"), System("scripted-nomem", "full", "scripted, no memory"),
                 System("scripted", "memact", "scripted expert")]
        f_fixed = pool.submit(_evaluate, EvalSpec(fixed, list(preset.eval_objectives), n=preset.eval_n,
                                                  seed=eval_seed, budget=budget), out / "eval_fixed")
        trained = [System(str(rl), "full", "NoMemory-RL"), System(str(sft_nomem), "full", "NoMemory-SFT")]
        if ctl is not None:
            trained.append(System(str(ctl), "full", "NoMemory-RL, shuffled control"))
        summary = _evaluate(EvalSpec(trained, list(preset.eval_objectives), n=preset.eval_n, seed=eval_seed,
                                     budget=budget), out / "eval")
        # The same policies sampled at the training temperature: what DCPO's reward measured.
        sampled = [System(x.policy, x.strategy, f"{x.name} (T=1)") for x in trained]
        _evaluate(EvalSpec(sampled, [1], n=preset.eval_n, seed=eval_seed, budget=budget,
                           sampling=SamplingParams(temperature=1.0)), out / "eval_sampled")
        f_fixed.result()
    fixed_rows = json.loads((out / "eval_fixed" / "summary.json").read_text())
    summary += fixed_rows
    with open(out / "eval" / "episodes.jsonl", "a") as f:  # one file of episodes for the report's pairing
        f.write((out / "eval_fixed" / "episodes.jsonl").read_text())
        f.write((out / "eval_sampled" / "episodes.jsonl").read_text())
    sampled_rows = json.loads((out / "eval_sampled" / "summary.json").read_text())
    shutil.rmtree(out / "eval_fixed")
    shutil.rmtree(out / "eval_sampled")
    (out / "eval" / "summary.json").write_text(json.dumps(summary + sampled_rows, indent=1))
    clock.mark("evaluation of every policy (fixed systems on one core, trained ones on the other)")

    curves = _plot_training(out)
    wall = time.time() - clock.t0
    learned = ["| policy | against | K | accuracy (start) | accuracy change, paired | reward (start) "
               "| reward change, paired | penalised episodes (start) | tasks |", "|---|---|---|---|---|---|---|---|---|"]
    pairs = [("NoMemory-SFT", "untrained (warm-up)"), ("NoMemory-RL", "NoMemory-SFT"),
             ("NoMemory-RL (T=1)", "NoMemory-SFT (T=1)"), ("MemAct-SFT", "untrained (warm-up)")]
    if ctl is not None:
        pairs[3:3] = [("NoMemory-RL, shuffled control", "NoMemory-SFT"),
                      ("NoMemory-RL, shuffled control (T=1)", "NoMemory-SFT (T=1)")]
    for name, start in pairs:
        learned += [f"| {name} | {start} | {c['k']} | {c['accuracy']:.3f} ({c['start_accuracy']:.3f}) | "
                    f"{c['d_accuracy']:+.3f} +- {c['se_accuracy']:.3f} | {c['reward']:.3f} ({c['start_reward']:.3f}) | "
                    f"{c['d_reward']:+.3f} +- {c['se_reward']:.3f} | {c['penalised']:.3f} ({c['start_penalised']:.3f}) "
                    f"| {c['n']} |" for c in _paired(out, name, start)]
    dcpo_lines = [
        f"DCPO: {preset.dcpo_steps} steps at K = 1 and 2 (both in every step) without the memory tool from "
        "NoMemory-SFT, lr 3e-4, "
        f"{preset.dcpo_prompts} prompts x {preset.dcpo_n_traj} trajectories a step, temperature 1.0, dynamic "
        "sampling (groups whose rewards are all equal dropped and replaced). Beside it, the shuffled control: the "
        "same run with the advantages permuted within each group, an update of the same size without signal "
        "(docs/training.md, \"Controls\"; benchmarks/rl_controls.py runs both over seeds).", "",
        *[_curve_line(label, _rows(out / run / "metrics.jsonl"))
          for run, label in (("dcpo", "DCPO"), ("dcpo_shuffled", "Shuffled control")) if (out / run).exists()],
    ]
    stage_lines = "\n".join(f"| {name} | {secs:.0f} |" for name, secs in clock.stages)
    preamble = "\n".join([
        f"`memact demo --preset {args.preset}`: wall time {wall / 60:.1f} min on this machine.",
        "",
        f"Start: the tiny model ({parameters:,} parameters) after the copy warm-up that ships with the package "
        "(`memact/assets/tiny_warm/ASSET.md`: its command, seed and recall), since the warm-up does not fit the "
        f"demo's time. SFT data: {data_nomem['trajectories']} scripted trajectories without memory (K "
        f"{'/'.join(map(str, preset.nomem_tasks))}), {data_mem['trajectories']} with memory actions (K "
        f"{'/'.join(map(str, preset.mem_tasks))}; expert reward {data_mem['reward_mean']:.2f}). Evaluation: "
        f"{preset.eval_n} held-out tasks per K, the same for every system, greedy, step budget "
        f"{preset.eval_max_steps}.",
        "",
        "## What was learned", "",
        "Accuracy against the policy each one started from, task by task on the same held-out tasks "
        "(+- the standard error of the paired change: the evaluation's own noise).", "",
        *learned, "",
        *dcpo_lines, "",
        "MemAct-SFT has learned the format of the memory tool in this time, not its use: its prunes name "
        "record ids that do not exist and its episodes run out of context. Pruning right takes hours of one "
        "core (docs/reproduce.md); the scripted expert shows what the memory tool allows under this budget.",
        "",
        "| stage | seconds |", "|---|---|", stage_lines,
        "",
        *[f"![training curves]({c})" for c in curves],
    ])
    report = write_report(summary, out, title="memact demo", preamble=preamble)
    print(f"[demo] wrote {report} ({wall / 60:.1f} min)", file=sys.stderr)
    return 0
