"""Rollout engines: one interface from token-id prompts to token-id outputs with log-probs.

``Engine.generate(prompts, sampling) -> list[Generation]``: for each prompt (a list of
token ids) the ids the policy produced and the sampling log-prob of each. The agent loop
never sees text from an engine, only ids, which is what keeps rollouts token-exact.

Implementations: ``memact.engines.hf.HFEngine`` (Hugging Face transformers),
``memact.engines.scripted.ScriptedEngine``, ``memact.engines.vllm.VLLMEngine`` and
``memact.engines.openai.OpenAIEngine`` (docs/engines.md).

Engines that hold their own copy of the policy's weights also have
``sync_weights(named_tensors)`` (:class:`SyncsWeights`): the trainer pushes its parameters
after each update with one call, whichever engine it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy, as in vLLM: dividing logits by 1e-45 gives inf and NaN."""


@dataclass
class SamplingParams:
    """How to sample a turn."""

    temperature: float = 1.0
    """Softmax temperature; below ``GREEDY_BELOW`` (0 included) greedy. Log-probs are of
    softmax(logits / T) (T=1 if greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    max_new_tokens: int = 128
    """Longest turn, in tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a turn (included in the output); empty means the engine's end of turn."""
    seed: int | None = None
    """Seed of the sampling RNG for this call (None: the engine's running generator)."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def logprob_temperature(self) -> float:
        """The T of the log-probs an engine reports: the temperature, or 1 when greedy."""
        return 1.0 if self.greedy else self.temperature


@dataclass
class Generation:
    """One engine output."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"  # "stop" (a stop token) or "length" (max_new_tokens)
    error: str | None = None  # set when the engine failed this prompt (e.g. a dead server)
    prompt_tokens: int | None = None  # as counted by a remote server (its own tokenizer), if it said
    completion_tokens: int | None = None  # likewise, for the output


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]: ...


TokenCallback = Callable[[int, int], None]
"""``on_token(i, token_id)``: called as prompt ``i``'s next token is sampled (a streaming engine)."""


class StreamsTokens(Protocol):
    """An engine that reports each token as it is sampled (``streams_tokens = True``): the HF and
    scripted engines. ``memact serve`` streams their replies token by token; for the others
    (vLLM's offline engine, a remote server) a streamed reply comes when the turn is done."""

    streams_tokens: bool

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 on_token: TokenCallback | None = None) -> list[Generation]: ...


def streams_tokens(engine: object) -> bool:
    """Whether ``engine.generate`` takes ``on_token`` (:class:`StreamsTokens`)."""
    return getattr(engine, "streams_tokens", False) is True


class SyncsWeights(Protocol):
    """An engine with its own copy of the weights: the trainer pushes its parameters after an update."""

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def engine_session(engine: Engine) -> AbstractContextManager:
    """The engine's ``session()`` if it has one (the HF engine keeps KV caches between calls
    inside it), else a no-op: opened around a batch of episodes, during which the weights do not change."""
    opener = getattr(engine, "session", None)
    return opener() if callable(opener) else nullcontext()


def prompt_token_counts(engine: Engine | None) -> tuple[int, int]:
    """(computed, reused) prompt tokens the engine has seen so far: reused ones had their KV kept
    from the episode's previous turn (the HF engine's ``session``); (0, 0) for engines that do not say."""
    stats = getattr(engine, "stats", None) or {}
    return stats.get("prefill_tokens", 0), stats.get("reused_tokens", 0)
