"""progress.png and context.png of a research workspace (matplotlib, Agg backend).

Both are drawn from files alone (results.tsv, state.json), so `memact research plot DIR`
can redraw them at any time, also while a run is going on.
"""

from __future__ import annotations

import os

from memact.research import workspace as ws
from memact.research.measure import pruned_context
from memact.research.results import read_json, read_results


def write_plots(workdir: str) -> list[str]:
    """Draw progress.png (and context.png when the state has a context log); return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_results(os.path.join(workdir, ws.RESULTS_FILE))
    if not rows:
        raise FileNotFoundError(f"no results rows in {os.path.join(workdir, ws.RESULTS_FILE)}: nothing to plot")
    state_path = os.path.join(workdir, ws.STATE_FILE)
    state = read_json(state_path) if os.path.exists(state_path) else {}
    written = [_progress(plt, workdir, rows, state)]
    if state.get("context_log"):
        written.append(_context(plt, workdir, state))
    return written


def _progress(plt, workdir: str, rows, state: dict) -> str:
    """val_bpb per experiment: baseline (blue), kept (green), discarded (grey), crashes (red) and the best."""
    baseline = [r.val_bpb for r in rows if r.is_baseline and r.val_bpb is not None]
    experiments = [r for r in rows if not r.is_baseline]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.scatter([0] * len(baseline), baseline, color="tab:blue", s=30, label=f"baseline runs ({len(baseline)})", zorder=3)
    good = [r.val_bpb for r in rows if r.val_bpb is not None]
    crash_y = max(good) if good else 1.0
    styles = {
        "keep": dict(color="tab:green", s=60, marker="o", label="kept"),
        "discard": dict(color="0.6", s=30, marker="o", label="discarded"),
        "crash": dict(color="tab:red", s=50, marker="x", label="crash (plotted at the top)"),
    }
    for status, style in styles.items():
        xs = [i for i, r in enumerate(experiments, start=1) if r.status == status]
        ys = [r.val_bpb if r.val_bpb is not None else crash_y for i, r in enumerate(experiments, 1) if r.status == status]
        if xs:
            ax.scatter(xs, ys, zorder=3, **style)
    if baseline:  # running best: the baseline mean, then each kept value
        best = sum(baseline) / len(baseline)
        steps_x, steps_y = [0], [best]
        for i, r in enumerate(experiments, start=1):
            if r.status == "keep" and r.val_bpb is not None:
                best = r.val_bpb
            steps_x.append(i)
            steps_y.append(best)
        ax.step(steps_x, steps_y, where="post", color="tab:green", lw=1.5, label="best so far")
        margin = state.get("margin")
        if margin:
            lower = [y - margin for y in steps_y]
            ax.fill_between(steps_x, lower, steps_y, step="post", color="tab:green", alpha=0.12,
                            label=f"noise margin {margin:.4f}: keep only below")
    ax.set_xlabel("experiment (0 = baseline)")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title(f"research progress: {os.path.basename(os.path.abspath(workdir))}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = os.path.join(workdir, ws.PROGRESS_PLOT)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _context(plt, workdir: str, state: dict) -> str:
    """Context tokens over experiments with the run's memory policy and without any pruning."""
    log = state["context_log"]
    xs = [row[0] for row in log]
    config = state.get("config", {})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(xs, [row[2] for row in log], color="0.5", ls="--", marker=".", label="without memory (none)")
    ax.plot(xs, [row[1] for row in log], color="tab:purple", marker="o", ms=4,
            label=f"with memory ({config.get('memory', '?')})")
    pruned = [(row[0], row[1]) for row in log if pruned_context(row[3])]
    if pruned:
        ax.scatter(*zip(*pruned), color="tab:purple", marker="v", s=60, zorder=3, label="memory pruned")
    refused = [(row[0], row[1]) for row in log if "error" in row[3] and not pruned_context(row[3])]
    if refused:
        ax.scatter(*zip(*refused), color="tab:red", marker="x", s=50, zorder=3, label="policy call refused, nothing pruned")
    if config.get("context_budget"):
        ax.axhline(config["context_budget"], color="tab:red", lw=1, label=f"budget {config['context_budget']}")
    ax.set_xlabel("experiment (0 = baseline)")
    ax.set_ylabel("context length (proxy tokens)")
    ax.set_title("proposer context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = os.path.join(workdir, ws.CONTEXT_PLOT)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
