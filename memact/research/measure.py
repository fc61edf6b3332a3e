"""What a research run found, read from its workspace: the numbers a memory is compared by
(benchmarks/research_memory.py, docs/research.md "Measuring a memory")."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

from memact.env.history import change_key
from memact.research.workspace import CONTEXT_FILE, RESULTS_FILE


def measure_workspace(workdir: str | os.PathLike, target: float | None = None) -> dict[str, Any]:
    """From ``results.tsv`` and ``context.tsv``: the best val_bpb, the experiment that first
    reached ``target``, the share of experiments that repeat an earlier one (the same change of
    the same best train.py: the same configuration run again), crashes, the context tokens
    per experiment, and the memory's prunes (``fallbacks``: those the heuristic made for a policy)."""
    with open(os.path.join(workdir, RESULTS_FILE), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    baseline = [r for r in rows if r["description"].startswith("baseline run")]
    experiments = [r for r in rows if not r["description"].startswith("baseline run")]
    base = baseline[0]["commit"] if baseline else ""
    seen: set = set()
    repeats, best, reached, curve = 0, math.inf, None, []
    for i, r in enumerate(experiments, 1):
        key = (base, change_key(r["description"]))
        repeats += key in seen
        seen.add(key)
        if r["status"] == "keep":
            base = r["commit"]
        if r["val_bpb"] and r["status"] != "crash":
            best = min(best, float(r["val_bpb"]))
        curve.append(best)
        if reached is None and target is not None and best <= target:
            reached = i
    with open(os.path.join(workdir, CONTEXT_FILE), newline="", encoding="utf-8") as f:
        context = list(csv.DictReader(f, delimiter="\t"))
    tokens = [int(c["context_tokens"]) for c in context]
    actions = [c["memory_action"] for c in context]
    return {"best": best, "reached": reached, "repeat_share": repeats / max(len(experiments), 1),
            "repeats": repeats, "crashes": sum(r["status"] == "crash" for r in experiments),
            "experiments": len(experiments), "context_mean": sum(tokens) / max(len(tokens), 1),
            "context_max": max(tokens, default=0), "curve": curve, "context_curve": tokens,
            "prunes": sum(pruned_context(a) for a in actions),
            "fallbacks": sum(pruned_context(a.split("fallback", 1)[1]) for a in actions if "fallback" in a)}


def pruned_context(action: str) -> bool:
    """Whether a logged memory action (``context.tsv``) changed the context: a policy's or the
    heuristic's prune, a window's drop."""
    return any(word in action for word in ("deleted", "folded", "dropped"))
