"""Markdown tables and plots of an evaluation summary (the paper's table and figure)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any


def system_name(row: dict[str, Any], with_budget: bool = False) -> str:
    name = f"{row['policy']} [{row['strategy']}]"
    return f"{name} @ {row['context_budget']}" if with_budget and "context_budget" in row else name


def budgets(summary: list[dict[str, Any]]) -> list[int]:
    """The context budgets of an evaluation, smallest first (one unless it swept budgets)."""
    return sorted({r["context_budget"] for r in summary if "context_budget" in r})


def by_system(summary: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Rows by system and K; a system at each budget of a sweep is a system of its own."""
    sweep = len(budgets(summary)) > 1
    systems: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in summary:
        systems[system_name(row, sweep)][row["k"]] = row
    return systems


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The paper's shape: accuracy per K, the average, and the cost in total tokens per task."""
    ks = sorted({r["k"] for r in summary})
    head = ["system", *[f"K={k}" for k in ks], "avg", "tokens/task", "mean ctx", "peak ctx", "mem actions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in by_system(summary).items():
        accs = [rows[k]["accuracy"] if k in rows else None for k in ks]
        present = [rows[k] for k in ks if k in rows]
        def avg(key: str, present=present) -> float:
            return sum(r[key] for r in present) / len(present)

        cells = [name, *[f"{a:.3f}" if a is not None else "-" for a in accs], f"{avg('accuracy'):.3f}",
                 f"{avg('total_tokens'):.0f}", f"{avg('mean_context'):.0f}", f"{avg('peak_context'):.0f}",
                 f"{avg('memory_actions'):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(summary: list[dict[str, Any]]) -> str:
    cols = ["accuracy", "f1", "all_correct", "mean_context", "peak_context", "total_tokens", "memory_actions",
            "steps", "overflow"]
    lines = ["| system | K | n | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    sweep = len(budgets(summary)) > 1
    for r in summary:
        cells = [system_name(r, sweep), str(r["k"]), str(r["n"])]
        cells += [f"{r[c]:.3f}" if isinstance(r[c], float) and r[c] < 10 else f"{r[c]:.0f}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(summary: list[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """``accuracy_vs_k.png`` (a line per system) and ``accuracy_vs_cost.png`` (a point per system)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    systems = by_system(summary)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rows in systems.items():
        ks = sorted(rows)
        ax.plot(ks, [rows[k]["accuracy"] for k in ks], marker="o", label=name)
    ax.set_xlabel("objectives per task (K)")
    ax.set_ylabel("accuracy (share of sub-questions)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p1 = out / "accuracy_vs_k.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rows in systems.items():
        cost = sum(r["total_tokens"] for r in rows.values()) / len(rows)
        acc = sum(r["accuracy"] for r in rows.values()) / len(rows)
        ax.scatter([cost], [acc], s=60)
        ax.annotate(name, (cost, acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.margins(x=0.25, y=0.1)
    ax.set_xlabel("cost: total tokens per task (mean over K)")
    ax.set_ylabel("average accuracy over K")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p2 = out / "accuracy_vs_cost.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def plot_budget_sweep(summary: list[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """For an evaluation at several context budgets: ``accuracy_vs_budget.png`` (a panel per K, a
    line per system over the budgets) and ``accuracy_vs_context.png`` (the same accuracy against
    the measured mean context, solid, and peak context, dashed, a marker per budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    ks = sorted({r["k"] for r in summary})
    systems: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in summary:
        systems[system_name(r)].append(r)
    paths = []
    for fname, xlabel in (("accuracy_vs_budget.png", "context budget (tokens)"),
                          ("accuracy_vs_context.png", "measured context (tokens): mean solid, peak dashed")):
        fig, axes = plt.subplots(1, len(ks), figsize=(3.6 * len(ks), 3.4), squeeze=False)
        for ax, k in zip(axes[0], ks):
            for i, (name, rows) in enumerate(systems.items()):
                cell = sorted((r for r in rows if r["k"] == k), key=lambda r: r["context_budget"])
                ys = [r["accuracy"] for r in cell]
                color = f"C{i % 10}"
                if fname == "accuracy_vs_budget.png":
                    ax.plot([r["context_budget"] for r in cell], ys, marker="o", color=color, label=name)
                else:
                    ax.plot([r["mean_context"] for r in cell], ys, marker="o", color=color, label=name)
                    ax.plot([r["peak_context"] for r in cell], ys, marker="^", ls="--", color=color, alpha=0.6)
            ax.set_title(f"K={k}")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_xscale("log", base=2)  # budgets double; a linear axis crowds the small ones
            if fname == "accuracy_vs_budget.png":
                bs = budgets(summary)
                ax.set_xticks(bs, [f"{b // 1024}K" if b % 1024 == 0 else str(b) for b in bs], fontsize=7)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy")
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def sweep_table(summary: list[dict[str, Any]]) -> str:
    """Accuracy, mean and peak context and overflow share per system, K and budget."""
    bs = budgets(summary)
    head = ["system", "K", *[f"{b}: acc / mean ctx / peak / overflow" for b in bs]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in summary:
        cells[(system_name(r), r["k"])][r["context_budget"]] = r
    for (name, k), by_b in cells.items():
        row = [name, str(k)]
        for b in bs:
            r = by_b.get(b)
            row.append(f"{r['accuracy']:.3f} / {r['mean_context']:.0f} / {r['peak_context']:.0f} / "
                       f"{r['overflow']:.2f}" if r else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(summary: list[dict[str, Any]], out_dir: str | os.PathLike, title: str = "Evaluation",
                 preamble: str = "") -> Path:
    """``REPORT.md`` with the table, the details and the two plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_summary(summary, out)
    text = [f"# {title}", "", preamble, "", "## Accuracy per K and cost", "", markdown_table(summary), "",
            "Accuracy: mean share of sub-questions answered exactly. tokens/task: input + output tokens over all "
            "calls of a task (the paper's cost). ctx: prompt tokens per step.", "",
            "![accuracy against K](accuracy_vs_k.png)", "", "![accuracy against cost](accuracy_vs_cost.png)", "",
            "## Details", "", detail_table(summary), ""]
    if len(budgets(summary)) > 1:
        plot_budget_sweep(summary, out)
        text[6:6] = ["## Accuracy against the context budget", "", sweep_table(summary), "",
                     "Each cell: accuracy / mean context / mean peak context / share of episodes that broke the "
                     "budget (penalised).", "", "![accuracy against the budget](accuracy_vs_budget.png)", "",
                     "![accuracy against the measured context](accuracy_vs_context.png)", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(text))
    return path
