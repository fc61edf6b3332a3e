"""What a policy does with its memory, read from its trajectories (issue 8's "learned behaviour").

    HF_HUB_OFFLINE=1 .venv/bin/memact rollout --policy DIR -k 4 --n 50 --seed 11 --temperature 0 --out roll.jsonl
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/behaviour.py --tokenizer DIR roll.jsonl [more.jsonl ...] \
        [--examples 1] [--out behaviour.md]

Per K: how often the policy prunes (accepted prunes and invalid actions an episode, record ids
per prune, the context it keeps), what its notes hold (words, and the share of the answers found
so far that the last note states), and why episodes fail. Each failed episode gets every label
that applies, in the order the agent hit them:

- ``wrong query``: a search for an (attribute, entity) pair that no question asks, or a repeat;
- ``never searched``: a question the agent never searched for;
- ``bad prune``: a ``prune_context`` call the environment rejected, or any malformed turn;
- ``wrong note``: a note that states a wrong value for a question;
- ``wrong plan``: a note with a to-do list (``scripted-plan``'s format, ``; todo: Q3 gem of X; ...``)
  that is not the questions the note leaves unanswered, in order;
- ``overflow``: the context went over its budget; ``steps``: the step budget ran out;
- ``wrong answer``: a final answer with a wrong value although the right one was searched.

``--examples N`` prints the turns of N episodes of each failure kind.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from memact.agent.scripted import TODO

FAILURES = ("wrong query", "never searched", "bad prune", "wrong note", "wrong plan", "overflow", "steps",
            "wrong answer")
_TASK_ID = re.compile(r"^syn-k(\d+)-s(\d+)$")


def task_of(task_id: str):
    """The synthetic task a trajectory ran on, rebuilt from its id (``syn-k{K}-s{seed}``)."""
    from memact.env.task import make_task

    m = _TASK_ID.match(task_id)
    if not m:
        raise SystemExit(f"behaviour: task {task_id!r} is not a synthetic task (syn-kK-sSEED); only those are read")
    return make_task(int(m.group(2)), int(m.group(1)))


def turns(traj: dict, tokenizer) -> list[tuple[str, dict | None, str]]:
    """Every model turn: (its text, the parsed tool call or None, the prompt it saw)."""
    from memact.models.chatml import parse_action

    out = []
    for call in traj["calls"]:
        text = tokenizer.decode(call["output_ids"])
        action = parse_action(text)
        out.append((text, {"name": action.name, **action.arguments} if action.kind == "tool" else None,
                    tokenizer.decode(call["prompt_ids"])))
    return out


def note_values(note: str) -> dict[str, str]:
    """``"Q1: Belmira; Q2: walnuts"`` -> {"Q1": "Belmira", "Q2": "walnuts"} (what the scripted notes look like)."""
    return {k: v.strip() for k, v in re.findall(r"(Q\d+):\s*([^;]+)", note)}


def plan_ok(note: str, task) -> bool | None:
    """Whether a note's to-do list is the questions it leaves unanswered, in order (None: no to-do list)."""
    if TODO not in note:
        return None
    answered = note_values(note.split(TODO)[0])
    want = [f"{q.key} {q.query}" for q in task.questions if q.key not in answered]
    return [item.strip() for item in note.split(TODO, 1)[1].split(";")] == want


def query_error(query: str, task, searched: set[str]) -> str:
    """What is wrong with a wrong query, against the first question not searched yet."""
    if query in {q.query for q in task.questions}:
        return "repeat"
    todo = [q for q in task.questions if q.key not in searched]
    if not todo:
        return "extra"
    want = todo[0]
    attr, _, entity = query.partition(" of ")
    if entity == want.entity:
        return "attribute"
    if attr == want.attribute:
        return "entity"
    return "both"


def analyse(traj: dict, tokenizer) -> dict:
    task = task_of(traj["task_id"])
    gold = {q.key: q.answer for q in task.questions}
    asked = {q.query for q in task.questions}
    by_query = {q.query: q.key for q in task.questions}
    m = traj["metrics"]
    searched, notes, ids_per_prune, labels, queries = set(), [], [], [], []

    def label(kind: str) -> None:
        if kind not in labels:
            labels.append(kind)

    for text, call, prompt in turns(traj, tokenizer):
        if call is None:
            if "FINAL_ANSWER:" not in text:
                label("bad prune")  # a malformed turn
            continue
        if call["name"] == "search":
            query = str(call.get("query", ""))
            if query in asked and by_query[query] not in searched:
                searched.add(by_query[query])
            else:
                label("wrong query")  # no question asks it, or it repeats an earlier search
                queries.append(query_error(query, task, searched))
        elif call["name"] == "prune_context":
            ids = [str(i) for i in call.get("delete_ids") or []]
            ids_per_prune.append(len(ids))
            if not ids or any(i not in prompt for i in ids):
                label("bad prune")  # deletes a record the agent cannot see: the environment rejects it
            note = str(call.get("memory", ""))
            notes.append((note, set(searched)))
            if any(k in gold and v != gold[k] for k, v in note_values(note.split(TODO)[0]).items()):
                label("wrong note")
            if plan_ok(note, task) is False:
                label("wrong plan")
    if m.get("invalid_actions", 0):
        label("bad prune")
    if m.get("overflow"):
        label("overflow")
    answered = traj.get("answer") or {}
    if traj["reward"] < 1.0:
        if set(gold) - searched:
            label("never searched")
        if not m.get("answered") and not m.get("overflow"):
            label("steps")
        if any(answered.get(k) != v and k in searched for k, v in gold.items()) and m.get("answered"):
            label("wrong answer")
    # The last note against the questions searched before it (the agent answers after its last search).
    last, found = (note_values(notes[-1][0]), notes[-1][1]) if notes else ({}, set())
    held = sum(last.get(k) == gold[k] for k in found)
    return {"k": task.k, "reward": traj["reward"], "correct": sum(answered.get(k) == v for k, v in gold.items()),
            "prunes": m.get("memory_actions", 0), "invalid": m.get("invalid_actions", 0), "ids": ids_per_prune,
            "note_words": [len(n.split()) for n, _ in notes], "note_held": held, "note_found": len(found),
            "peak": m["peak_context_tokens"], "mean_ctx": m["mean_context_tokens"],
            "labels": labels if traj["reward"] < 1.0 else [], "query_errors": queries}


def report(rows: list[tuple[dict, dict]], tokenizer, examples: int) -> str:
    by_k: dict[int, list[dict]] = defaultdict(list)
    for _, r in rows:
        by_k[r["k"]].append(r)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    lines = ["| K | episodes | reward | sub-answers right | prunes / ep. | invalid / ep. | ids / prune | note words "
             "| last note holds answers found before it | context mean / peak | failed | " + " | ".join(FAILURES) + " |",
             "|" + "---|" * (11 + len(FAILURES))]
    for k in sorted(by_k):
        rs = by_k[k]
        ids = [x for r in rs for x in r["ids"]]
        words = [x for r in rs for x in r["note_words"]]
        failed = [r for r in rs if r["reward"] < 1.0]
        counts = Counter(lab for r in failed for lab in r["labels"])
        held, found = sum(r["note_held"] for r in rs), sum(r["note_found"] for r in rs)
        lines.append(
            f"| {k} | {len(rs)} | {mean([r['reward'] for r in rs]):.3f} | "
            f"{sum(r['correct'] for r in rs)}/{k * len(rs)} | {mean([r['prunes'] for r in rs]):.2f} | "
            f"{mean([r['invalid'] for r in rs]):.2f} | {mean(ids):.2f} | {mean(words):.1f} | "
            f"{held}/{found} | {mean([r['mean_ctx'] for r in rs]):.0f} / {mean([r['peak'] for r in rs]):.0f} | "
            f"{len(failed)} | " + " | ".join(str(counts[f]) for f in FAILURES) + " |")
    errors = Counter(e for _, r in rows for e in r["query_errors"])
    if errors:
        lines += ["", "Wrong queries, against the first question not searched yet: "
                  + ", ".join(f"{kind} {n}" for kind, n in errors.most_common())
                  + " (attribute: right entity, wrong attribute; entity: the other way round; repeat: an "
                  "earlier search again)."]
    if examples:
        shown: Counter = Counter()
        for traj, r in rows:
            if not r["labels"] or shown[r["labels"][0]] >= examples:
                continue
            shown[r["labels"][0]] += 1
            task = task_of(traj["task_id"])
            lines += ["", f"**{r['labels'][0]}** (all labels: {', '.join(r['labels'])}; {traj['task_id']}, reward "
                      f"{r['reward']:.2f}): " + "; ".join(f"{q.key} {q.query} = {q.answer}"
                                                          for q in task.questions), "", "```"]
            lines += [text.replace("<|im_end|>", "").strip().replace("\n", " ")[:220]
                      for text, _, _ in turns(traj, tokenizer)]
            lines.append("```")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rollouts", nargs="+", help="memact rollout JSONL files (with token ids)")
    parser.add_argument("--tokenizer", required=True, help="the policy's directory (its tokenizer decodes the turns)")
    parser.add_argument("--examples", type=int, default=1, help="episodes shown per failure kind")
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    trajs = []
    for path in args.rollouts:
        for i, line in enumerate(Path(path).read_text().splitlines()):
            traj = json.loads(line)
            if "calls" not in traj:
                raise SystemExit(f"behaviour: {path}:{i + 1} has no 'calls'; give memact rollout output, "
                                 "not memact eval's episodes.jsonl")
            trajs.append(traj)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = [(traj, analyse(traj, tokenizer)) for traj in trajs]
    text = report(rows, tokenizer, args.examples)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
