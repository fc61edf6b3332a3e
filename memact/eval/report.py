"""Markdown tables and plots of an evaluation summary (the paper's table and figure)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any


def system_name(row: dict[str, Any]) -> str:
    return f"{row['policy']} [{row['strategy']}]"


def by_system(summary: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    systems: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in summary:
        systems[system_name(row)][row["k"]] = row
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
    for r in summary:
        cells = [system_name(r), str(r["k"]), str(r["n"])]
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
    path = out / "REPORT.md"
    path.write_text("\n".join(text))
    return path
