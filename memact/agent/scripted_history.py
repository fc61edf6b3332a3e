"""The scripted expert of history tasks (``memact.env.history``): the heuristic memory of the
research agent, written as turns a model can imitate.

It reads results with ``next_experiment`` while it holds fewer than ``hold`` experiment records;
then it calls ``prune_context``: it keeps the last ``keep_last`` records and folds every other
record, earlier notes included, into one note that copies, as compact experiment lines
(``exp N STATUS val_bpb=X | change |``), what the next proposal needs: the last ``keep_kept`` kept
changes (the directions that helped), the least extreme crash of each constant and direction (the last
``KEEP_CRASHED`` of them),
and the last ``keep_tried`` discarded changes that could be proposed again from the current best.
Changes made from an older best are dropped, and the oldest entries while the note is longer
than ``MAX_NOTE_CHARS``. It sees only the decoded prompt, as a model would.
"""

from __future__ import annotations

from memact.agent.scripted import parse_prompt
from memact.env.history import MOVE_RE, Experiment, baseline_of, current_config, direction, experiments_in
from memact.models.chatml import call_text

HOLD = 3
NEVER = 10**9  # hold this many records: the no-memory variant
KEEP_LAST = 1
KEEP_KEPT = 3
KEEP_TRIED = 3
KEEP_CRASHED = 3
MAX_NOTE_CHARS = 400  # 313 tokens of the tiny tokenizer for 400 characters of compact lines: the call fits 512


class HistoryExpert:
    """Call it with a decoded prompt of a history task to get the next assistant turn."""

    def __init__(self, hold: int = HOLD, keep_last: int = KEEP_LAST, keep_kept: int = KEEP_KEPT,
                 keep_tried: int = KEEP_TRIED):
        if not 0 <= keep_last < hold:
            raise ValueError(f"keep_last must be in [0, hold), got keep_last={keep_last} hold={hold}")
        self.hold, self.keep_last, self.keep_kept, self.keep_tried = hold, keep_last, keep_kept, keep_tried

    @property
    def memory(self) -> bool:
        """Whether it prunes (the no-memory variant holds every record)."""
        return self.hold < NEVER

    def __call__(self, prompt: str) -> str:
        task_text, records = parse_prompt(prompt)
        exps = [r for r in records if r.tool == "next_experiment" and experiments_in(r.response)]
        if len(exps) < self.hold:
            return call_text("next_experiment", {})
        kept = exps[-self.keep_last:] if self.keep_last else []
        folded = [r for r in records if r not in kept]
        entries: dict[int, Experiment] = {}
        for r in folded:
            text = str(r.arguments.get("memory", "")) if r.tool == "prune_context" else r.response
            entries.update((e.experiment, e) for e in experiments_in(text))
        visible = {**entries, **{e.experiment: e for r in kept for e in experiments_in(r.response)}}
        config = current_config(baseline_of(task_text), [visible[n] for n in sorted(visible)])
        keep, crash, tried = [], {}, []
        for n in sorted(entries):
            e = entries[n]
            moves = MOVE_RE.findall(e.description)
            if e.status == "keep":
                keep.append(n)
            elif e.status == "crash" and moves:  # the least extreme crash of each constant and direction
                name, old, new = moves[0]
                up = direction(old, new) or 0
                best = crash.get((name, up))
                if best is None or (float(new) < float(best[1]) if up > 0 else float(new) > float(best[1])):
                    crash[(name, up)] = (n, new)
            elif moves and all(config.get(k) == old for k, old, _ in moves):
                tried.append(n)
        crashed = sorted(n for n, _ in crash.values())[-KEEP_CRASHED:]
        note = [entries[n].compact() for n in sorted(keep[-self.keep_kept:] + crashed + tried[-self.keep_tried:])]
        while len(" ".join(note)) > MAX_NOTE_CHARS and len(note) > 1:
            note.pop(0)  # the oldest entries go first
        return call_text("prune_context", {"memory": " ".join(note) or "nothing to keep",
                                           "delete_ids": [r.record_id for r in folded]})
