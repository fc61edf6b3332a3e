"""Experiment histories for the memory policy's history tasks (``memact.env.history``), made on
the surrogate template in process: the context-reading proposer sees the whole history (no
memory, no budget), so the logs are those of a run that forgot nothing.

    memact research histories --out runs/histories.jsonl --runs 40 --experiments 60 --seed 0
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from memact.env.history import experiment_line
from memact.research.history import diff_summary
from memact.research.proposers import ContextProposer, constant_values, find_constants
from memact.research.results import baseline_best, noise_margin, should_keep
from memact.research.workspace import template_dir
from memact.util.seeds import derive_seed

BASELINE_RUNS = 3


@functools.cache
def _surrogate() -> Any:
    """The surrogate template's prepare.py (its response surface), loaded once."""
    path = os.path.join(template_dir("surrogate"), "prepare.py")
    spec = importlib.util.spec_from_file_location("memact_surrogate_prepare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_history(seed: int, experiments: int) -> dict[str, Any]:
    """One run: the baseline (3 repeats for the noise margin), then ``experiments`` proposals, each
    run on the surface and kept when it beats the best by more than the margin."""
    if experiments < 1:
        raise ValueError(f"experiments must be >= 1, got {experiments}")
    prepare = _surrogate()
    template_source = Path(template_dir("surrogate"), "train.py").read_text(encoding="utf-8")
    best_source = template_source
    constants = {name: c[3] for name, c in find_constants(best_source).items()}
    baseline = [prepare.evaluate(constants, f"{seed}-base-{i}")[0] for i in range(BASELINE_RUNS)]
    best, margin = baseline_best(baseline), noise_margin(baseline)
    proposer = ContextProposer(seed)
    lines: list[str] = []
    rows = []
    for n in range(1, experiments + 1):
        proposal = proposer.propose("\n".join(lines), best_source, n)
        values = {name: c[3] for name, c in find_constants(proposal.new_source).items()}
        bpb, _ = prepare.evaluate(values, f"{seed}-{n}")
        status = "crash" if bpb is None else ("keep" if should_keep(bpb, best, margin) else "discard")
        diff = diff_summary(best_source, proposal.new_source)
        rows.append({"experiment": n, "status": status, "val_bpb": None if bpb is None else round(bpb, 6),
                     "description": proposal.description, "diff": diff})
        lines.append(experiment_line(n, status, bpb, proposal.description, diff))
        if status == "keep":
            best, best_source = bpb, proposal.new_source
    return {"id": f"surrogate-s{seed}", "baseline": constant_values(template_source),
            "baseline_bpb": round(baseline_best(baseline), 6), "experiments": rows}


def write_histories(out: str | os.PathLike, runs: int, experiments: int, seed: int) -> list[dict[str, Any]]:
    """``runs`` histories (run i from the ``history`` seed stream of ``seed``) as JSONL at ``out``."""
    made = [make_history(derive_seed(seed, "history", i), experiments) for i in range(runs)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for run in made:
            f.write(json.dumps(run) + "\n")
    return made
