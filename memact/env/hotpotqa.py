"""HotpotQA-format data as multi-objective tasks (the way MEM1 and MemAct built them).

A local JSON or parquet file in the HotpotQA schema (``_id``, ``question``, ``answer``,
``supporting_facts``, ``context`` as ``[title, sentences]`` pairs, or the Hugging Face
layout ``{"title": [...], "sentences": [[...]]}``) is loaded through ``datasets``. K
questions are joined into one task with answers ``{"Q1": ..., "QK": ...}``, and the
retrieval corpus is built from the data's own paragraphs (one document per title),
searched with bm25s like the synthetic task.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from memact.env.task import SubQuestion, Task

REQUIRED = ("_id", "question", "answer", "context")


def _pairs(context: Any) -> list[tuple[str, list[str]]]:
    """``[title, sentences]`` pairs from either layout of the ``context`` field."""
    if isinstance(context, dict):
        return list(zip(context["title"], context["sentences"]))
    return [(str(title), list(sentences)) for title, sentences in context]


def _titles(supporting: Any) -> list[str]:
    if isinstance(supporting, dict):
        return [str(t) for t in supporting.get("title", [])]
    return [str(item[0]) for item in supporting or []]


def load_hotpotqa(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local HotpotQA-format file (.json, .jsonl or .parquet), validated."""
    from datasets import load_dataset

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"HotpotQA file {str(path)!r} does not exist")
    kind = "parquet" if path.suffix == ".parquet" else "json"
    ds = load_dataset(kind, data_files=str(path), split="train")
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: not in the HotpotQA schema, missing column(s) {', '.join(missing)}")
    rows = []
    for i, row in enumerate(ds):
        try:
            pairs = _pairs(row["context"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: row {i} ({row.get('_id')}): bad 'context' field: {err}") from None
        rows.append({"_id": str(row["_id"]), "question": str(row["question"]), "answer": str(row["answer"]),
                     "supporting_titles": _titles(row.get("supporting_facts")), "context": pairs})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def build_corpus(rows: list[dict[str, Any]]) -> list[str]:
    """One document per distinct title: ``"Title: sentence sentence ..."``."""
    seen: dict[str, str] = {}
    for row in rows:
        for title, sentences in row["context"]:
            if title not in seen:
                seen[title] = f"{title}: {''.join(sentences).strip()}"
    return list(seen.values())


def make_hotpot_tasks(rows: list[dict[str, Any]], k: int, n: int, seed: int = 0,
                      corpus: list[str] | None = None) -> list[Task]:
    """``n`` tasks of ``k`` distinct questions each, drawn with a seeded RNG.

    All tasks share one corpus (the same list object, so its search index is built once).
    """
    if k > len(rows):
        raise ValueError(f"k={k} questions per task but the file has only {len(rows)} rows")
    corpus = corpus if corpus is not None else build_corpus(rows)
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        picked = rng.sample(rows, k)
        questions = [
            SubQuestion(key=f"Q{j + 1}", text=r["question"], answer=r["answer"], query=r["question"],
                        supporting=r["supporting_titles"])
            for j, r in enumerate(picked)
        ]
        tasks.append(Task(task_id=f"hotpot-k{k}-s{seed}-{i}", questions=questions, documents=corpus,
                          source="hotpotqa"))
    return tasks
