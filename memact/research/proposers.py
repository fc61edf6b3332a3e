"""Proposers: who suggests the next edit of train.py.

Every proposer has one method, ``propose(context_text, best_source, experiment)``, and
returns a :class:`Proposal` holding either the whole new source (``new_source``) or a
unified diff (``patch``) that the loop applies with ``git apply``, all or nothing.

- ``context``: an offline proposer that reads only its context (a measuring instrument for memories).
- ``mutate``: an offline classical baseline. It perturbs the hyperparameter constants at
  the top of train.py around the best version (seeded, multiplicative, within bounds). It
  does not read the context: it is the fair "random search" a learned proposer must beat.
- ``openai:MODEL``: a chat model behind an OpenAI-compatible endpoint writes a patch.
- ``policy:MODEL_DIR``: the trained memact policy, served, reached the same way.
"""

from __future__ import annotations

import ast
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Protocol

from memact.env.history import read_context
from memact.research.endpoint import Endpoint


@dataclass
class Proposal:
    """One proposed experiment: a one-line description and either a new source or a patch."""

    description: str
    new_source: str | None = None
    patch: str | None = None


class Proposer(Protocol):
    def propose(self, context_text: str, best_source: str, experiment: int) -> Proposal:
        """The next edit of train.py, given the agent's context and the best source so far."""
        ...


# ---- Constants of train.py --------------------------------------------------------------


@dataclass(frozen=True)
class Tunable:
    """How the mutate proposer may move one constant.

    Attributes:
        low, high: inclusive bounds, sane for both templates.
        max_factor: a move multiplies by a factor drawn log-uniformly from
            [1/max_factor, max_factor], at least MIN_FACTOR away from 1.
        integer: the value is rounded to an int (and WIDTH to a multiple of N_HEADS).
    """

    low: float
    high: float
    max_factor: float
    integer: bool


TUNABLES = {
    "LEARNING_RATE": Tunable(1e-5, 5e-2, 3.0, integer=False),
    "WIDTH": Tunable(16, 4096, 1.6, integer=True),
    "DEPTH": Tunable(1, 48, 2.0, integer=True),
    "BATCH_SIZE": Tunable(1, 1024, 2.0, integer=True),
    "WARMUP_STEPS": Tunable(1, 5000, 3.0, integer=True),
}
MIN_FACTOR = 1.25  # smaller moves are lost in run-to-run noise; not worth an experiment
HEADS_NAME = "N_HEADS"  # WIDTH must stay a multiple of this constant


def find_constants(source: str) -> dict[str, tuple[int, int, int, int | float]]:
    """Module-level ``NAME = <number>`` assignments: name -> (line, start col, end col, value).

    Lines are 1-based, columns index the value's text on that line. Only plain int and
    float literals count, so a computed value is never rewritten.
    """
    found: dict[str, tuple[int, int, int, int | float]] = {}
    for node in ast.parse(source).body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
            and type(node.value.value) in (int, float)
            and node.value.lineno == node.value.end_lineno
        ):
            v = node.value
            found[node.targets[0].id] = (v.lineno, v.col_offset, v.end_col_offset, v.value)
    return found


def constant_values(source: str) -> dict[str, str]:
    """The constants of ``source`` as a history states them: name -> short literal."""
    return {name: format_value(c[3]) for name, c in find_constants(source).items()}


def format_value(value: int | float) -> str:
    """A short literal: ints as they are, floats with 3 significant digits."""
    if isinstance(value, int):
        return str(value)
    return repr(float(f"{value:.3g}"))


def set_constants(source: str, values: dict[str, int | float]) -> str:
    """``source`` with the literal of each named module-level constant replaced; comments kept."""
    found = find_constants(source)
    missing = [name for name in values if name not in found]
    if missing:
        raise ValueError(f"train.py has no numeric constant named {', '.join(missing)}")
    lines = source.splitlines(keepends=True)
    for name, value in values.items():
        lineno, start, end, _ = found[name]
        # ast columns count UTF-8 bytes; constants lines are ASCII up to the value.
        line = lines[lineno - 1]
        lines[lineno - 1] = line[:start] + format_value(value) + line[end:]
    return "".join(lines)


def _moved(rng: random.Random, name: str, value: int | float, heads: int) -> int | float | None:
    """A new value for one constant, or None when no legal move exists from ``value``."""
    spec = TUNABLES[name]
    for _ in range(20):
        log_f = rng.uniform(math.log(MIN_FACTOR), math.log(spec.max_factor)) * rng.choice((-1, 1))
        new: int | float = value * math.exp(log_f)
        if spec.integer:
            unit = heads if name == "WIDTH" else 1
            new = int(max(unit, round(new / unit) * unit))
            if new == value:  # small ints: round back to the same value, take one unit step
                new = value + unit * (1 if log_f > 0 else -1)
        else:
            new = float(format_value(new))
        new = min(max(new, spec.low), spec.high)
        if spec.integer and name == "WIDTH":
            new = new - new % heads
        if new != value and spec.low <= new <= spec.high:
            return new
    return None


class MutateProposer:
    """Random multiplicative perturbation of 1-2 hyperparameter constants around the best.

    The RNG is seeded from ``(seed, experiment)``, so a resumed run proposes what the
    interrupted one would have.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def propose(self, context_text: str, best_source: str, experiment: int) -> Proposal:
        rng = random.Random(f"mutate-{self.seed}-{experiment}")
        constants = {name: c[3] for name, c in find_constants(best_source).items()}
        names = [n for n in TUNABLES if n in constants]
        if not names:
            raise ValueError(f"train.py defines none of the tunable constants {', '.join(TUNABLES)}")
        heads = int(constants.get(HEADS_NAME, 1))
        n_moves = 1 if rng.random() < 0.7 or len(names) == 1 else 2
        changes: dict[str, int | float] = {}
        for name in rng.sample(names, len(names)):
            new = _moved(rng, name, constants[name], heads)
            if new is not None:
                changes[name] = new
            if len(changes) == n_moves:
                break
        if not changes:
            raise ValueError("no tunable constant of train.py can move within its bounds")
        description = "; ".join(
            f"{n} {format_value(constants[n])} -> {format_value(v)}" for n, v in sorted(changes.items())
        )
        return Proposal(description=description, new_source=set_constants(best_source, changes))


# ---- The context-reading proposer -----------------------------------------------------------

GRID = (1.25, 1.6, 2.5)  # the factors a context proposer moves a constant by, up or down


class ContextProposer:
    """An offline proposer that knows only its context: a measuring instrument for memories.

    It moves one constant of the best train.py by a factor of the grid :data:`GRID` (up or down).
    What it reads from its context (:func:`read_context`) steers it: a change it can see was tried
    is never proposed again while another is left; a direction it can see was kept is followed
    (half the time, the last such direction first); a move past a value it can see crashed is
    not made; a constant a note says was often kept is preferred when it explores. What it cannot
    see, it does not know: a memory that drops the wrong records makes it repeat failures and
    lose the directions that helped. Seeded by ``(seed, experiment)``, so it is deterministic
    given its context. docs/research.md, "Measuring a memory".
    """

    def __init__(self, seed: int = 0, follow: float = 0.5):
        self.seed, self.follow = seed, follow

    def candidates(self, constants: dict[str, int | float], heads: int) -> list[tuple[str, int | float, int]]:
        """Every legal one-constant move of the grid: ``(name, new value, direction)``."""
        out = []
        for name in (n for n in TUNABLES if n in constants):
            spec, value = TUNABLES[name], constants[name]
            for factor in GRID:
                for up in (1, -1):
                    new: int | float = value * factor ** up
                    if spec.integer:
                        unit = heads if name == "WIDTH" else 1
                        new = int(max(unit, round(new / unit) * unit))
                    else:
                        new = float(format_value(new))
                    if new != value and spec.low <= new <= spec.high:
                        out.append((name, new, up))
        return out

    def propose(self, context_text: str, best_source: str, experiment: int) -> Proposal:
        rng = random.Random(f"context-{self.seed}-{experiment}")
        constants = {name: c[3] for name, c in find_constants(best_source).items()}
        heads = int(constants.get(HEADS_NAME, 1))
        seen = read_context(context_text)
        moves = {}
        for name, new, up in self.candidates(constants, heads):
            limit = seen.crashed.get((name, up))
            if limit is not None and (new >= limit if up > 0 else new <= limit):
                continue  # at or past a value that crashed
            moves.setdefault((name, format_value(constants[name]), format_value(new)), (name, new, up))
        if not moves:
            raise ValueError("no tunable constant of train.py can move within its bounds")
        fresh = [m for key, m in moves.items() if frozenset([key]) not in seen.tried]
        if not fresh:  # every single move it can see was tried: two at once, one not seen yet
            keys = list(moves)
            pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:] if a[0] != b[0]
                     and frozenset([a, b]) not in seen.tried]
            if pairs:
                a, b = rng.choice(pairs)
                changes = {a[0]: moves[a][1], b[0]: moves[b][1]}
                return Proposal(description="; ".join(f"{n} {format_value(constants[n])} -> {format_value(v)}"
                                                      for n, v in sorted(changes.items())),
                                new_source=set_constants(best_source, changes))
        pool = fresh or list(moves.values())  # everything was tried: a repeat, knowingly
        pick = None
        if seen.helped and rng.random() < self.follow:
            for name, up in reversed(seen.helped):
                along = [m for m in pool if m[0] == name and m[2] == up]
                if along:
                    pick = min(along, key=lambda m: abs(math.log(m[1] / constants[name])))  # the smallest step on
                    break
        if pick is None:
            weights = [1.0 + 2.0 * (seen.kept_tried[m[0]][0] / max(seen.kept_tried[m[0]][1], 1))
                       if m[0] in seen.kept_tried else 1.0 for m in pool]
            pick = rng.choices(pool, weights=weights)[0]
        name, new, _ = pick
        return Proposal(description=f"{name} {format_value(constants[name])} -> {format_value(new)}",
                        new_source=set_constants(best_source, {name: new}))


# ---- Language-model proposers ---------------------------------------------------------------

SYSTEM_PROMPT = """\
You are a research agent improving a training script. Follow the rules in the program below.
Each turn you propose exactly one experiment: one edit of train.py."""

REPLY_FORMAT = """\
Propose the next experiment. Answer with one line
DESCRIPTION: <what you change and why, under 100 characters>
followed by a unified diff of train.py in a ```diff block, with headers
--- a/train.py and +++ b/train.py and a few lines of unchanged context around each change."""


class ReplyError(ValueError):
    """A chat reply the proposer cannot use; the loop logs it as a proposer failure."""


def _valid_text(text: str) -> str:
    """``text`` with lone surrogates (JSON allows them, UTF-8 does not) replaced by U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def reply_text(message: Any) -> str:
    """The text of a chat reply's ``message``: its ``content`` string, or the text parts of a
    list of content parts (``{"type": "text", "text": ...}``, as the OpenAI API allows) joined.

    Raises ReplyError for anything else: a message that is not an object, no content, a
    content that is a number or an object, a list without text parts.
    """
    if not isinstance(message, dict):
        raise ReplyError(f"the reply's message is a {type(message).__name__}, not an object")
    content = message.get("content")
    if isinstance(content, str):
        return _valid_text(content)
    if isinstance(content, list):
        texts = [part if isinstance(part, str) else part.get("text") for part in content
                 if isinstance(part, str) or (isinstance(part, dict) and part.get("type", "text") == "text")]
        texts = [t for t in texts if isinstance(t, str)]
        if not texts:
            raise ReplyError(f"the reply's content is a list of {len(content)} part(s) without text")
        return _valid_text("".join(texts))
    if content is None:
        raise ReplyError("the reply has no content" + (" (only tool calls)" if message.get("tool_calls") else ""))
    raise ReplyError(f"the reply's content is a {type(content).__name__}, not text")


def parse_reply(text: str) -> Proposal:
    """The description and patch in a model's reply; the patch is empty when none is found."""
    if not isinstance(text, str):
        raise ReplyError(f"the reply is a {type(text).__name__}, not text")
    text = _valid_text(text)
    match = re.search(r"^\s*DESCRIPTION:\s*(.+)$", text, flags=re.MULTILINE | re.IGNORECASE)
    description = match.group(1).strip() if match else "(no description)"
    fenced = re.search(r"```(?:diff|patch)?[ \t]*\n(.*?)```", text, flags=re.DOTALL)
    if fenced:
        patch = fenced.group(1)
    else:
        start = re.search(r"^(diff --git|--- )", text, flags=re.MULTILINE)
        patch = text[start.start() :] if start else ""
    # Models often drop git's a/ and b/ prefixes; git apply strips one path component.
    patch = re.sub(r"^--- (?!a/|/dev/null)(\S+)", r"--- a/\1", patch, flags=re.MULTILINE)
    patch = re.sub(r"^\+\+\+ (?!b/|/dev/null)(\S+)", r"+++ b/\1", patch, flags=re.MULTILINE)
    return Proposal(description=description[:200], patch=patch)


def proposal_from_message(message: Any) -> Proposal:
    """The proposal in a chat reply's message; ReplyError when the message holds no usable text."""
    return parse_reply(reply_text(message))


class ChatProposer:
    """A chat model that answers with a description and a unified diff of train.py."""

    def __init__(self, endpoint: Endpoint, temperature: float = 0.7):
        self.endpoint = endpoint
        self.temperature = temperature

    def propose(self, context_text: str, best_source: str, experiment: int) -> Proposal:
        user = f"{context_text}\n\n## Current best train.py\n```python\n{best_source}```\n\n{REPLY_FORMAT}"
        message = self.endpoint.chat(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
            temperature=self.temperature,
        )
        return proposal_from_message(message)


def make_proposer(spec: str, seed: int = 0) -> Proposer:
    """A proposer from its command-line name: ``mutate``, ``context``, ``openai:MODEL`` or ``policy:MODEL_DIR``."""
    kind, _, arg = spec.partition(":")
    if kind == "mutate" and not arg:
        return MutateProposer(seed)
    if kind == "context" and not arg:
        return ContextProposer(seed)
    if kind == "openai":
        return ChatProposer(Endpoint.openai(arg))
    if kind == "policy" and arg:
        return ChatProposer(Endpoint.policy(arg))
    raise ValueError(f"unknown proposer {spec!r}: expected mutate, context, openai:MODEL or policy:MODEL_DIR")
