"""Scripted policies that read the rendered prompt and write the next assistant turn.

The expert searches each sub-question, writes what it found into a memory note and
deletes the search records (sometimes several at once, sometimes after a second search),
then answers. The no-memory variant never prunes. The plan variant (``scripted-plan``)
writes notes that also keep the questions still to answer, in order
(``Q1: violet; todo: Q2 gem of Govul; Q3 job of Naesin``), so the next query is a copy of
the note's first to-do item instead of a lookup of the next question in the task text.
All see exactly what a model would see (the decoded prompt), so their trajectories are valid training data for SFT.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass

from memact.agent.strategies import SUMMARY_REQUEST, SUMMARY_SAVED
from memact.env.task import FINAL_ANSWER, Task
from memact.models.chatml import IM_END, IM_START, call_text, parse_action

_RECORD_RE = re.compile(
    re.escape(IM_START) + r"assistant\n(.*?)(?:" + re.escape(IM_END) + r")?\n"
    + re.escape(IM_START) + r"user\n<tool_response>\n\[id: (\w+)\]\n(.*?)\n</tool_response>",
    re.DOTALL,
)
_USER_RE = re.compile(re.escape(IM_START) + r"user\n\[id: \w+\]\n(.*?)" + re.escape(IM_END), re.DOTALL)
_NOTE_RE = re.compile(r"(Q\d+): ([^;\n]+)")
_KNOWN = "Known:"
TODO = "todo:"  # the plan variant's list of questions still to answer, after the answers
SCRIPTED = ("scripted", "scripted-plan", "scripted-nomem")  # the policy specs of the scripted experts


@dataclass
class VisibleRecord:
    record_id: str
    tool: str  # search | prune_context | summary | invalid
    arguments: dict
    response: str
    assistant: str = ""


def parse_prompt(prompt: str) -> tuple[str, list[VisibleRecord]]:
    """The task text of the head and the records visible in a rendered prompt."""
    m = _USER_RE.search(prompt)
    if m is None:
        raise ValueError("prompt has no user task head")
    records = []
    for assistant, rid, response in _RECORD_RE.findall(prompt[m.end():]):
        action = parse_action(assistant)
        tool = action.name if action.kind == "tool" else "invalid"
        if response == SUMMARY_SAVED:
            tool = "summary"
        records.append(VisibleRecord(rid, tool, action.arguments, response, assistant))
    return m.group(1), records


class ScriptedExpert:
    """A scripted agent; call it with a decoded prompt to get the next assistant turn.

    Args:
        tasks: the tasks it may be asked about (found by their question text).
        memory: use ``prune_context`` (False: the no-memory variant).
        seed: seeds its occasional detours; the same prompt always gives the same turn.
        p_batch: chance of searching the next question before pruning (several deletions at once).
        p_second_search: chance of a second search for a question before pruning.
        plan: notes also list the questions still to answer (``; todo: Q3 gem of Govul; ...``).
            Its notes are longer, so by default it holds one search result at a time (no detours:
            with two results and a K=8 note the context passes the default budget).
    """

    def __init__(self, tasks: list[Task], memory: bool = True, seed: int = 0, p_batch: float | None = None,
                 p_second_search: float | None = None, plan: bool = False):
        self.tasks = {t.prompt_text(): t for t in tasks}
        self.memory = memory
        self.plan = plan
        self.seed = seed
        self.p_batch = p_batch if p_batch is not None else (0.0 if plan else 0.3)
        self.p_second_search = p_second_search if p_second_search is not None else (0.0 if plan else 0.15)

    def __call__(self, prompt: str) -> str:
        task_text, records = parse_prompt(prompt)
        task = self.tasks.get(task_text.strip())
        if task is None:
            raise KeyError("scripted expert was given a prompt for a task it does not know")
        rng = random.Random(zlib.crc32(prompt.encode()) ^ self.seed)
        noted: dict[str, str] = {}
        for r in records:
            # Notes live in prune_context calls, summaries, and the "Known:" line of no-memory turns.
            if r.tool == "prune_context":
                noted.update({k: v.strip() for k, v in _NOTE_RE.findall(str(r.arguments.get("memory", "")))})
            elif r.tool == "summary":
                noted.update({k: v.strip() for k, v in _NOTE_RE.findall(r.assistant)})
            elif r.assistant.startswith(_KNOWN):
                noted.update({k: v.strip() for k, v in _NOTE_RE.findall(r.assistant.split("\n")[0])})
        found: dict[str, str] = {}
        searches: dict[str, int] = {}
        for q in task.questions:
            for r in records:
                if r.tool != "search":
                    continue
                if str(r.arguments.get("query", "")) in (q.query, q.entity):
                    searches[q.key] = searches.get(q.key, 0) + 1
                if q.key not in noted and q.key not in found:
                    ans = task.find_answer(q.key, r.response)
                    if ans is not None:
                        found[q.key] = ans
        # Three searches that found nothing: give the question up rather than loop.
        gave_up = {q.key: "unknown" for q in task.questions
                   if searches.get(q.key, 0) >= 3 and q.key not in noted and q.key not in found}
        known = {**noted, **found, **gave_up}
        unanswered = [q for q in task.questions if q.key not in known]
        if prompt.rstrip().endswith(f"{SUMMARY_REQUEST}{IM_END}\n{IM_START}assistant".rstrip()):
            return self._note(task, known) or "Nothing found yet."

        if self.memory and found:
            pending = [q for q in task.questions if q.key in found]
            # Detours only while a single search record is held, so at most two are ever held.
            single = sum(r.tool == "search" for r in records) == 1
            if single and unanswered and rng.random() < self.p_batch:
                return self._search(unanswered[0], searches)
            if single and rng.random() < self.p_second_search:
                return call_text("search", {"query": pending[0].query, "topk": 2})
            delete = [r.record_id for r in records]
            return call_text("prune_context", {"memory": self._note(task, known), "delete_ids": delete})
        if unanswered:
            turn = self._search(unanswered[0], searches)
            if not self.memory and known:
                # Without a memory tool the expert carries what it knows in its own turns,
                # so a sliding window or a summary does not lose it.
                turn = f"{_KNOWN} {self._note(task, known)}\n{turn}"
            return turn
        answer = {q.key: known[q.key] for q in task.questions}
        return f"{FINAL_ANSWER} {json.dumps(answer, ensure_ascii=False)}"

    def _note(self, task: Task, known: dict[str, str]) -> str:
        parts = [f"{q.key}: {known[q.key]}" for q in task.questions if q.key in known]
        todo = [f"{q.key} {q.query}" for q in task.questions if q.key not in known] if self.plan else []
        if todo:  # "Q3 gem of X" has no colon: the note parser reads only the answers
            parts.append(f"{TODO} {'; '.join(todo)}")
        return "; ".join(parts)

    def _search(self, q, searches: dict[str, int]) -> str:
        n = searches.get(q.key, 0)
        if n == 0:
            return call_text("search", {"query": q.query, "topk": 4})
        # The first search missed: widen it, then try the entity alone.
        return call_text("search", {"query": q.query if n == 1 or not q.entity else q.entity, "topk": 5})


def scripted_expert(spec: str, tasks: list[Task], seed: int = 0, memory: bool | None = None) -> ScriptedExpert:
    """The expert a policy spec names (one of ``SCRIPTED``); ``memory`` overrides whether it prunes.

    History tasks (``memact.env.history``) get the history expert (``memact.agent.scripted_history``);
    its no-memory variant never prunes."""
    if spec not in SCRIPTED:
        raise ValueError(f"not a scripted policy: {spec!r} (one of {', '.join(SCRIPTED)})")
    memory = spec != "scripted-nomem" if memory is None else memory
    from memact.env.history import HistoryTask

    if tasks and all(isinstance(t, HistoryTask) for t in tasks):
        from memact.agent.scripted_history import NEVER, HistoryExpert

        return HistoryExpert() if memory else HistoryExpert(hold=NEVER)
    return ScriptedExpert(tasks, memory=memory, seed=seed, plan=spec == "scripted-plan")
