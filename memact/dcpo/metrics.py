"""Step metrics to the console (progress bar + a compact table), ``metrics.jsonl``, W&B and TensorBoard.

Only rank 0 logs. Every row of ``metrics.jsonl`` is one step: flat ``name: number`` pairs
plus ``step``; the names are explained in docs/training.md.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memact.dcpo.config import Config, to_yaml
from memact.dcpo.data import MicroBatch, TrainSequence
from memact.dcpo.distributed import DistInfo
from memact.trajectory import Segment, Trajectory, trajectory_columns, trajectory_stats
from memact.util.files import atomic_write_text
from memact.util.stats import mean, std

# Shown in the console table, in this order (everything goes to the JSONL file).
TABLE_KEYS = (
    "reward_mean", "reward_std", "accuracy", "groups_dropped_frac", "adv_abs_mean", "grad_snr", "loss", "clip_fraction", "kl", "entropy",
    "grad_norm", "logprob_mismatch_mean", "logprob_mismatch_max", "segments_per_traj", "context_mean",
    "context_peak", "rollout_tok_s", "update_tok_s", "step_s",
)


class MetricsLogger:
    """Writes step rows; a no-op on ranks other than 0.

    Args:
        run_dir: where ``metrics.jsonl`` (and ``tb/``, ``wandb/``) go.
        cfg: the run's config (sent to W&B, and sets which sinks are on).
        is_main: rank 0.
        first_step: the step this run starts at. A resumed run (``first_step > 0``) keeps the
            rows of the steps before it and drops the rest (rows written after the checkpoint
            it resumes from, a row cut short by a kill), so that every step has one row; a run
            from step 0 into a directory that has rows moves them to ``NAME.old`` first.
    """

    def __init__(self, run_dir: Path, cfg: Config, is_main: bool = True, name: str = "metrics.jsonl",
                 first_step: int = 0):
        self.enabled = is_main
        self.table_every = cfg.logging.table_every
        self._rows: list[dict[str, Any]] = []
        self._file = None
        self._wandb = None
        self._tb = None
        self.console = None  # set to a progress bar's console so tables print above the bar
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / name
        if path.exists() and path.stat().st_size:
            if first_step > 0:
                _keep_rows_before(path, first_step)
            else:
                old = path.with_name(name + ".old")
                os.replace(path, old)
                print(f"[memact] warning: {str(path)!r} held the rows of an earlier run; moved them to "
                      f"{str(old)!r} (a run from step 0 starts its own)", file=sys.stderr, flush=True)
        self._file = open(path, "a", encoding="utf-8")
        if cfg.logging.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
            self._wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir),
                                     config=_yaml_dict(cfg), name=run_dir.name)
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("logging.tensorboard=true needs the tensorboard package "
                                   "(pip install tensorboard)") from err
            self._tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}  # tensors -> numbers
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = int(row.get("step", len(self._rows)))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if _is_number(v)}, step=step)
        if self._tb is not None:
            for k, v in row.items():
                if _is_number(v):
                    self._tb.add_scalar(k, v, step)
        self._rows.append(row)
        if self.table_every and len(self._rows) % self.table_every == 0:
            self.print_table(self._rows[-self.table_every:])

    def print_table(self, rows: list[dict[str, Any]]) -> None:
        """A compact table of the last few steps: one column per step."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title="DCPO steps", title_justify="left", show_edge=False, pad_edge=False)
        table.add_column("metric")
        for r in rows:
            table.add_column(str(int(r.get("step", 0))), justify="right")
        for key in TABLE_KEYS:
            if any(key in r for r in rows):
                table.add_row(key, *(_fmt(r.get(key)) for r in rows))
        (self.console or Console(file=sys.stderr)).print(table)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _keep_rows_before(path: Path, first_step: int) -> None:
    """Rewrite ``path`` (atomically) with only its whole rows whose step is below ``first_step``."""
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row["step"]) < first_step
        except (ValueError, KeyError, TypeError):
            keep = False  # a row cut short by a kill, or not a row at all
        if keep:
            kept.append(line)
        else:
            dropped += line.strip() != ""
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        print(f"[memact] resuming at step {first_step}: dropped {dropped} rows of {str(path)!r} written after "
              "the checkpoint (or cut short), so that every step has one row", file=sys.stderr, flush=True)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


def _yaml_dict(cfg: Config) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(to_yaml(cfg))


class StepBar:
    """A rich progress bar over steps on stderr; every method is a no-op when disabled."""

    def __init__(self, total: int, enabled: bool, description: str, completed: int = 0):
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=Console(file=sys.stderr))
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, completed=completed, info="")

    @property
    def console(self):
        """The bar's console (print through it so output lands above the bar), or None."""
        return self._bar.console if self._bar is not None else None

    def update(self, completed: int, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=info)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ----------------------------------------------------------------------------- a DCPO step's row


@dataclass
class UpdateStats:
    loss: float = 0.0
    pg_loss: float = 0.0
    clipped_tokens: int = 0
    kl_sum: float = 0.0
    entropy_sum: float = 0.0
    ratio_max: float = 0.0
    tokens: int = 0  # trained tokens, summed over optimizer steps
    fed_tokens: int = 0  # real tokens through forward+backward
    grad_norms: list[float] | None = None
    optimizer_steps: int = 0
    micro_batches: int = 0
    push_s: float = 0.0  # wall time of the weight push after the update
    tis_weight_sum: float = 0.0  # truncated importance weights over the step's trained tokens
    tis_truncated: int = 0  # tokens whose weight hit dcpo.tis_cap
    tis_tokens: int = 0
    grad_snr: float | None = None  # logging.grad_snr, before the update


def step_metrics(step: int, trajs: list[Trajectory], traj_adv: torch.Tensor, segments: list[list[Segment]],
                 seqs: list[TrainSequence], minis: list[list[MicroBatch]], stats: UpdateStats, lr: float,
                 t_rollout: float, t_update: float, t_step: float, dist: DistInfo | None = None,
                 drawn: dict[str, Any] | None = None) -> dict[str, float]:
    """One row of metrics.jsonl (names explained in docs/training.md), over every rank's
    trajectories and updates (rank 0's wall times). ``drawn``: what the step rolled out,
    dropped groups included (``memact.dcpo.trainer.Drawn.summary``); None: ``trajs``."""
    diffs = [mb.rollout_logprobs[mb.loss_mask] - mb.old_logprobs[mb.loss_mask] for mbs in minis for mb in mbs]
    diff = torch.cat(diffs).abs() if diffs else torch.zeros(0)
    part = {  # this rank's share: lists are concatenated over ranks, numbers summed (maxima: max)
        **trajectory_columns(trajs),
        "adv": traj_adv.tolist(),
        "segments": [len(s) for s in segments],
        "segments_trained": len(seqs),
        "loss": stats.loss,  # each rank's share of the step's globally normalised loss
        "pg_loss": stats.pg_loss,
        "clipped_tokens": stats.clipped_tokens,
        "kl_sum": stats.kl_sum,
        "entropy_sum": stats.entropy_sum,
        "tokens": stats.tokens,
        "fed_tokens": stats.fed_tokens,
        "micro_batches": stats.micro_batches,
        "diff_sum": float(diff.sum()),
        "diff_n": diff.numel(),
        "diff_max": float(diff.max()) if diff.numel() else 0.0,
        "ratio_max": stats.ratio_max,
        "tis_weight_sum": stats.tis_weight_sum,
        "tis_truncated": stats.tis_truncated,
        "tis_tokens": stats.tis_tokens,
        "seq_trained_tokens": sum(s.n_trained for s in seqs),
        **(drawn or {"groups_drawn": len(set(s.group for s in seqs)), "groups_uniform": 0, "groups_dropped": 0,
                     "groups_failed": 0,
                     "draws_max": 1, "prompt_prefilled": 0, "prompt_reused": 0, "drawn_reward": [t.reward for t in trajs],
                     "drawn_gen_tokens": sum(len(c.output_ids) for t in trajs for c in t.calls)}),
    }
    a = gather_parts(part, dist or DistInfo(0, 1, 0))
    adv, tokens = a["adv"], max(a["tokens"], 1)
    traj = trajectory_stats(a)  # reads the trajectory columns of the gathered parts
    row = {
        "step": step,
        "reward_mean": traj["reward_mean"],
        "rollout_reward_mean": mean(a["drawn_reward"]),
        "reward_std": traj["reward_std"],
        "accuracy": traj["accuracy"],
        "adv_mean": mean(adv),
        "adv_std": std(adv),
        "adv_abs_mean": mean([abs(x) for x in adv]),
        "adv_zero_frac": mean([float(x == 0) for x in adv]),
        "loss": a["loss"],
        "pg_loss": a["pg_loss"],
        "clip_fraction": a["clipped_tokens"] / tokens,
        "ratio_max": a["ratio_max"],
        "kl": a["kl_sum"] / tokens,
        "entropy": a["entropy_sum"] / tokens,
        "grad_norm": mean(stats.grad_norms or []),  # already global
        "lr": lr,  # the rate of this step's first update
        "logprob_mismatch_mean": a["diff_sum"] / a["diff_n"] if a["diff_n"] else 0.0,
        "logprob_mismatch_max": a["diff_max"],
        "tis_weight_mean": a["tis_weight_sum"] / max(a["tis_tokens"], 1),
        "tis_truncated_frac": a["tis_truncated"] / max(a["tis_tokens"], 1),
        "segments_per_traj": mean(a["segments"]),
        "segments_trained": a["segments_trained"],
        "micro_batches": a["micro_batches"],
        "optimizer_steps": stats.optimizer_steps,
        "trained_tokens": a["tokens"],
        "trained_token_share": a["seq_trained_tokens"] / max(traj["gen_tokens"], 1),
        "groups_drawn": a["groups_drawn"],
        "groups_uniform_frac": a["groups_uniform"] / max(a["groups_drawn"], 1),
        "groups_dropped_frac": a["groups_dropped"] / max(a["groups_drawn"], 1),
        "groups_failed_frac": a["groups_failed"] / max(a["groups_drawn"], 1),
        "rollout_draws": a["draws_max"],
        "prompt_reused_frac": a["prompt_reused"] / max(a["prompt_reused"] + a["prompt_prefilled"], 1),
        "context_mean": traj["context_mean"],
        "context_peak": traj["context_peak_max"],
        "memory_actions": traj["memory_actions"],
        "overflow_rate": traj["overflow_rate"],
        "turns": traj["steps"],
        "rollout_tok_s": a["drawn_gen_tokens"] / max(t_rollout, 1e-9),
        "update_tok_s": a["fed_tokens"] / max(t_update, 1e-9),
        "rollout_s": t_rollout,
        "update_s": t_update,
        "push_s": stats.push_s,
        "step_s": t_step,
    }
    if stats.grad_snr is not None:
        row["grad_snr"] = stats.grad_snr
    return row


def gather_parts(part: dict[str, Any], dist: DistInfo) -> dict[str, Any]:
    """Every rank's ``part`` combined: lists concatenated, ``*_max`` by max, other numbers summed."""
    if dist.world_size == 1:
        return part
    parts: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, part)
    out: dict[str, Any] = {}
    for key, value in part.items():
        values = [p[key] for p in parts]
        if isinstance(value, list):
            out[key] = [x for v in values for x in v]
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values)
    return out
