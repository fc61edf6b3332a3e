"""Tools, actions and the environment step of a memory agent.

The agent's turn is parsed (by the policy layer) into an :class:`Action`; the
:class:`AgentEnv` applies it to the working memory and answers with the text of a tool
response. Bad actions never raise: they are answered by an error response that says what
was wrong, and nothing else changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

# bm25s imports JAX when it is installed. On a GPU machine, JAX's first use there reserves 75%
# of the GPU's memory; measured on an H100: six warm-up processes that imported this module
# ran out of GPU memory at their first step. memact never needs JAX on a GPU (a user's own
# JAX_PLATFORMS / XLA_PYTHON_CLIENT_PREALLOCATE win).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import bm25s  # noqa: E402

from memact.env.memory import Budget, IdSource, MemoryActionError, Record, WorkingMemory
from memact.env.task import Task, parse_final_answer, score_answer

SEARCH_SCHEMA = {
    "name": "search",
    "description": "Search the documents.",
    "parameters": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "words to find"},
            "topk": {"type": "integer", "description": "results, 1-5"},
        },
        "required": ["query"],
    },
}

PRUNE_SCHEMA = {
    "name": "prune_context",
    "description": "Delete records and keep a note instead.",
    "parameters": {
        "type": "object",
        "properties": {
            "memory": {"type": "string", "description": "the note"},
            "delete_ids": {"type": "array", "items": {"type": "string"}, "description": "ids to delete"},
        },
        "required": ["memory", "delete_ids"],
    },
}

MAX_TOPK = 5


class RetrievalError(RuntimeError):
    """A search the backend could not answer (a server down, a bad reply: ``memact.env.retrieval``)."""


class BM25Search:
    """``search(query, topk)`` over a task's documents with the bm25s library."""

    def __init__(self, documents: list[str], default_topk: int = 3):
        if not documents:
            raise ValueError("BM25Search needs at least one document")
        self.documents = documents
        self.default_topk = default_topk
        self._retriever = bm25s.BM25()
        tokens = bm25s.tokenize(documents, stopwords="en", show_progress=False)
        self._retriever.index(tokens, show_progress=False)

    def __call__(self, query: str, topk: int | None = None) -> list[str]:
        topk = self.default_topk if topk is None else topk
        q = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not q[0]:
            return []
        k = min(topk, len(self.documents))
        # numpy top-k: bm25s's "auto" picks JAX when installed (see the import above).
        docs, scores = self._retriever.retrieve(q, k=k, show_progress=False, backend_selection="numpy")
        return [self.documents[int(d)] for d, s in zip(docs[0], scores[0]) if s > 0]


_SHARED: dict[int, BM25Search] = {}


def shared_index(documents: list[str]) -> BM25Search:
    """The search index of a corpus; large corpora shared by many tasks are indexed once."""
    if len(documents) < 1000:
        return BM25Search(documents)
    key = id(documents)
    index = _SHARED.get(key)
    if index is None or index.documents is not documents:
        if len(_SHARED) >= 4:
            _SHARED.clear()
        index = _SHARED[key] = BM25Search(documents)
    return index


@dataclass
class Action:
    """A parsed assistant turn.

    kind: ``"tool"`` (a tool call with ``name`` and ``arguments``), ``"final"`` (a final
    answer), or ``"invalid"`` (``error`` says what was wrong with the turn).
    """

    kind: str
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class StepResult:
    """What the env did with one action."""

    response_text: str | None  # tool response to append (None when the episode ended)
    record_id: str | None = None
    kind: str = "tool"  # tool | memory | error | final
    deleted: list[str] = field(default_factory=list)
    done: bool = False


class AgentEnv:
    """One episode's environment: a task, its tools and the working memory.

    Args:
        task: the multi-objective task.
        seed: seeds the record ids, so an episode replays exactly.
        memory_tool: offer ``prune_context`` (False gives the no-memory baseline).
        budget: context and step limits.
    """

    system_prompt: str | None = None
    """The system prompt of this task family; None: the agent layer's search-agent prompt."""

    def __init__(self, task: Task, seed: int = 0, memory_tool: bool = True, budget: Budget | None = None):
        self.task = task
        self.memory_tool = memory_tool
        self.budget = budget or Budget()
        self.new_id = IdSource(seed)
        self.memory = WorkingMemory(head_id=self.new_id())
        self._search_index: Any = None
        self.failure: str | None = None
        """Why the episode could not go on through no fault of the agent (a retrieval server down)."""
        self.answer: dict[str, str] | None = None
        self.correct: list[bool] = []
        self.memory_actions = 0
        self.invalid_actions = 0

    @property
    def search(self) -> Any:
        """The task's retrieval backend, ``search(query, topk) -> documents`` (``memact.env.retrieval``)."""
        if self._search_index is None:  # built on first use: indexing costs more than the episode setup
            from memact.env.retrieval import get_retriever

            self._search_index = get_retriever(self.task.retrieval, self.task.documents)
        return self._search_index

    @property
    def tools(self) -> list[dict[str, Any]]:
        return [SEARCH_SCHEMA, PRUNE_SCHEMA] if self.memory_tool else [SEARCH_SCHEMA]

    def user_text(self) -> str:
        return with_record_id(self.memory.head_id, self.task.prompt_text())

    # ------------------------------------------------------------------ actions

    def step(self, action: Action, assistant_text: str = "") -> StepResult:
        """Apply one action. Never raises for a bad action: it becomes an error response."""
        if action.kind == "final":
            return self._final(assistant_text)
        if action.kind == "invalid":
            return self._error(action.error, assistant_text)
        handler = self._handlers().get(action.name)
        if handler is not None:
            return handler(action.arguments, assistant_text)
        names = ", ".join(t["name"] for t in self.tools)
        return self._error(f"unknown tool {action.name!r}; available tools: {names}", assistant_text)

    def _handlers(self) -> dict[str, Any]:
        """Tool name -> ``handler(arguments, assistant_text)``, one for each tool in :attr:`tools`:
        the task family's own, then ``prune_context`` when the memory tool is offered."""
        handlers = self._task_handlers()
        if self.memory_tool:
            handlers["prune_context"] = self._prune
        return handlers

    def _task_handlers(self) -> dict[str, Any]:
        """The task family's tools (QA: ``search``)."""
        return {"search": self._search}

    def _final(self, assistant_text: str) -> StepResult:
        self.answer = parse_final_answer(assistant_text)
        return StepResult(None, kind="final", done=True)

    def add_record(self, text: str, assistant_text: str, kind: str, **meta: Any) -> StepResult:
        """Append a record with a new id (used by strategies that edit the context)."""
        return self._append(text, assistant_text, kind, **meta)

    def _append(self, text: str, assistant_text: str, kind: str, **meta: Any) -> StepResult:
        rid = self.new_id()
        response = with_record_id(rid, text)
        self.memory.append(Record(rid, assistant_text, response, kind=kind, meta=meta))
        return StepResult(response, record_id=rid, kind=kind)

    def _error(self, message: str, assistant_text: str) -> StepResult:
        self.invalid_actions += 1
        return self._append(f"Error: {message}", assistant_text, "error", error=message)

    def _search(self, args: dict[str, Any], assistant_text: str) -> StepResult:
        query = args.get("query")
        if not isinstance(query, str) or not query.strip():
            return self._error("search needs a non-empty string argument 'query'", assistant_text)
        topk = args.get("topk", self.search.default_topk)
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
            return self._error(f"topk must be an integer from 1 to {MAX_TOPK}, got {topk!r}", assistant_text)
        try:
            docs = self.search(query, topk)
        except RetrievalError as err:  # not the agent's doing: the episode ends marked, the run goes on
            self.failure = f"search failed: {err}"
            return StepResult(None, kind="error", done=True)
        return self._append(search_result_text(docs), assistant_text, "tool", tool="search", query=query, topk=topk)

    def _prune(self, args: dict[str, Any], assistant_text: str) -> StepResult:
        missing = [a for a in ("memory", "delete_ids") if a not in args]
        if missing:
            return self._error(f"prune_context is missing required argument(s): {', '.join(missing)}",
                               assistant_text)
        try:
            removed = self.memory.prune_context(args["memory"], args["delete_ids"])
        except MemoryActionError as err:
            return self._error(str(err), assistant_text)
        self.memory_actions += 1
        deleted = [r.record_id for r in removed]
        result = self._append(prune_result_text(deleted), assistant_text, "memory", tool="prune_context",
                              memory=args["memory"], deleted=deleted)
        result.deleted = deleted
        return result

    # ------------------------------------------------------------------ scoring

    def reward(self, broken: str | None) -> float:
        """Task reward; a broken budget or an unparsable answer gives the penalty."""
        reward, self.correct = score_answer(self.task, None if broken else self.answer)
        return reward


def with_record_id(record_id: str, text: str) -> str:
    """A record's text as shown to the agent: its ``[id: ...]`` header, then the text."""
    return f"[id: {record_id}]\n{text}"


def prune_result_text(deleted: list[str]) -> str:
    """The body of a ``prune_context`` response: the ids it deleted."""
    return f"Deleted {len(deleted)} record(s): {', '.join(deleted)}. Memory saved."


def search_result_text(docs: list[str]) -> str:
    """The body of a search result: numbered documents, or "No results."."""
    return "\n".join(f"{i + 1}. {d}" for i, d in enumerate(docs)) if docs else "No results."


def tool_call_json(name: str, arguments: dict[str, Any]) -> str:
    """The JSON body of a hermes tool call, in the one layout the project writes."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
