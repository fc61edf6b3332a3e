"""Multi-objective QA over a fictional knowledge base, generated from a seed.

Every task brings its own small world: a set of entities, each with attribute values,
stated one fact per document among distractor sentences. Facts are drawn fresh per task,
so an agent can only answer by searching and reading its context, never by memorising.

Entity names, attribute values and record ids come from fixed pools (the same on every
machine) so that a tokenizer can give each one a single token (see
``memact.models.tokenizer``).
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from typing import Any

from memact.util.safejson import MAX_DEPTH, nesting_depth
from memact.util.seeds import derive_seed

# Attribute -> the values it takes. Every value is one plain word, distinct across attributes.
ATTRIBUTES: dict[str, list[str]] = {
    "color": ["crimson", "amber", "teal", "violet", "ochre", "ivory", "cobalt", "olive", "scarlet",
              "indigo", "silver", "maroon"],
    "pet": ["owl", "fox", "ferret", "parrot", "tortoise", "hamster", "lizard", "rabbit", "goat", "pony",
            "falcon", "otter"],
    "job": ["baker", "pilot", "sculptor", "nurse", "plumber", "chemist", "farmer", "tailor", "jeweler",
            "poet", "judge", "miner"],
    "food": ["mango", "lentils", "noodles", "pretzels", "walnuts", "figs", "radish", "oysters",
             "dumplings", "porridge", "tofu", "sardines"],
    "sport": ["fencing", "rowing", "archery", "curling", "polo", "rugby", "karate", "cricket", "squash",
              "sailing", "hurling", "skiing"],
    "instrument": ["cello", "banjo", "flute", "harp", "oboe", "sitar", "tuba", "violin", "zither",
                   "bagpipes", "lute", "trumpet"],
    "city": ["Varnholm", "Quillport", "Ostreva", "Belmira", "Tarkesh", "Lunador", "Cravel", "Essino",
             "Myrrow", "Dunhaven", "Pellora", "Zanthe"],
    "gem": ["opal", "garnet", "topaz", "jade", "onyx", "pearl", "ruby", "beryl", "agate", "jasper",
            "quartz", "zircon"],
}

# Distractor sentences: they share no content word with any question, so a search for
# "<attribute> of <entity>" ranks the one document stating that fact first.
_FILLER = [
    "The archive was rebuilt after the flood.",
    "Records from that year are incomplete.",
    "The valley road closes in winter.",
    "Several letters mention a long journey.",
    "The census counted every household twice.",
    "A later edition corrected the dates.",
    "Nobody remembers who wrote the first page.",
    "The harbor was busy that summer.",
    "Most of the old maps were lost.",
    "The bridge was painted again in spring.",
    "Visitors often arrive by the northern gate.",
    "The library keeps a copy of every ledger.",
]


def make_name_pool(size: int = 320, seed: int = 7) -> list[str]:
    """Invented, pronounceable entity names; the same on every machine."""
    rng = random.Random(seed)
    onsets = ["B", "C", "D", "F", "G", "H", "J", "K", "L", "M", "N", "P", "R", "S", "T", "V", "Z",
              "Br", "Dr", "Gr", "Kr", "Tr", "Vr", "Th", "Sh"]
    vowels = ["a", "e", "i", "o", "u", "ae", "io"]
    mids = ["l", "r", "n", "v", "m", "d", "k", "s", "th", "x"]
    codas = ["", "n", "r", "x", "s", "th", "l", "k"]
    taken = {v.lower() for vals in ATTRIBUTES.values() for v in vals}
    names: list[str] = []
    while len(names) < size:
        name = rng.choice(onsets) + rng.choice(vowels) + rng.choice(mids) + rng.choice(vowels) + rng.choice(codas)
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    return names


NAME_POOL = make_name_pool()


def world_vocabulary() -> list[str]:
    """Words that must each be a single token: entity names and attribute values."""
    values = [v for vals in ATTRIBUTES.values() for v in vals]
    return NAME_POOL + values


@dataclass
class SubQuestion:
    """One objective of a task."""

    key: str  # "Q1", "Q2", ...
    text: str  # the question as shown to the agent
    answer: str  # gold answer
    query: str  # what an expert would search for
    entity: str = ""
    attribute: str = ""
    aliases: list[str] = field(default_factory=list)  # other accepted answers
    supporting: list[str] = field(default_factory=list)  # titles of supporting documents (HotpotQA)


@dataclass
class Task:
    """A multi-objective question with its own retrieval corpus."""

    task_id: str
    questions: list[SubQuestion]
    documents: list[str]
    source: str = "synthetic"
    retrieval: str = "task"
    """What ``search`` queries (``memact.env.retrieval``): ``task`` (bm25s over ``documents``),
    ``index:DIR`` or ``http:URL``."""

    @property
    def k(self) -> int:
        return len(self.questions)

    def prompt_text(self) -> str:
        lines = [f"Answer all {self.k} questions." if self.k > 1 else "Answer the question."]
        lines += [f"{q.key}: {q.text}" for q in self.questions]
        return "\n".join(lines)

    def gold(self) -> dict[str, str]:
        return {q.key: q.answer for q in self.questions}

    def make_env(self, seed: int = 0, memory_tool: bool = True, budget: Any = None) -> Any:
        """This task's episode environment (a :class:`memact.env.tools.AgentEnv`; other task families
        bring their own, e.g. :class:`memact.env.history.HistoryEnv`)."""
        from memact.env.tools import AgentEnv

        return AgentEnv(self, seed=seed, memory_tool=memory_tool, budget=budget)

    def find_answer(self, key: str, text: str) -> str | None:
        """The answer to sub-question ``key`` if ``text`` states it (used by the scripted expert)."""
        q = next(q for q in self.questions if q.key == key)
        if q.entity and q.attribute:
            m = re.search(rf"The {re.escape(q.attribute)} of {re.escape(q.entity)} is (\S+?)\.", text)
            return m.group(1) if m else None
        # Data without a structured fact (HotpotQA): the expert is given the gold answer and
        # takes it once it has read the answer itself or a supporting document (yes/no answers).
        if normalize_answer(q.answer) in normalize_answer(text).split(" ") or (
            len(q.answer.split()) > 1 and normalize_answer(q.answer) in normalize_answer(text)
        ):
            return q.answer
        if any(f"{title}:" in text for title in q.supporting):
            return q.answer
        return None


def fact_sentence(entity: str, attribute: str, value: str) -> str:
    return f"The {attribute} of {entity} is {value}."


# Halves of the filler sentences: a long document recombines them (subject + predicate), so it
# reads like more text without a word the short task does not already use.
_FILLER_HALVES = [(s[:i], s[i:]) for s in _FILLER for i in [next(
    m.start() for m in re.finditer(r" (was|are|closes|mention|counted|corrected|remembers|were|often|keeps) ", s))]]


def _padding(rng: random.Random, words: int) -> list[str]:
    """Filler sentences of about ``words`` words in all."""
    out, n = [], 0
    while n < words:
        subject, predicate = rng.choice(_FILLER_HALVES)[0], rng.choice(_FILLER_HALVES)[1]
        out.append(subject + predicate)
        n += len(out[-1].split())
    return out


def make_task(seed: int, k: int, n_entities: int | None = None, distractors: int = 3, doc_words: int = 0) -> Task:
    """A seeded task with ``k`` sub-questions.

    Args:
        seed: the task's seed; the same seed gives the same world, questions and documents.
        k: number of sub-questions (objectives), >= 1.
        n_entities: entities in this task's world (default: max(6, k + 4)).
        distractors: sentences about other facts or filler placed in each document.
        doc_words: the long-document variant (``memact.env.sources``, ``long:WORDS``): every document
            padded with recombined filler to about this many words, its fact at a random place. The
            world and the questions are those of the same seed without it.
    """
    if k < 1:
        raise ValueError(f"k (number of objectives) must be >= 1, got {k}")
    rng = random.Random(seed)
    n_entities = n_entities or max(6, k + 4)
    entities = rng.sample(NAME_POOL, n_entities)
    attrs = list(ATTRIBUTES)
    kb = {e: {a: rng.choice(ATTRIBUTES[a]) for a in attrs} for e in entities}
    facts = [(e, a) for e in entities for a in attrs]
    documents = []
    for e, a in facts:
        sentences = [fact_sentence(e, a, kb[e][a])] + rng.sample(_FILLER, distractors)
        rng.shuffle(sentences)
        documents.append(" ".join(sentences))
    if doc_words > 0:
        pad = random.Random(f"long-{seed}")  # its own stream: the world above is the short task's
        for i, doc in enumerate(documents):
            sentences = [doc, *_padding(pad, doc_words - len(doc.split()))]
            pad.shuffle(sentences)
            documents[i] = " ".join(sentences)
    asked = rng.sample(facts, k) if k <= len(facts) else [rng.choice(facts) for _ in range(k)]
    questions = [
        SubQuestion(
            key=f"Q{i + 1}", text=f"What is the {a} of {e}?", answer=kb[e][a], query=f"{a} of {e}",
            entity=e, attribute=a,
        )
        for i, (e, a) in enumerate(asked)
    ]
    prefix = f"long{doc_words}" if doc_words > 0 else "syn"
    return Task(task_id=f"{prefix}-k{k}-s{seed}", questions=questions, documents=documents,
                source="long" if doc_words > 0 else "synthetic")


def make_tasks(n: int, k: int, seed: int, distractors: int = 3, doc_words: int = 0) -> list[Task]:
    """``n`` tasks with ``k`` objectives; task i uses the ``task`` seed stream (``memact.util.seeds``)."""
    return [make_task(derive_seed(seed, "task", i), k, distractors=distractors, doc_words=doc_words)
            for i in range(n)]


# ---------------------------------------------------------------------------- answers


FINAL_ANSWER = "FINAL_ANSWER:"
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD/HotpotQA style)."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def parse_final_answer(text: str) -> dict[str, str] | None:
    """The answer dict after ``FINAL_ANSWER:``, or None if absent or not a JSON object."""
    pos = text.find(FINAL_ANSWER)
    if pos < 0:
        return None
    body = text[pos + len(FINAL_ANSWER):].strip()
    for end in ("<|im_end|>", "<|endoftext|>"):
        body = body.split(end)[0].strip()
    start = body.find("{")
    if start < 0:
        return None
    if nesting_depth(body[start:]) > MAX_DEPTH:  # json recurses once per level (memact.util.safejson)
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(body[start:])
        if not isinstance(obj, dict):
            return None
        return {str(k): str(v) for k, v in obj.items()}
    except (ValueError, RecursionError):  # malformed, a huge integer, ...
        return None


def token_f1(prediction: str, gold: str) -> float:
    """Token-level F1 between normalised strings (HotpotQA's metric)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common: dict[str, int] = {}
    for t in pred:
        if t in ref:
            common[t] = min(pred.count(t), ref.count(t))
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


PENALTY = -0.1


def score_answer(task: Task, answer: dict[str, str] | None) -> tuple[float, list[bool]]:
    """Reward and per-sub-question correctness.

    Reward = share of sub-questions answered exactly (after normalisation), or -0.1 when
    the answer can't be parsed.
    """
    if answer is None:
        return PENALTY, [False] * task.k
    correct = []
    for q in task.questions:
        accepted = {normalize_answer(a) for a in [q.answer, *q.aliases]}
        correct.append(normalize_answer(answer.get(q.key, "")) in accepted)
    return sum(correct) / task.k, correct
