"""Where tasks come from: one spec for `memact rollout`, `memact train` and `memact eval`.

A task source is named by a spec string (``--data`` on the command line, ``rollout.tasks`` in a
training config):

- ``synthetic``: the generated worlds of :mod:`memact.env.task` (short documents).
- ``long`` or ``long:WORDS``: the same worlds with every document padded to about ``WORDS``
  words (default :data:`LONG_DOC_WORDS`, the 100-word passages of the Wikipedia corpora that
  retrieval agents search), so that search results fill a context as retrieved passages do.
- ``hotpotqa:PATH``: a local file in the HotpotQA schema (.json, .jsonl or .parquet).
- ``qa:PATH``: a JSONL file of questions in memact's own format (docs/data.md), for any
  multi-objective QA data.
- ``history:PATH``: research histories (``memact research histories``; :mod:`memact.env.history`):
  a task replays ``4 K`` experiments of a run to curate; runs split into ``train`` and ``eval`` by id.
- ``mix:SPEC+SPEC[+...]``: the tasks of several sources in equal shares, interleaved (e.g.
  ``mix:synthetic+history:runs/h.jsonl`` trains one policy on QA and research histories).

File sources join K questions into one task (as MEM1 and MemAct build multi-objective
questions) and split their questions into ``train`` and ``eval`` by a hash of the question id,
so a training run and an evaluation never share a question (:func:`split_of`). Every row is
checked before any task is made: a bad row raises an error naming the file, the row and the
field, and nothing is loaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memact.env.task import SubQuestion, Task, make_tasks

LONG_DOC_WORDS = 100
SPLITS = ("train", "eval", "all")
EVAL_PERCENT = 20
"""Share of a file's questions (by id hash) in the ``eval`` split."""
SPEC_HELP = "synthetic | long[:WORDS] | hotpotqa:PATH | qa:PATH | history:PATH | mix:SPEC+SPEC"
RETRIEVAL_HELP = "task | index:DIR | http:URL"  # memact.env.retrieval


@dataclass(frozen=True)
class QARow:
    """One question of a data file with its documents (``(title, text)`` pairs)."""

    id: str
    question: str
    answer: str
    aliases: tuple[str, ...] = ()
    supporting: tuple[str, ...] = ()
    documents: tuple[tuple[str, str], ...] = ()


class DataError(ValueError):
    """A data file that cannot be loaded: the message names the file, the row and the field."""


def split_of(question_id: str, eval_percent: int = EVAL_PERCENT) -> str:
    """``eval`` for about ``eval_percent`` % of question ids, ``train`` for the rest (stable across
    machines, runs and file order)."""
    return "eval" if zlib.crc32(question_id.encode()) % 100 < eval_percent else "train"


# ---------------------------------------------------------------------------- reading files


def _read_records(path: Path) -> list[Any]:
    """The raw rows of a .json (a list), .jsonl (one object a line) or .parquet file."""
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n}: not valid JSON ({err})") from None
    return rows


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: field {key!r} is missing")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    value = str(value).strip()
    if required and not value:
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _strings(row: dict, key: str, where: str) -> tuple[str, ...]:
    value = row.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {key!r} must be a list of strings")
    return tuple(value)


def _hotpot_row(row: Any, where: str) -> QARow:
    """A HotpotQA row: ``_id``, ``question``, ``answer``, ``context`` as ``[title, sentences]`` pairs
    or the Hugging Face layout ``{"title": [...], "sentences": [[...]]}``, ``supporting_facts``."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    qid = _text(row, "_id", where)
    where = f"{where} (_id {qid!r})"
    context = row.get("context")
    if context is None:
        raise DataError(f"{where}: field 'context' is missing")
    try:
        if isinstance(context, dict):
            pairs = list(zip(context["title"], context["sentences"], strict=True))
        else:
            pairs = [(title, sentences) for title, sentences in context]
        docs = []
        for title, sentences in pairs:
            if not isinstance(title, str) or not isinstance(sentences, list) or not all(
                    isinstance(s, str) for s in sentences):
                raise TypeError("a title must be a string and its sentences a list of strings")
            docs.append((title, "".join(sentences).strip()))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{where}: bad field 'context': {err}") from None
    supporting = row.get("supporting_facts") or []
    try:
        titles = ([str(t) for t in supporting.get("title", [])] if isinstance(supporting, dict)
                  else [str(item[0]) for item in supporting])
    except (TypeError, IndexError, KeyError) as err:
        raise DataError(f"{where}: bad field 'supporting_facts': {err}") from None
    return QARow(qid, _text(row, "question", where), _text(row, "answer", where), (), tuple(titles), tuple(docs))


def _qa_row(row: Any, where: str) -> QARow:
    """A row of memact's JSONL format (docs/data.md)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    unknown = sorted(set(row) - {"id", "question", "answer", "aliases", "supporting", "documents"})
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} (expected id, question, answer, "
                        "aliases, supporting, documents)")
    qid = _text(row, "id", where)
    where = f"{where} (id {qid!r})"
    question, answer = _text(row, "question", where), _text(row, "answer", where)
    docs = row.get("documents")
    if not isinstance(docs, list) or not docs:
        raise DataError(f"{where}: field 'documents' must be a non-empty list of {{title, text}} objects")
    pairs = []
    for j, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise DataError(f"{where}: documents[{j}] must be an object with 'title' and 'text'")
        pairs.append((_text(doc, "title", f"{where}: documents[{j}]"), _text(doc, "text", f"{where}: documents[{j}]")))
    return QARow(qid, question, answer, _strings(row, "aliases", where), _strings(row, "supporting", where),
                 tuple(pairs))


_READERS = {"hotpotqa": _hotpot_row, "qa": _qa_row}


def load_rows(kind: str, path: str | Path) -> list[QARow]:
    """Every row of a ``hotpotqa`` or ``qa`` file, checked; the first bad row raises a
    :class:`DataError` naming it and its field, and nothing is returned."""
    path = Path(path)
    read = _READERS[kind]
    rows = [read(raw, f"{path}: row {i}") for i, raw in enumerate(_read_records(path))]
    if not rows:
        raise DataError(f"{path}: no rows")
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row.id in seen:
            raise DataError(f"{path}: row {i}: id {row.id!r} is also row {seen[row.id]}'s")
        seen[row.id] = i
    return rows


def build_corpus(rows: list[QARow]) -> list[str]:
    """One document per distinct title over every row (both splits): ``"Title: text"``."""
    seen: dict[str, str] = {}
    for row in rows:
        for title, text in row.documents:
            seen.setdefault(title, f"{title}: {text}")
    return list(seen.values())


def join_questions(rows: list[QARow], k: int, n: int, seed: int, corpus: list[str], source: str,
                   prefix: str) -> list[Task]:
    """``n`` tasks of ``k`` distinct questions each, drawn with a seeded RNG; all share ``corpus``
    (the same list object, so its search index is built once)."""
    if k > len(rows):
        raise DataError(f"K={k} questions a task but the split has only {len(rows)} questions")
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        picked = rng.sample(rows, k)
        questions = [
            SubQuestion(key=f"Q{j + 1}", text=r.question, answer=r.answer, query=(r.supporting or (r.question,))[0],
                        aliases=list(r.aliases), supporting=list(r.supporting))
            for j, r in enumerate(picked)
        ]
        tasks.append(Task(task_id=f"{prefix}-k{k}-s{seed}-{i}", questions=questions, documents=corpus, source=source))
    return tasks


# ---------------------------------------------------------------------------- the spec

_FILES: dict[tuple, tuple[dict[str, list[QARow]], list[str]]] = {}


@dataclass(frozen=True)
class TaskSource:
    """A parsed task source spec (:data:`SPEC_HELP`)."""

    kind: str  # synthetic | long | hotpotqa | qa | history | mix
    path: str = ""
    doc_words: int = 0  # long: words a document
    eval_percent: int = EVAL_PERCENT
    retrieval: str = "task"  # what the tasks' search queries (memact.env.retrieval)
    parts: tuple[TaskSource, ...] = ()  # mix: the sources mixed

    @property
    def spec(self) -> str:
        if self.kind == "mix":
            return "mix:" + "+".join(p.spec for p in self.parts)
        if self.kind == "long":
            return f"long:{self.doc_words}"
        return f"{self.kind}:{self.path}" if self.path else self.kind

    def _file(self) -> tuple[dict[str, list[QARow]], list[str]]:
        """The file's rows by split and its corpus, loaded once per process (until the file changes)."""
        path = Path(self.path)
        key = (self.kind, str(path.resolve()), path.stat().st_mtime_ns, self.eval_percent)
        if key not in _FILES:
            rows = load_rows(self.kind, path)
            by_split: dict[str, list[QARow]] = {"all": rows, "train": [], "eval": []}
            for row in rows:
                by_split[split_of(row.id, self.eval_percent)].append(row)
            if len(_FILES) >= 4:
                _FILES.clear()
            _FILES[key] = (by_split, build_corpus(rows))
        return _FILES[key]

    def histories(self, split: str = "all") -> list[dict[str, Any]]:
        """The runs of a ``history`` source in ``split`` (the file read and checked whole)."""
        from memact.env.history import load_histories

        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        runs = load_histories(self.path)
        return runs if split == "all" else [r for r in runs if split_of(r["id"], self.eval_percent) == split]

    def questions(self, split: str = "all") -> list[QARow]:
        """The questions of a file source in ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        if self.kind not in _READERS:
            raise ValueError(f"task source {self.spec!r} has no file of questions")
        return self._file()[0][split]

    def check(self, split: str, k: int = 1) -> None:
        """Read and check the source's files now (every row), and that ``split`` can give tasks of
        ``k``; raises ValueError or OSError naming what is wrong."""
        if self.kind == "mix":
            for part in self.parts:
                part.check(split, k)
        elif self.kind == "history":
            if not self.histories(split):
                raise ValueError(f"{self.spec}: no runs in the {split} split")
        elif self.path:
            n = len(self.questions(split))
            if n < k:
                raise ValueError(f"its {split} split has {n} questions, fewer than K={k}")

    def tasks(self, n: int, k: int, seed: int, split: str = "all") -> list[Task]:
        """``n`` tasks of ``k`` sub-questions from ``seed``; file sources draw from ``split`` only
        (synthetic worlds are new for every seed, so they have no split); a mix gives each part an
        equal share (the first parts one more when ``n`` does not divide), interleaved."""
        if self.kind == "mix":
            from memact.util.seeds import derive_seed

            shares = [n // len(self.parts) + (j < n % len(self.parts)) for j in range(len(self.parts))]
            drawn = [p.tasks(m, k, derive_seed(seed, "mix", j), split) if m else []
                     for j, (p, m) in enumerate(zip(self.parts, shares))]
            return [t for row in itertools.zip_longest(*drawn) for t in row if t is not None]
        if self.kind == "synthetic":
            return make_tasks(n, k, seed)
        if self.kind == "long":
            return make_tasks(n, k, seed, doc_words=self.doc_words)
        if self.kind == "history":
            from memact.env.history import history_tasks

            return history_tasks(self.histories(split), n, k, seed, f"history-{split}")
        rows = self.questions(split)
        corpus = self._file()[1]
        tasks = join_questions(rows, k, n, seed, corpus, self.kind, f"{self.kind}-{split}")
        for t in tasks:
            t.retrieval = self.retrieval
        return tasks


def parse_source(spec: str | None, retrieval: str | None = None) -> TaskSource:
    """A :class:`TaskSource` from a spec string (:data:`SPEC_HELP`); None is ``synthetic``.
    ``retrieval`` (``memact.env.retrieval``, default ``task``) applies to file sources: a synthetic
    world is searched only through its own documents."""
    from memact.env.retrieval import check_retrieval

    retrieval = check_retrieval(retrieval)
    source = _parse(spec)
    if retrieval != "task":
        if not source.path:
            raise ValueError(f"retrieval {retrieval!r} needs a data file source (hotpotqa:PATH or qa:PATH); "
                             f"{source.spec!r} tasks are searched through their own documents")
        source = dataclasses.replace(source, retrieval=retrieval)
    return source


def add_source_arguments(parser: Any, split: str, retrieval: bool = True) -> None:
    """``--data`` (a spec), ``--split`` (default ``split``) and ``--retrieval`` of a command that runs tasks."""
    parser.add_argument("--data", default=None, help=f"task source: {SPEC_HELP} (default synthetic; docs/data.md)")
    if retrieval:
        parser.add_argument("--retrieval", default="task",
                            help=f"what search queries for a data file: {RETRIEVAL_HELP} (default task: bm25s over "
                            "the file's documents; docs/data.md)")
    hint = "`memact eval` uses eval" if split == "train" else "never in a training run's train split"
    parser.add_argument("--split", default=split, choices=SPLITS,
                        help=f"a data file's questions to draw from (default {split}: {hint})")


def source_from_args(args: Any, command: str) -> TaskSource:
    """The task source of :func:`add_source_arguments`' options, a data file's ``--split`` read and
    checked whole now; a bad spec or file stops ``memact COMMAND`` with one line naming it."""
    try:
        source = parse_source(args.data, getattr(args, "retrieval", None))
        source.check(args.split)
    except (ValueError, OSError) as err:
        raise SystemExit(f"memact {command}: --data {args.data!r}: {err}") from None
    return source


def _parse(spec: str | None) -> TaskSource:
    spec = (spec or "synthetic").strip()
    kind, sep, arg = spec.partition(":")
    if kind == "mix":
        names = [a.strip() for a in arg.split("+")]
        if len(names) < 2 or not all(names) or any(n.startswith("mix:") for n in names):
            raise ValueError(f"task source {spec!r}: mix:SPEC+SPEC needs two or more sources (not mixes) "
                             f"joined by '+', e.g. mix:synthetic+history:runs/h.jsonl")
        return TaskSource("mix", parts=tuple(_parse(n) for n in names))
    if kind == "synthetic" and not sep:
        return TaskSource("synthetic")
    if kind == "long":
        if not sep:
            return TaskSource("long", doc_words=LONG_DOC_WORDS)
        try:
            words = int(arg)
        except ValueError:
            words = 0
        if words < 1:
            raise ValueError(f"task source {spec!r}: long:WORDS needs a positive whole number of words, got {arg!r}")
        return TaskSource("long", doc_words=words)
    if kind in _READERS or kind == "history":
        if not arg:
            raise ValueError(f"task source {spec!r}: {kind}:PATH needs a file path")
        if not Path(arg).is_file():
            raise FileNotFoundError(f"task source {spec!r}: data file {arg!r} does not exist")
        return TaskSource(kind, path=arg)
    raise ValueError(f"task source {spec!r}: expected {SPEC_HELP}")
