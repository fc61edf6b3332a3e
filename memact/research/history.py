"""The experiment history as working memory, and the memory policies that curate it.

Every experiment becomes a :class:`~memact.env.memory.Record` in a
:class:`~memact.env.memory.WorkingMemory`, with a record id from an
:class:`~memact.env.memory.IdSource` and a one-line text (id, outcome, description, diff
summary). The proposer's context is::

    program.md  +  best-so-far block  +  surviving records (experiments and notes)

When the context passes its token budget the memory policy acts, always through
``WorkingMemory.prune_context(memory_note, delete_ids)`` followed by a new note record
with a fresh id (so a later action can delete that note and fold it into a new one):

- ``heuristic``: keep the best experiment's record and the last ``keep_last`` experiment
  records, fold everything else (older notes included) into one note of running statistics;
- ``policy:MODEL_DIR``: after every experiment the served memact policy is shown the history as
  an episode of the history task it was trained on (``memact.env.history``) and answers
  ``next_experiment`` (read on) or ``prune_context``; a bad call, or reading on past the
  budget, falls back to the history expert (then the heuristic) and is logged;
- ``expert``: the history task's scripted expert, in process: it folds every 3 experiments into
  a note of compact experiment lines (what ``policy:scripted`` serves);
- ``none``: never prunes.
- ``window``: drops the oldest records, without a note, until the context fits the budget.

Token counts use a proxy, since no tokenizer is involved here: the number of words and
punctuation marks (regex ``\\w+|[^\\w\\s]``). It tracks BPE token counts of English and
code to within a factor of about 1.3, which is what a budget needs.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from memact.env.history import NEXT_SCHEMA, SYSTEM_PROMPT, experiment_line, history_prompt
from memact.env.memory import IdSource, MemoryActionError, Record, WorkingMemory
from memact.env.tools import PRUNE_SCHEMA, prune_result_text, with_record_id
from memact.research.endpoint import Endpoint, EndpointError
from memact.research.proposers import find_constants

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
KEEP_LAST = 4  # the heuristic keeps this many most recent records unpruned


def count_tokens(text: str) -> int:
    """Context length proxy: words plus punctuation marks."""
    return len(_TOKEN_RE.findall(text))


def diff_summary(old: str, new: str) -> str:
    """A few words on what changed in train.py: the constants touched, or lines added/removed."""
    try:
        before = {k: v[3] for k, v in find_constants(old).items()}
        after = {k: v[3] for k, v in find_constants(new).items()}
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # not Python (NUL bytes, too deep...)
        before = after = {}
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    added = removed = 0
    for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0):
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    if changed and added == removed == len(changed):
        return "constants " + ",".join(changed)
    return f"+{added}/-{removed} lines"


@dataclass
class Outcome:
    """What one experiment did, as the history records it."""

    experiment: int
    status: str
    val_bpb: float | None
    description: str
    diff: str
    commit: str = ""

    def line(self, record_id: str) -> str:
        return f"[{record_id}] " + experiment_line(self.experiment, self.status, self.val_bpb, self.description,
                                                   self.diff)


class ResearchMemory:
    """The agent's context: a fixed head (program + best so far) and records that can be pruned.

    Also keeps the unpruned "shadow" length: what the context would be had no record ever
    been deleted, so that a run logs both curves from one history.
    """

    def __init__(self, program_text: str, seed: int = 0, baseline: dict[str, str] | None = None):
        self.program_text = program_text.rstrip() + "\n"
        self.seed = seed
        self.baseline = dict(baseline or {})
        """The template's constants (name -> literal): the configuration experiment 1 starts from."""
        self._ids = IdSource(seed)
        self.ids_drawn = 0
        self.memory = WorkingMemory(head_id=self._new_id())
        self.shadow_record_tokens = 0  # sum over every record ever added

    def _new_id(self) -> str:
        self.ids_drawn += 1
        return self._ids()

    # ---- building the context ----

    def add_outcome(self, outcome: Outcome) -> Record:
        rid = self._new_id()
        text = outcome.line(rid)
        record = Record(
            record_id=rid,
            assistant_text=outcome.description,
            response_text=text,
            kind="tool",
            meta={
                "experiment": outcome.experiment,
                "status": outcome.status,
                "val_bpb": outcome.val_bpb,
                "description": outcome.description,
                "diff": outcome.diff,
                "commit": outcome.commit,
            },
        )
        self.memory.append(record)
        self.shadow_record_tokens += count_tokens(text)
        return record

    def add_note(self, text: str, meta: dict[str, Any]) -> Record:
        """Append a note record (the memory a prune_context call leaves behind)."""
        rid = self._new_id()
        record = Record(rid, assistant_text="prune_context", response_text=f"[{rid}] note: {text}", kind="memory",
                        meta=dict(meta, note=text))
        self.memory.append(record)
        return record

    def head_text(self, best_block: str) -> str:
        return f"{self.program_text}\n## Best so far\n{best_block.rstrip()}\n\n## Experiment history\n"

    def context_text(self, best_block: str) -> str:
        lines = [r.response_text for r in self.memory.records]
        return self.head_text(best_block) + "\n".join(lines) + ("\n" if lines else "")

    def tokens(self, best_block: str) -> int:
        return count_tokens(self.context_text(best_block))

    def unpruned_tokens(self, best_block: str) -> int:
        return count_tokens(self.head_text(best_block)) + self.shadow_record_tokens

    def record_of_experiment(self, experiment: int) -> Record | None:
        for r in self.memory.records:
            if r.kind == "tool" and r.meta.get("experiment") == experiment:
                return r
        return None

    # ---- acting on it ----

    def apply_prune(self, note: str, delete_ids: Any, note_meta: dict[str, Any] | None = None) -> Record:
        """``prune_context(note, delete_ids)`` then the note record; all or nothing.

        Raises MemoryActionError (from WorkingMemory) for a bad call, leaving memory as it was.
        """
        removed = self.memory.prune_context(note, delete_ids)
        return self.add_note(note, dict(note_meta or {}, deleted=[r.record_id for r in removed]))

    # ---- persistence (state.json) ----

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "baseline": self.baseline,
            "ids_drawn": self.ids_drawn,
            "head_id": self.memory.head_id,
            "shadow_record_tokens": self.shadow_record_tokens,
            "records": [
                {"record_id": r.record_id, "assistant_text": r.assistant_text, "response_text": r.response_text,
                 "kind": r.kind, "meta": r.meta}
                for r in self.memory.records
            ],
        }

    @classmethod
    def from_dict(cls, program_text: str, data: dict[str, Any]) -> ResearchMemory:
        mem = cls(program_text, seed=int(data["seed"]), baseline=data.get("baseline"))
        while mem.ids_drawn < int(data["ids_drawn"]):  # replay the id source to where it was
            mem._new_id()
        mem.memory.head_id = data["head_id"]
        mem.shadow_record_tokens = int(data["shadow_record_tokens"])
        for r in data["records"]:
            mem.memory.append(Record(r["record_id"], r["assistant_text"], r["response_text"], r["kind"],
                                     meta=r["meta"]))
        return mem


# ---- Memory policies ----------------------------------------------------------------------


class MemoryPolicy(Protocol):
    name: str

    def act(self, memory: ResearchMemory, best_block: str, budget: int, best_experiment: int | None) -> str:
        """Prune ``memory`` if its context is over ``budget`` tokens; return what was done."""
        ...


def _fold(records: list[Record]) -> dict[str, Any]:
    """Running statistics over experiment records and earlier notes (a note's statistics merge in).

    The baseline record (experiment 0) adds nothing: its numbers stay in the best-so-far block.
    """
    stats: dict[str, Any] = {"runs": 0, "status": {}, "tried": {}, "first": None, "last": None, "best": None,
                             "kept": [], "other_notes": ""}

    def span(lo: int | None, hi: int | None) -> None:
        for key, value, pick in (("first", lo, min), ("last", hi, max)):
            if value is not None:
                stats[key] = value if stats[key] is None else pick(stats[key], value)

    def bump(table: dict, key: str, by: Any) -> None:
        if isinstance(by, list):
            old = table.setdefault(key, [0] * len(by))
            table[key] = [a + b for a, b in zip(old, by)]
        else:
            table[key] = table.get(key, 0) + by

    for r in records:
        m = r.meta
        if r.kind == "memory" and "runs" in m:  # a heuristic note: merge its statistics
            stats["runs"] += m["runs"]
            for status, n in m["status"].items():
                bump(stats["status"], status, n)
            for name, counts in m["tried"].items():
                bump(stats["tried"], name, counts)
            stats["kept"] = (m["kept"] + stats["kept"])[-3:]
            span(m["first"], m["last"])
            if m["best"] and (stats["best"] is None or m["best"][1] < stats["best"][1]):
                stats["best"] = m["best"]
            stats["other_notes"] = (stats["other_notes"] + " " + m.get("other_notes", "")).strip()[:200]
        elif r.kind == "memory":  # a note someone else (the policy) wrote: keep its start
            stats["other_notes"] = (stats["other_notes"] + " " + m.get("note", "")).strip()[:200]
        elif m.get("experiment", 0) > 0:
            exp, status = m["experiment"], m["status"]
            stats["runs"] += 1
            bump(stats["status"], status, 1)
            span(exp, exp)
            diff = m.get("diff", "")
            names = diff[len("constants "):].split(",") if diff.startswith("constants ") else ["other edits"]
            for name in names:
                bump(stats["tried"], name, [int(status == "keep"), 1])
            if status == "keep":
                stats["kept"] = (stats["kept"] + [f"exp {exp} {m['description'][:60]}"])[-3:]
            if m["val_bpb"] is not None and (stats["best"] is None or m["val_bpb"] < stats["best"][1]):
                stats["best"] = [exp, m["val_bpb"], m["description"][:60]]
    return stats


def _note_text(stats: dict[str, Any]) -> str:
    """A compact note: span, counts, best, kept/tried per constant, the last kept changes."""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(stats["status"].items()))
    parts = [f"exps {stats['first']}-{stats['last']} ({stats['runs']} runs: {counts})"]
    if stats["best"]:
        exp, bpb, desc = stats["best"]
        parts.append(f"best {bpb:.4f} exp {exp} ({desc})")
    if stats["tried"]:
        parts.append("kept/tried: " + ", ".join(f"{k} {kept}/{n}" for k, (kept, n) in sorted(stats["tried"].items())))
    if stats["kept"]:
        parts.append("kept: " + "; ".join(stats["kept"]))
    if stats["other_notes"]:
        parts.append(f"earlier notes: {stats['other_notes']}")
    return "; ".join(parts)


class HeuristicMemory:
    """Keep the best experiment's record and the last ``keep_last`` experiment records; fold the rest.

    Everything else, earlier notes included, becomes one new note of running statistics.
    """

    name = "heuristic"

    def __init__(self, keep_last: int = KEEP_LAST):
        self.keep_last = keep_last

    def prune(self, memory: ResearchMemory, best_experiment: int | None) -> str:
        records = memory.memory.records
        experiments = [r for r in records if r.kind != "memory"]
        protected = {r.record_id for r in experiments[-self.keep_last :]} if self.keep_last else set()
        best = memory.record_of_experiment(best_experiment) if best_experiment is not None else None
        if best is not None:
            protected.add(best.record_id)
        doomed = [r for r in records if r.record_id not in protected]
        stats = _fold(doomed)
        text = _note_text(stats) if stats["runs"] or stats["other_notes"] else ""
        # Folding must shrink the context: one record into one note, or a note longer than
        # what it replaces, only churns ids.
        if not text or len(doomed) < 2 or count_tokens(text) + 4 >= sum(count_tokens(r.response_text) for r in doomed):
            return "heuristic: nothing worth folding"
        note = memory.apply_prune(text, [r.record_id for r in doomed], stats)
        return f"heuristic: folded {len(doomed)} records into {note.record_id}"

    def act(self, memory: ResearchMemory, best_block: str, budget: int, best_experiment: int | None) -> str:
        if memory.tokens(best_block) <= budget:
            return ""
        return self.prune(memory, best_experiment)


class NoMemory:
    """Never prune: the context grows with every experiment."""

    name = "none"

    def act(self, memory: ResearchMemory, best_block: str, budget: int, best_experiment: int | None) -> str:
        return ""


class WindowMemory:
    """No memory, with a budget: the oldest records are dropped, without a note, until the context
    fits (a sliding window; what the proposer cannot see, it no longer knows)."""

    name = "window"

    def act(self, memory: ResearchMemory, best_block: str, budget: int, best_experiment: int | None) -> str:
        dropped = []
        while memory.tokens(best_block) > budget and len(memory.memory.records) > 1:
            oldest = memory.memory.records[0].record_id
            memory.memory.drop([oldest])
            dropped.append(oldest)
        return f"window: dropped {len(dropped)} oldest records" if dropped else ""


HISTORY_TOOLS = [{"type": "function", "function": schema} for schema in (NEXT_SCHEMA, PRUNE_SCHEMA)]
MAX_CALL_TOKENS = 512  # the longest turn of the history task's training episodes


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def policy_messages(memory: ResearchMemory, experiments: int) -> list[dict[str, Any]]:
    """The research memory as an episode of the history task (``memact.env.history``), in
    chat-completions messages: the task's system prompt, its head (``[id: HEAD]`` and the task
    text with the template's baseline), then every surviving record as the turn that made it:
    an experiment as a ``next_experiment`` call answered by its line, a note as the
    ``prune_context`` call that wrote it answered by the ids it deleted. The baseline's own
    record (experiment 0) is the head's ``val_bpb``."""
    records = memory.memory.records
    base = next((r for r in records if r.kind == "tool" and r.meta.get("experiment") == 0), None)
    bpb = base.meta.get("val_bpb") if base is not None else None
    user = with_record_id(memory.memory.head_id, history_prompt(experiments, memory.baseline, bpb))
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    for n, r in enumerate(x for x in records if x is not base):
        m = r.meta
        if r.kind == "memory":
            deleted = list(m.get("deleted", []))
            call = _call(f"call_{n}", "prune_context", {"memory": m.get("note", ""), "delete_ids": deleted})
            body = prune_result_text(deleted)
        else:
            call = _call(f"call_{n}", "next_experiment", {})
            body = experiment_line(m["experiment"], m["status"], m["val_bpb"], m["description"], m["diff"])
        messages += [call, {"role": "tool", "tool_call_id": f"call_{n}", "content": with_record_id(r.record_id, body)}]
    return messages


def parse_tool_call(message: Any, names: tuple[str, ...] = ("prune_context",)) -> tuple[str, dict[str, Any]]:
    """(name, arguments) of the first call to one of ``names`` in a chat message: a tool call, or
    a JSON object in its text (``{"name": ..., "arguments": {...}}``, or bare prune arguments).

    Raises MemoryActionError when there is none, whatever shape the message has.
    """
    if not isinstance(message, dict):
        raise MemoryActionError(f"the policy's message is a {type(message).__name__}, not an object")
    calls = message.get("tool_calls")
    name, raw = None, None
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and fn.get("name") in names:
            name, raw = fn["name"], fn.get("arguments")
            break
    content = message.get("content")
    if raw is None and isinstance(content, str):  # a served model whose chat template puts the call in the text
        match = re.search(r"\{.*\}", content, flags=re.DOTALL)
        raw = match.group(0) if match else None
    if raw is None:
        raise MemoryActionError(f"the policy answered without a call to {' or '.join(names)}")
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except (json.JSONDecodeError, RecursionError) as err:
        raise MemoryActionError(f"the call's arguments are not JSON: {err}") from err
    if name is None and isinstance(args, dict) and "arguments" in args:  # {"name": ..., "arguments": {...}}
        name, args = args.get("name"), args["arguments"]
    name = name if name is not None else "prune_context"
    if name not in names:
        raise MemoryActionError(f"the policy called {name!r}, not {' or '.join(names)}")
    if not isinstance(args, dict):
        raise MemoryActionError(f"{name} arguments must be an object, got {type(args).__name__}")
    return name, args


class ExpertMemory:
    """The history task's scripted expert (``memact.agent.scripted_history``) curates the history
    in process: after every experiment it reads the episode a policy would be shown
    (:func:`policy_messages`, rendered by the chat template a served model sees) and reads on or
    prunes, writing its note of compact experiment lines. It is what ``policy:scripted`` serves
    (``memact serve scripted --data history:FILE``), without a server. As a policy's fallback its
    notes keep the context in the format the policy was trained on.
    """

    name = "expert"

    def __init__(self, experiments: int = 16):
        self.experiments = experiments
        self._tokenizer: Any = None

    def decide(self, memory: ResearchMemory, now: bool = False) -> tuple[str, dict[str, Any]]:
        """The expert's next call on the memory as it stands: (tool name, arguments). ``now``: the
        expert that folds every record, notes included, into one note as soon as one experiment
        record is in view (a fallback must make room; the expert itself waits for 3 and keeps the last)."""
        from memact.agent.scripted_history import HistoryExpert
        from memact.assets import tiny_warm
        from memact.engines.serve import served_prompt
        from memact.models.chatml import parse_action
        from memact.models.model import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(tiny_warm())
        expert = HistoryExpert(hold=1, keep_last=0) if now else HistoryExpert()
        prompt = served_prompt(self._tokenizer, policy_messages(memory, self.experiments), HISTORY_TOOLS)
        action = parse_action(expert(prompt))
        return action.name or "", action.arguments

    def _apply(self, memory: ResearchMemory, now: bool) -> str | None:
        """The expert's prune applied (what it did), or None where it reads on."""
        name, args = self.decide(memory, now)
        if name != "prune_context":
            return None
        record = memory.apply_prune(args["memory"], args["delete_ids"])
        return f"expert: deleted {len(record.meta['deleted'])} records, note {record.record_id}"

    def prune(self, memory: ResearchMemory, best_experiment: int | None) -> str:
        """As a fallback: fold everything into one note of the expert's format now."""
        return self._apply(memory, now=True) or "expert: nothing to fold yet"

    def act(self, memory: ResearchMemory, best_block: str, budget: int, best_experiment: int | None) -> str:
        return self._apply(memory, now=False) or ""


class PolicyMemory:
    """The served memact policy curates the history: after every experiment it is shown the history
    task's episode so far (:func:`policy_messages`) and reads on or prunes. A bad call, or reading
    on while the context is over budget, falls back to the history expert, whose notes are the
    format the policy was trained on, and to the heuristic where the expert has nothing to fold or
    the context is still over budget.

    Args:
        endpoint: the served policy (``memact serve MODEL_DIR``).
        experiments: the run's length, stated in the task text as the history task states it.
    """

    name = "policy"

    def __init__(self, endpoint: Endpoint, experiments: int = 16):
        self.endpoint = endpoint
        self.experiments = experiments
        self.fallback = ExpertMemory(experiments)
        self.last_resort = HeuristicMemory()

    def _fall_back(self, memory: ResearchMemory, best_block: str, budget: int, best_experiment: int | None) -> str:
        done = self.fallback.prune(memory, best_experiment)
        if memory.tokens(best_block) > budget:
            done += f"; {self.last_resort.prune(memory, best_experiment)}"
        return done

    def act(self, memory: ResearchMemory, best_block: str, budget: int, best_experiment: int | None) -> str:
        over = memory.tokens(best_block) > budget
        try:
            message = self.endpoint.chat(policy_messages(memory, self.experiments), tools=HISTORY_TOOLS,
                                         tool_choice="auto", temperature=0.0, max_tokens=MAX_CALL_TOKENS)
            name, args = parse_tool_call(message, ("next_experiment", "prune_context"))
            if name == "next_experiment":
                if not over:
                    return ""
                raise MemoryActionError(f"the policy read on at {memory.tokens(best_block)} tokens, over the budget")
            record = memory.apply_prune(args.get("memory"), args.get("delete_ids"))
        except (MemoryActionError, EndpointError, ValueError, TypeError) as err:
            if not over:
                return f"policy error ({str(err)[:120]}); nothing pruned"
            return f"policy error ({str(err)[:120]}); fallback {self._fall_back(memory, best_block, budget, best_experiment)}"
        done = f"policy: deleted {len(record.meta['deleted'])} records, note {record.record_id}"
        if memory.tokens(best_block) > budget:
            done += f"; still over budget: fallback {self._fall_back(memory, best_block, budget, best_experiment)}"
        return done


def make_memory_policy(spec: str, experiments: int = 16) -> MemoryPolicy:
    """A memory policy from its command-line name: ``heuristic``, ``none``, ``window``, ``expert`` or ``policy:MODEL_DIR``
    (``experiments``: the run's length, which the policy's task text states)."""
    kind, _, arg = spec.partition(":")
    if spec == "heuristic":
        return HeuristicMemory()
    if spec == "none":
        return NoMemory()
    if spec == "window":
        return WindowMemory()
    if spec == "expert":
        return ExpertMemory(experiments)
    if kind == "policy" and arg:
        return PolicyMemory(Endpoint.policy(arg), experiments=experiments)
    raise ValueError(f"unknown memory {spec!r}: expected heuristic, none, window, expert or policy:MODEL_DIR")
