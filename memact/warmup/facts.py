"""In-context recall warm-up: teach a tiny model to read its context before SFT.

A model trained from scratch on the agent task learns the format but copies nothing from
its context (shared/design/FACTS.md). This module trains the two skills the agent needs,
on sequences written with the task's own tokenizer and text:

* **recall** episodes: search-result records (``[id: ...]`` header, numbered documents,
  each "The {attribute} of {entity} is {value}." among filler sentences), then questions
  "Q1: What is the pet of Zorvax?" answered by the assistant as ``Q1: owl``, the layout of
  a ``prune_context`` note. The answer token (the value) is where recall is measured.
* **prune** episodes: a task head with questions, one search call and result record per
  question, then the ``prune_context`` call whose note holds the answers (``note``
  targets) and whose ``delete_ids`` repeat the record ids shown earlier (``copy`` targets).
* optionally **text**: windows of Python standard-library source (found on every machine),
  a small capped share, so the model also sees text that is not the synthetic world.

A curriculum grows the number of facts per episode (default 2 -> 4 -> 8 -> 16): a level
is left when held-out recall at that level passes a threshold, and at the latest on a
token schedule. Recall is always measured on entities from a part of ``NAME_POOL`` that no
training sequence ever contains (the last ``heldout_frac`` of the pool), with fresh values.

Entry points: :func:`pretrain` (what ``memact pretrain`` runs), :class:`Pretrainer` (one
run, steppable, used by ``benchmarks/recall_warmup.py`` to interleave configurations),
:class:`EpisodeBuilder` and :func:`answer_accuracy` (generator and metric, tested alone).
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memact.env.memory import ID_POOL
from memact.env.task import _FILLER, ATTRIBUTES, NAME_POOL, fact_sentence
from memact.env.tools import search_result_text, with_record_id
from memact.models.chatml import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    call_text,
    tool_response_text,
)
from memact.warmup.facts_config import PretrainConfig, cpu_has_bf16, parse_curriculum  # noqa: F401 (re-exported)

KINDS = ("recall", "copy", "note")


def split_names(heldout_frac: float, pool: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(training names, held-out names): the held-out names are the last ``heldout_frac`` of the pool."""
    pool = list(NAME_POOL if pool is None else pool)
    if not 0.0 < heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be strictly between 0 and 1, got {heldout_frac}")
    n_held = max(1, round(len(pool) * heldout_frac))
    return pool[:-n_held], pool[-n_held:]


# ---------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    """One tokenized episode and where its answers are.

    Attributes:
        ids: token ids, length L.
        targets: positions p in ``ids`` of answer tokens; the model predicts ``ids[p]`` from
            the logits at position ``p - 1``.
        kinds: ``"recall"``, ``"copy"`` or ``"note"`` for each target.
        baselines: for each target, the accuracy of a guesser that knows the kind of answer
            but not the binding: for recall/note, the share of facts in the episode with the
            asked attribute whose value is the answer; for copy, 1 / (number of record ids shown).
        entities: the entity names the episode mentions.
        n_facts: facts stated in the episode.
        text: the episode as text (for tests and debugging).
    """

    ids: list[int]
    targets: list[int]
    kinds: list[str]
    baselines: list[float]
    entities: list[str]
    n_facts: int
    text: str = ""

    def __len__(self) -> int:
        return len(self.ids)


class EpisodeBuilder:
    """Writes recall and prune episodes as text and tokenizes them with the task's tokenizer.

    Args:
        tokenizer: a fast tokenizer with one token per entity name, value and record id
            (``memact new-model`` builds one); checked at construction.
        fillers: filler sentences per document (the task uses 3; fewer means more facts per token).
        docs_per_record: documents per search-result record, at most.
        max_questions: questions asked per recall episode, at most (each asks a different fact).
        max_records: search records (questions) per prune episode, at most (the scripted
            expert prunes after one or two searches; more records make a harder copy).
        prune_docs: documents per search record of a prune episode, at most (the answer's
            document and up to ``prune_docs - 1`` others of the episode).
    """

    def __init__(self, tokenizer: Any, fillers: int = 1, docs_per_record: int = 3, max_questions: int = 8,
                 max_records: int = 3, prune_docs: int = 2):
        if fillers < 0 or fillers > len(_FILLER):
            raise ValueError(f"fillers must be from 0 to {len(_FILLER)}, got {fillers}")
        if min(docs_per_record, max_questions, max_records, prune_docs) < 1:
            raise ValueError(f"docs_per_record ({docs_per_record}), max_questions ({max_questions}), "
                             f"max_records ({max_records}) and prune_docs ({prune_docs}) must be >= 1")
        self.tokenizer = tokenizer
        self.fillers = fillers
        self.docs_per_record = docs_per_record
        self.max_questions = max_questions
        self.max_records = max_records
        self.prune_docs = prune_docs
        for word in (NAME_POOL[0], NAME_POOL[-1], ATTRIBUTES["pet"][0], ID_POOL[0]):
            if len(tokenizer.encode(word, add_special_tokens=False)) != 1:
                raise ValueError(
                    f"the tokenizer splits {word!r} into several tokens; the warm-up needs one token per "
                    "entity name, value and record id (build the model with `memact new-model`)"
                )
        self.token_id = {w: tokenizer.convert_tokens_to_ids(w) for w in NAME_POOL + ID_POOL}
        self.endoftext_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)

    # -- facts and documents

    @staticmethod
    def sample_facts(rng: random.Random, n_facts: int, names: list[str]) -> list[tuple[str, str, str]]:
        """``n_facts`` distinct (entity, attribute, value) facts over a few entities and attributes.

        At most ``n_facts // 2`` attributes, each shared by several entities, so that most
        questions need the entity and not just the attribute (an attribute-only guess is the
        baseline :class:`Episode` records); some entities have several attributes.
        """
        if n_facts < 1:
            raise ValueError(f"n_facts must be >= 1, got {n_facts}")
        attrs_all = list(ATTRIBUTES)
        n_attr = rng.randint(1, max(1, min(len(attrs_all), n_facts // 2)))
        attrs = rng.sample(attrs_all, n_attr)
        n_ent = rng.randint(math.ceil(n_facts / n_attr), n_facts)
        if n_ent > len(names):
            raise ValueError(f"{n_facts} facts need up to {n_ent} entity names, only {len(names)} available")
        entities = rng.sample(names, n_ent)
        pairs = [(e, rng.choice(attrs)) for e in entities]  # every entity appears at least once
        rest = [(e, a) for e in entities for a in attrs if (e, a) not in set(pairs)]
        pairs += rng.sample(rest, n_facts - len(pairs))
        rng.shuffle(pairs)
        return [(e, a, rng.choice(ATTRIBUTES[a])) for e, a in pairs]

    def document(self, rng: random.Random, fact: tuple[str, str, str]) -> str:
        sentences = [fact_sentence(*fact)] + rng.sample(_FILLER, self.fillers)
        rng.shuffle(sentences)
        return " ".join(sentences)

    @staticmethod
    def record(rid: str, docs: list[str]) -> str:
        """A search-result tool response as the agent sees it (ChatML user turn)."""
        return tool_response_text(with_record_id(rid, search_result_text(docs)))

    @staticmethod
    def _baseline(facts: list[tuple[str, str, str]], attribute: str, value: str) -> float:
        same = [v for _, a, v in facts if a == attribute]
        return sum(v == value for v in same) / len(same)

    # -- episodes

    def recall(self, rng: random.Random, n_facts: int, names: list[str]) -> Episode:
        """Records with ``n_facts`` facts in shuffled documents, then questions answered ``Qi: value``."""
        facts = self.sample_facts(rng, n_facts, names)
        docs = [self.document(rng, f) for f in facts]
        rng.shuffle(docs)
        n_rec = math.ceil(len(docs) / self.docs_per_record)
        rids = rng.sample(ID_POOL, n_rec)
        parts = [self.record(rid, docs[i * self.docs_per_record:(i + 1) * self.docs_per_record])
                 for i, rid in enumerate(rids)]
        text = "".join(parts)
        marks: list[tuple[int, str, str, float]] = []  # (char offset, word, kind, baseline)
        for i, (e, a, v) in enumerate(rng.sample(facts, min(n_facts, self.max_questions))):
            text += f"{IM_START}user\nQ{i + 1}: What is the {a} of {e}?{IM_END}\n{IM_START}assistant\nQ{i + 1}: "
            marks.append((len(text), v, "recall", self._baseline(facts, a, v)))
            text += f"{v}{IM_END}\n"
        return self._tokenize(text, marks, sorted({e for e, _, _ in facts}), n_facts)

    def prune(self, rng: random.Random, n_facts: int, names: list[str]) -> Episode:
        """Task head, one search + record per question, then ``prune_context`` (note + ids to delete)."""
        facts = self.sample_facts(rng, n_facts, names)
        asked = rng.sample(facts, min(n_facts, self.max_records))
        k = len(asked)
        rids = rng.sample(ID_POOL, k + 1)
        head = f"Answer all {k} questions." if k > 1 else "Answer the question."
        lines = [f"[id: {rids[0]}]", head] + [f"Q{i + 1}: What is the {a} of {e}?" for i, (e, a, _) in enumerate(asked)]
        text = f"{IM_START}user\n" + "\n".join(lines) + f"{IM_END}\n"
        for (e, a, v), rid in zip(asked, rids[1:]):
            call = call_text("search", {"query": f"{a} of {e}", "topk": self.prune_docs})
            others = [f for f in facts if f != (e, a, v)]
            shown = [(e, a, v)] + rng.sample(others, min(len(others), rng.randint(0, self.prune_docs - 1)))
            rng.shuffle(shown)
            text += f"{IM_START}assistant\n{call}{IM_END}\n"
            text += self.record(rid, [self.document(rng, f) for f in shown])
        # The call is written by hand in tool_call_json's layout so the answer offsets are known.
        marks: list[tuple[int, str, str, float]] = []
        text += f'{IM_START}assistant\n{TOOL_CALL_OPEN}\n{{"name": "prune_context", "arguments": {{"memory": "'
        for i, (_, a, v) in enumerate(asked):
            text += f"Q{i + 1}: " if i == 0 else f"; Q{i + 1}: "
            marks.append((len(text), v, "note", self._baseline(facts, a, v)))
            text += v
        text += '", "delete_ids": ['
        for i, rid in enumerate(rids[1:]):
            text += '"' if i == 0 else ', "'
            marks.append((len(text), rid, "copy", 1.0 / len(rids)))
            text += rid + '"'
        text += f"]}}}}\n{TOOL_CALL_CLOSE}{IM_END}\n"
        return self._tokenize(text, marks, sorted({e for e, _, _ in facts}), n_facts)

    def _tokenize(self, text: str, marks: list[tuple[int, str, str, float]], entities: list[str],
                  n_facts: int) -> Episode:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        start_to_pos = {start: p for p, (start, _) in enumerate(offsets)}
        targets = []
        for char, word, _, _ in marks:
            pos = start_to_pos.get(char)
            want = self.tokenizer.convert_tokens_to_ids(word)
            if pos is None or ids[pos] != want:
                raise RuntimeError(f"answer {word!r} at char {char} is not a single token of its own in: {text!r}")
            targets.append(pos)
        return Episode(ids, targets, [m[2] for m in marks], [m[3] for m in marks], entities, n_facts, text)


# ---------------------------------------------------------------------------- text


def stdlib_text(max_bytes: int = 1_000_000, seed: int = 0) -> list[str]:
    """Up to ``max_bytes`` of Python standard-library source files (present wherever Python is)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python source files under the standard library directory {root}")
    random.Random(seed).shuffle(files)
    chunks, size = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunks.append(text[: max_bytes - size])
        size += len(chunks[-1])
        if size >= max_bytes:
            break
    return chunks


# ---------------------------------------------------------------------------- data stream


@dataclass
class Row:
    """One training row: packed episodes (or a text window), then padding.

    ``ids`` has length seq_len; ``n_real`` tokens are real, the rest padding (no loss).
    """

    ids: list[int]
    n_real: int
    entities: list[str] = field(default_factory=list)
    n_facts: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)


class SequenceStream:
    """Training rows for a curriculum level, drawn from the training names only.

    Each row packs whole episodes separated by ``<|endoftext|>``; entity names are distinct
    across the episodes of a row, so an earlier episode never contradicts a later one.
    Rows are only as long as a level needs (:meth:`row_len`, a multiple of 64 up to
    ``seq_len``): attention makes long rows cost more per token, and a few fixed shapes keep
    oneDNN from rebuilding its kernels.

    Args:
        builder: the episode builder.
        seq_len: the longest row, in tokens.
        levels: facts per episode at each curriculum level, e.g. (2, 4, 8, 16).
        train_names: entity names training rows may use.
        prune_share: share of episodes that are prune episodes (the rest are recall).
        text_share: share of rows that are standard-library text windows (capped at 0.5).
        review: chance that an episode uses a random earlier level instead of the current one.
        forbidden_ids: token ids no training row may contain (the held-out names).
        seed: seeds the stream.
        text_bytes: characters of standard-library source to read (once, on the first text row).
    """

    def __init__(self, builder: EpisodeBuilder, seq_len: int, levels: tuple[int, ...], train_names: list[str],
                 prune_share: float = 0.3, text_share: float = 0.05, review: float = 0.3,
                 forbidden_ids: set[int] | None = None, seed: int = 0, text_bytes: int = 1_000_000):
        if not 0.0 <= text_share <= 0.5:
            raise ValueError(f"text_share must be from 0 to 0.5 (a small share), got {text_share}")
        if not 0.0 <= prune_share <= 1.0 or not 0.0 <= review <= 1.0:
            raise ValueError(f"prune_share ({prune_share}) and review ({review}) must be from 0 to 1")
        self.builder = builder
        self.seq_len = seq_len
        self.levels = levels
        self.train_names = list(train_names)
        self.prune_share = prune_share
        self.text_share = text_share
        self.review = review
        self.forbidden = set(forbidden_ids or ())
        self.rng = random.Random(seed)
        self.pad_id = builder.endoftext_id
        self._text_ids: list[int] | None = None
        self.text_bytes = text_bytes
        # Longest episode per (kind, level), from a few samples: the top level must fit a row,
        # and the tail of a row is filled with the largest recall episode that fits.
        probe = random.Random(seed + 1)
        self.max_len = {(kind, lv): max(len(self._episode(probe, lv, kind)) for _ in range(8))
                        for kind in ("recall", "prune") for lv in range(len(levels))}
        longest = max(self.max_len[k, len(levels) - 1] for k in ("recall", "prune"))
        if longest + 1 > seq_len:
            raise ValueError(f"seq_len {seq_len} is too short: episodes with {levels[-1]} facts take up to "
                             f"about {longest} tokens; raise --seq-len or lower the top curriculum level")

    def row_len(self, level: int) -> int:
        """Row length at level index ``level``: the level's longest probed episode plus 5%, to 64s."""
        longest = max(self.max_len[k, level] for k in ("recall", "prune"))
        return min(self.seq_len, math.ceil(longest * 1.05 / 64) * 64)

    def _episode(self, rng: random.Random, level: int, kind: str, names: list[str] | None = None) -> Episode:
        names = self.train_names if names is None else names
        make = self.builder.recall if kind == "recall" else self.builder.prune
        return make(rng, self.levels[level], names)

    def text_row(self, length: int) -> Row:
        """A window of ``length`` tokens of standard-library source free of held-out names."""
        if self._text_ids is None:
            # Files joined by <|endoftext|>, tokenized in 8k-character pieces: one long sequence makes
            # the tokenizer warn about the model's maximum length.
            ids: list[int] = []
            for text in stdlib_text(self.text_bytes):
                pieces = [text[i:i + 8192] for i in range(0, len(text), 8192)]
                for piece in self.builder.tokenizer(pieces, add_special_tokens=False)["input_ids"]:
                    ids.extend(piece)
                ids.append(self.pad_id)
            self._text_ids = ids
            if len(ids) <= self.seq_len:
                raise ValueError(f"standard-library text is only {len(ids)} tokens, shorter than seq_len")
        for _ in range(100):
            start = self.rng.randrange(len(self._text_ids) - length)
            window = self._text_ids[start:start + length]
            if not self.forbidden.intersection(window):
                return Row(window, length, kinds=["text"])
        raise RuntimeError("no standard-library window free of held-out names found in 100 tries")

    def row(self, level: int) -> Row:
        """A row for curriculum level index ``level`` (0-based)."""
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level index {level} outside the curriculum {self.levels}")
        rng = self.rng
        length = self.row_len(level)
        if self.text_share and rng.random() < self.text_share:
            return self.text_row(length)
        names = list(self.train_names)
        out = Row([], 0)
        misses = 0
        while True:
            lv = rng.randrange(level) if level and rng.random() < self.review else level
            kind = "prune" if rng.random() < self.prune_share else "recall"
            if len(names) < self.levels[lv]:
                break
            ep = self._episode(rng, lv, kind, names)
            sep = [self.pad_id] if out.ids else []
            if len(out.ids) + len(sep) + len(ep) > length:
                if not out.ids and misses < 20:
                    misses += 1  # an unusually long first episode: draw another rather than leave the row empty
                    continue
                # Fill the tail with the largest recall episode that surely fits (a review episode).
                room = length - len(out.ids) - len(sep)
                fits = [v for v in range(level + 1) if self.max_len["recall", v] <= room]
                if not out.ids or not fits or len(names) < self.levels[fits[-1]]:
                    break
                ep = self._episode(rng, fits[-1], "recall", names)
                if len(ep) > room:
                    break
                kind = "recall"
            out.ids += sep + ep.ids
            out.entities += ep.entities
            out.n_facts.append(ep.n_facts)
            out.kinds.append(kind)
            used = set(ep.entities)
            names = [n for n in names if n not in used]
        if not out.ids:
            raise RuntimeError(f"no episode of level {self.levels[level]} fitted a row of {length} tokens in 20 draws")
        out.n_real = len(out.ids)
        out.ids += [self.pad_id] * (length - out.n_real)
        return out

    def batch(self, level: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """About ``tokens`` token slots at level index ``level``.

        Returns (input ids [R, row_len], labels [R, row_len] with -100 on padding, real tokens),
        R = max(1, tokens // row_len(level)).
        """
        rows = [self.row(level) for _ in range(max(1, tokens // self.row_len(level)))]
        ids = torch.tensor([r.ids for r in rows], dtype=torch.long)
        labels = ids.clone()
        for i, r in enumerate(rows):
            labels[i, r.n_real:] = -100
        return ids, labels, sum(r.n_real for r in rows)


# ---------------------------------------------------------------------------- metric


def pad_episodes(episodes: list[Episode], pad_id: int, multiple: int = 64) -> torch.Tensor:
    """Right-padded ids [N, L] with L the longest episode rounded up to ``multiple`` (stable shapes)."""
    width = max(len(e) for e in episodes)
    width = math.ceil(width / multiple) * multiple
    return torch.tensor([e.ids + [pad_id] * (width - len(e)) for e in episodes], dtype=torch.long)


@torch.no_grad()
def answer_scores(model: Any, episodes: list[Episode], pad_id: int, micro_batch: int = 8,
                  bf16: bool = False) -> list[list[tuple[bool, float]]]:
    """For each episode and target: (argmax at the preceding position is the target, -log p(target) in nats).

    The model is called as ``model(input_ids=ids).logits`` ([B, L, V]); right padding needs no
    attention mask in a causal model (no real token attends to a later pad).
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    scores: list[list[tuple[bool, float]]] = []
    try:
        for start in range(0, len(episodes), micro_batch):
            chunk = episodes[start:start + micro_batch]
            ids = pad_episodes(chunk, pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids).logits
            for b, ep in enumerate(chunk):
                pos = torch.tensor(ep.targets, dtype=torch.long)
                step = logits[b, pos - 1].float()
                want = ids[b, pos]
                hit = (step.argmax(-1) == want).tolist()
                nll = (-torch.log_softmax(step, -1).gather(-1, want[:, None])[:, 0]).tolist()
                scores.append(list(zip(hit, nll)))
    finally:
        if was_training:
            model.train()
    return scores


def answer_metrics(model: Any, episodes: list[Episode], pad_id: int, bf16: bool = False
                   ) -> dict[str, dict[str, float]]:
    """Per target kind (recall / copy / note; kinds absent are left out): accuracy and mean answer NLL.

    Accuracy = share of answer positions where the argmax of the model's next-token logits is
    the answer token; NLL (nats) moves before accuracy does, so it separates short runs.
    """
    total: dict[str, list[float]] = {}
    for ep, sc in zip(episodes, answer_scores(model, episodes, pad_id, bf16=bf16)):
        for kind, (ok, nll) in zip(ep.kinds, sc):
            t = total.setdefault(kind, [0, 0.0, 0])
            t[0] += int(ok)
            t[1] += nll
            t[2] += 1
    return {k: {"acc": c / n, "nll": s / n} for k, (c, s, n) in total.items()}


def answer_accuracy(model: Any, episodes: list[Episode], pad_id: int, bf16: bool = False) -> dict[str, float]:
    """Accuracy per target kind over ``episodes`` (see :func:`answer_metrics`)."""
    return {k: v["acc"] for k, v in answer_metrics(model, episodes, pad_id, bf16).items()}


def baseline_accuracy(episodes: list[Episode]) -> dict[str, float]:
    """Mean per-target baseline (see :class:`Episode`) per kind: what a model gets without binding."""
    total: dict[str, list[float]] = {}
    for ep in episodes:
        for kind, b in zip(ep.kinds, ep.baselines):
            total.setdefault(kind, [0.0, 0])
            total[kind][0] += b
            total[kind][1] += 1
    return {k: s / n for k, (s, n) in total.items()}


# ---------------------------------------------------------------------------- training


class Pretrainer:
    """One warm-up run over a model and its tokenizer; :meth:`train_for` runs it in slices.

    Args:
        model: a causal LM (HF ``Qwen3ForCausalLM``), trained in place in fp32 (bf16 autocast
            where ``cfg.bf16``).
        tokenizer: its tokenizer (one token per world word).
        cfg: the run's settings.
        log_path: where to append one JSON line per evaluation (None: keep in ``self.curve`` only).
        name: label for progress lines.
        verbose: print one line per evaluation.
    """

    def __init__(self, model: Any, tokenizer: Any, cfg: PretrainConfig, log_path: str | Path | None = None,
                 name: str = "pretrain", verbose: bool = True):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.name, self.verbose = name, verbose
        self.log_path = Path(log_path) if log_path else None
        self.builder = EpisodeBuilder(tokenizer, fillers=cfg.fillers)
        self.train_names, self.heldout_names = split_names(cfg.heldout_frac)
        self.heldout_ids = sorted(self.builder.token_id[n] for n in self.heldout_names)
        self.stream = SequenceStream(
            self.builder, cfg.seq_len, cfg.curriculum, self.train_names, prune_share=cfg.prune_share,
            text_share=cfg.text_share, review=cfg.review, forbidden_ids=set(self.heldout_ids), seed=cfg.seed,
        )
        self.pad_id = self.builder.endoftext_id
        self.eval_sets = self._eval_sets()
        self.chance = {
            "uniform_value": 1.0 / len(ATTRIBUTES["pet"]),
            "attribute_only": {str(n): round(baseline_accuracy(s["recall"])["recall"], 4)
                               for n, s in self.eval_sets.items()},
            "copy": {str(n): round(baseline_accuracy(s["prune"])["copy"], 4) for n, s in self.eval_sets.items()},
        }
        self.optimizer = self._optimizer()
        if cfg.freeze_heldout:
            self._freeze_rows(self.heldout_ids)
        self.level = 0
        self.step = 0
        self.tokens = 0
        self.train_s = 0.0
        self._losses: list[float] = []
        self._tok_since = 0
        self._s_since = 0.0
        self.curve: list[dict[str, Any]] = []
        model.train()

    # -- setup

    def _eval_sets(self) -> dict[int, dict[str, list[Episode]]]:
        """Fixed evaluation episodes per level: held-out names (recall, prune) and training names (recall).

        Sized by answers, not episodes: about ``eval_targets`` held-out recall answers per level
        (a 2-fact episode asks 2 questions, a 16-fact one ``max_questions``), a quarter of that
        for the prune and seen-name sets.
        """
        rng = random.Random(10_000 + self.cfg.seed)
        b = self.builder
        sets = {}
        for level in self.cfg.curriculum:
            per_recall = min(level, b.max_questions)
            n_rec = math.ceil(self.cfg.eval_targets / per_recall)
            n_quarter = math.ceil(n_rec / 4)
            n_prune = math.ceil(self.cfg.eval_targets / 4 / min(level, b.max_records))
            sets[level] = {
                "recall": [b.recall(rng, level, self.heldout_names) for _ in range(n_rec)],
                "prune": [b.prune(rng, level, self.heldout_names) for _ in range(n_prune)],
                "recall_seen": [b.recall(rng, level, self.train_names) for _ in range(n_quarter)],
            }
        return sets

    def _optimizer(self) -> torch.optim.Optimizer:
        # No weight decay on embeddings (rare tokens would only shrink) nor on norm gains.
        emb = self.model.get_input_embeddings().weight
        decay, no_decay = [], []
        for p in self.model.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p is emb or p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.95), eps=1e-8)

    def _freeze_rows(self, rows: list[int]) -> None:
        """Zero the gradient of the held-out names' embedding rows.

        With tied embeddings every unused token still gets a small gradient from the softmax
        (pushed down as a wrong answer), all in the same direction; Adam scales such a steady
        gradient up to about ``lr`` per step, so within a few hundred steps all unseen names
        would drift to nearly the same vector and could no longer be told apart in context.
        Frozen, they keep their random initial embeddings: held-out recall then measures
        whether recall works on tokens the model has never trained on.
        """
        index = torch.tensor(rows, dtype=torch.long)
        weight = self.model.get_input_embeddings().weight

        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad.index_fill(0, index, 0.0)

        weight.register_hook(hook)

    # -- schedule

    def lr_at(self, tokens: int) -> float:
        """Linear warm-up over ``warmup`` of the tokens, then cosine down to ``lr * min_lr_ratio``."""
        cfg = self.cfg
        frac = min(1.0, tokens / cfg.tokens)
        if cfg.warmup and frac < cfg.warmup:
            return cfg.lr * max(frac / cfg.warmup, 0.01)
        t = (frac - cfg.warmup) / (1.0 - cfg.warmup)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    @property
    def done(self) -> bool:
        return self.tokens >= self.cfg.tokens

    def _scheduled_level(self) -> int:
        """The level the token schedule demands at least: the budget is split evenly over the levels."""
        n = len(self.cfg.curriculum)
        return min(n - 1, int(self.tokens / self.cfg.tokens * n))

    # -- training

    def train_step(self) -> float:
        """One optimizer step on a fresh batch; returns its loss (mean cross-entropy per real token)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        ids, labels, n_real = self.stream.batch(self.level, cfg.batch * cfg.seq_len)
        lr = self.lr_at(self.tokens)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = self.model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens += n_real
        self.train_s += dt
        self._tok_since += n_real
        self._s_since += dt
        value = loss.item()
        self._losses.append(value)
        return value

    def evaluate(self, all_levels: bool = False) -> dict[str, Any]:
        """Held-out recall (and copy / note / seen-name recall) per level; may advance the curriculum.

        Levels above the next one are skipped (left out of the row) until ``all_levels`` or the
        end of the run: their episodes are the longest and the model has not trained on them.
        """
        t0 = time.perf_counter()
        row: dict[str, Any] = {
            "tokens": self.tokens, "step": self.step, "level": self.cfg.curriculum[self.level],
            "loss": round(sum(self._losses) / len(self._losses), 4) if self._losses else None,
            "lr": self.lr_at(self.tokens), "tok_s": round(self._tok_since / self._s_since) if self._s_since else None,
            "recall": {}, "recall_seen": {}, "copy": {}, "note": {}, "recall_nll": {},
        }
        upto = len(self.cfg.curriculum) if all_levels or self.done else self.level + 2
        for n in self.cfg.curriculum[:upto]:
            sets = self.eval_sets[n]
            rec = answer_metrics(self.model, sets["recall"], self.pad_id, self.cfg.bf16)["recall"]
            pr = answer_metrics(self.model, sets["prune"], self.pad_id, self.cfg.bf16)
            seen = answer_metrics(self.model, sets["recall_seen"], self.pad_id, self.cfg.bf16)["recall"]
            row["recall"][str(n)] = round(rec["acc"], 4)
            row["recall_nll"][str(n)] = round(rec["nll"], 4)
            row["copy"][str(n)] = round(pr["copy"]["acc"], 4)
            row["note"][str(n)] = round(pr["note"]["acc"], 4)
            row["recall_seen"][str(n)] = round(seen["acc"], 4)
        row["eval_s"] = round(time.perf_counter() - t0, 2)
        row["train_s"] = round(self.train_s, 2)
        row["chance"] = self.chance
        # Advance: threshold passed at the current level, and/or the schedule says so.
        current = row["recall"][str(self.cfg.curriculum[self.level])]
        target = self._scheduled_level() if self.cfg.advance != "threshold" else self.level
        if self.cfg.advance != "schedule" and current >= self.cfg.advance_at:
            target = max(target, self.level + 1)
        self.level = min(max(self.level, target), len(self.cfg.curriculum) - 1)
        row["next_level"] = self.cfg.curriculum[self.level]
        self.curve.append(row)
        self._losses, self._tok_since, self._s_since = [], 0, 0.0
        if self.log_path:
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.verbose:
            rec = " ".join(f"{k}:{v:.2f} ({row['recall_nll'][k]:.2f} nats)" for k, v in row["recall"].items())
            cp = " ".join(f"{k}:{v:.2f}" for k, v in row["copy"].items())
            print(f"[{self.name}] step {self.step} tokens {self.tokens:,} loss {row['loss']} "
                  f"level {row['level']} | held-out recall {rec} | copy {cp} | {row['tok_s']} tok/s", flush=True)
        return row

    def train_for(self, seconds: float | None = None, steps: int | None = None) -> None:
        """Train until done, or for about ``seconds`` of wall time / ``steps`` steps (whichever first).

        Evaluates at step 0, every ``eval_every`` steps and at the end.
        """
        torch.set_num_threads(self.cfg.threads)
        t_end = time.perf_counter() + seconds if seconds is not None else None
        n = 0
        if self.step == 0 and not self.curve:
            self.evaluate()
        while not self.done:
            if (t_end is not None and time.perf_counter() >= t_end) or (steps is not None and n >= steps):
                return
            self.train_step()
            n += 1
            if self.step % self.cfg.eval_every == 0 or self.done:
                self.evaluate()


def plot_curve(curve: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Held-out recall accuracy (per level) and id-copy accuracy against tokens seen, with chance levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    levels = list(curve[0]["chance"]["attribute_only"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def series(key: str, level: str) -> tuple[list[float], list[float]]:
        # Levels far above the current one are not evaluated during training: skip the gaps.
        pts = [(r["tokens"] / 1e6, r[key][level]) for r in curve if level in r[key]]
        return [p[0] for p in pts], [p[1] for p in pts]

    for i, level in enumerate(levels):
        c = colors[i % len(colors)]
        ax.plot(*series("recall", level), color=c, marker=".", label=f"recall, {level} facts")
        ax.axhline(curve[0]["chance"]["attribute_only"][level], color=c, linestyle=":", linewidth=0.8)
    first = levels[0]
    ax.plot(*series("copy", first), color="black", linestyle="--", label=f"id copy ({first}-fact prune)")
    ax.axhline(curve[0]["chance"]["uniform_value"], color="grey", linestyle="-.", linewidth=0.8,
               label="uniform over the attribute's values")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("accuracy at the answer token (held-out names)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "in-context recall warm-up (dotted: attribute-only baseline)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pretrain(model_dir: str | Path, out: str | Path, cfg: PretrainConfig) -> Path:
    """Warm up the model in ``model_dir``; write model + tokenizer, the curve and its plot to ``out``.

    Output (written to a hidden sibling directory and renamed into place at the end):
    ``config.json``/weights/tokenizer (``save_pretrained``), ``recall_curve.jsonl``,
    ``recall_curve.png``, ``pretrain_config.json``.
    """
    from memact.models.model import count_parameters, load_policy, publish, staging_dir

    out = Path(out)
    torch.set_num_threads(cfg.threads)
    model, tokenizer = load_policy(model_dir)
    staging = staging_dir(out)
    (staging / "pretrain_config.json").write_text(json.dumps({**asdict(cfg), "bf16": cfg.bf16, "model": str(model_dir)}, indent=1))
    trainer = Pretrainer(model, tokenizer, cfg, log_path=staging / "recall_curve.jsonl")
    print(f"[memact] pretrain: {count_parameters(model):,} parameters, {cfg.tokens:,} tokens, levels "
          f"{cfg.curriculum}, {len(trainer.heldout_names)} held-out names; chance (attribute only) "
          f"{trainer.chance['attribute_only']}", flush=True)
    trainer.train_for()
    plot_curve(trainer.curve, staging / "recall_curve.png")
    publish(model, tokenizer, staging, out)
    last = trainer.curve[-1]
    print(f"[memact] wrote {out}: held-out recall {last['recall']} after {trainer.tokens:,} tokens "
          f"({trainer.tokens / max(trainer.train_s, 1e-9):,.0f} tok/s)", flush=True)
    return out
