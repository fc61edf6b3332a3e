"""Retrieval backends of the `search` tool, chosen by a spec (``--retrieval``, ``rollout.retrieval``).

- ``task`` (default): a bm25s index over the task's own documents, built in the process
  (``memact.env.tools.BM25Search``; a file source's tasks share one corpus, indexed once).
- ``index:DIR``: a corpus-level bm25s index that `memact index` built once and saved with
  bm25s' own format; loaded memory-mapped, so many processes share its pages.
- ``http:URL``: a retrieval server in the format of the Search-R1 / verl tool ecosystem:
  ``POST URL/retrieve`` with ``{"queries": [...], "topk": k, "return_scores": bool}``, answered
  by ``{"result": [[doc, ...], ...]}``, a doc being ``{"contents": ...}`` (or
  ``{"document": {...}, "score": s}`` with scores). Timeouts and retries are those of
  ``memact.util.http``; a server that stays down raises :class:`RetrievalError`, and the
  episode that searched ends marked with it (``Trajectory.error``) while the run goes on.
  `memact retrieval-serve --index DIR` serves an index this way on loopback.

The same corpus and queries give the same documents through all three (``tests/env/test_retrieval.py``).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from memact.env.sources import RETRIEVAL_HELP
from memact.env.tools import RetrievalError, bm25s
from memact.util.http import ChatClient, ChatClientError
from memact.util.jsonserver import RequestError

INDEX_META = "memact_index.json"
DEFAULT_TOPK = 3
HTTP_TIMEOUT_S = 10.0
HTTP_RETRIES = 3


class CorpusIndex:
    """A saved corpus-level bm25s index (:func:`build_index`), memory-mapped."""

    def __init__(self, path: str | Path, default_topk: int = DEFAULT_TOPK):
        path = Path(path)
        meta = path / INDEX_META
        if not meta.is_file():
            raise FileNotFoundError(f"{path} is not an index written by `memact index` (no {INDEX_META})")
        self.meta = json.loads(meta.read_text())
        self.default_topk = default_topk
        self._bm25 = bm25s.BM25.load(str(path), load_corpus=True, mmap=True, show_progress=False)
        self.size = int(self.meta["documents"])

    def __call__(self, query: str, topk: int | None = None) -> list[str]:
        return [d for d, _ in self.search([query], topk)[0]]

    def search(self, queries: list[str], topk: int | None = None) -> list[list[tuple[str, float]]]:
        """``(document, score)`` of each query, best first (those with a positive score, as ``BM25Search``)."""
        k = min(self.default_topk if topk is None else topk, self.size)
        out: list[list[tuple[str, float]]] = []
        for query in queries:
            q = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
            if not q[0]:
                out.append([])
                continue
            docs, scores = self._bm25.retrieve(q, k=k, show_progress=False, backend_selection="numpy")
            out.append([(d["text"], float(s)) for d, s in zip(docs[0], scores[0]) if s > 0])
        return out


def build_index(documents: list[str], out: str | Path) -> Path:
    """Index ``documents`` with bm25s (the tokenisation and scoring of ``BM25Search``) and save the
    index, the corpus and :data:`INDEX_META` to ``out``."""
    if not documents:
        raise ValueError("an index needs at least one document")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
    retriever.save(str(out), corpus=[{"id": i, "text": d} for i, d in enumerate(documents)], show_progress=False)
    (out / INDEX_META).write_text(json.dumps({"documents": len(documents), "tokenizer": "bm25s en stopwords"}))
    return out


class HTTPRetriever:
    """A client of a Search-R1-format retrieval server (``POST {url}/retrieve``)."""

    def __init__(self, url: str, default_topk: int = DEFAULT_TOPK, timeout_s: float = HTTP_TIMEOUT_S,
                 max_retries: int = HTTP_RETRIES):
        base = url.rstrip("/")
        if base.endswith("/retrieve"):
            base = base[: -len("/retrieve")]
        self.client = ChatClient(base, timeout_s=timeout_s, max_retries=max_retries, path="/retrieve")
        self.default_topk = default_topk

    def __call__(self, query: str, topk: int | None = None) -> list[str]:
        topk = self.default_topk if topk is None else topk
        try:
            reply = self.client.post({"queries": [query], "topk": topk, "return_scores": False})
        except ChatClientError as err:
            raise RetrievalError(str(err)) from None
        result = reply.get("result")
        if not isinstance(result, list) or len(result) != 1 or not isinstance(result[0], list):
            raise RetrievalError(f"POST {self.client.url}: reply has no result list for 1 query: "
                                 f"{json.dumps(reply)[:200]}")
        return [_contents(doc, self.client.url) for doc in result[0]]


def _contents(doc: Any, url: str) -> str:
    if isinstance(doc, dict) and isinstance(doc.get("document"), dict):
        doc = doc["document"]
    if isinstance(doc, dict) and isinstance(doc.get("contents"), str):
        return doc["contents"]
    if isinstance(doc, str):
        return doc
    raise RetrievalError(f"POST {url}: a result is not a document with 'contents': {json.dumps(doc)[:200]}")


_BACKENDS: dict[str, Any] = {}
_LOCK = threading.Lock()


def check_retrieval(spec: str | None) -> str:
    """The spec, checked (a bad one raises ValueError naming it); None and '' are ``task``."""
    spec = (spec or "task").strip()
    kind, sep, arg = spec.partition(":")
    if spec == "task":
        return spec
    if kind == "index" and arg:
        if not (Path(arg) / INDEX_META).is_file():
            raise ValueError(f"retrieval {spec!r}: {arg} is not an index written by `memact index` (no {INDEX_META})")
        return spec
    if kind == "http" and arg:
        return spec
    raise ValueError(f"retrieval {spec!r}: expected {RETRIEVAL_HELP}")


def get_retriever(spec: str, documents: list[str] | None = None) -> Any:
    """The backend of a spec: ``search(query, topk) -> documents``. ``task`` needs the task's documents."""
    if spec in ("", "task"):
        from memact.env.tools import shared_index

        return shared_index(documents or [])
    with _LOCK:
        if spec not in _BACKENDS:
            kind, _, arg = check_retrieval(spec).partition(":")
            _BACKENDS[spec] = (CorpusIndex(arg) if kind == "index"
                               else HTTPRetriever(arg, timeout_s=HTTP_TIMEOUT_S, max_retries=HTTP_RETRIES))
        return _BACKENDS[spec]


# ---------------------------------------------------------------------------- the server


def retrieval_routes(index: CorpusIndex) -> dict[str, tuple[str, Any]]:
    """``POST /retrieve`` (Search-R1's format) and ``GET /health`` over ``index``."""

    def retrieve(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object with 'queries'")
        queries, topk = body.get("queries"), body.get("topk", DEFAULT_TOPK)
        if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
            raise RequestError(400, "'queries' must be a non-empty list of strings")
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= 100:
            raise RequestError(400, f"'topk' must be an integer from 1 to 100, got {topk!r}")
        unknown = sorted(set(body) - {"queries", "topk", "return_scores"})
        if unknown:
            raise RequestError(400, f"unknown field(s) {', '.join(unknown)} (this server reads queries, topk, "
                               "return_scores)")
        lists = index.search(queries, topk)
        if body.get("return_scores"):
            return {"result": [[{"document": {"contents": d}, "score": sc} for d, sc in docs] for docs in lists]}
        return {"result": [[{"contents": d} for d, _ in docs] for docs in lists]}

    return {"/retrieve": ("POST", retrieve), "/health": ("GET", lambda _: {"status": "ok"})}
