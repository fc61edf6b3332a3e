"""Plays a scripted policy (``memact.agent.scripted``) through the engine interface."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from memact.engines.base import Generation, SamplingParams, TokenCallback


@dataclass
class ScriptedEngine:
    """Plays a scripted policy through the engine interface.

    The policy maps the decoded prompt to the assistant's text; the output ids are the
    tokenizer's ids for that text plus the end-of-turn token, each with log-prob 0.
    """

    policy: Callable[[str], str]
    tokenizer: object
    end_of_turn: str = "<|im_end|>"
    calls: int = field(default=0, init=False)
    streams_tokens = True

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 on_token: TokenCallback | None = None) -> list[Generation]:
        out = []
        for i, prompt in enumerate(prompts):
            self.calls += 1
            text = self.policy(self.tokenizer.decode(prompt, skip_special_tokens=False))
            ids = list(self.tokenizer.encode(text + self.end_of_turn, add_special_tokens=False))
            finish = "stop"
            if len(ids) > sampling.max_new_tokens:
                ids, finish = ids[:sampling.max_new_tokens], "length"
            if on_token is not None:
                for tok in ids:
                    on_token(i, tok)
            out.append(Generation(ids, [0.0] * len(ids), finish))
        return out
