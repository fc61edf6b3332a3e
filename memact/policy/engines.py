"""Rollout engines: one interface from token-id prompts to token-id outputs with log-probs.

``Engine.generate(prompts, sampling) -> list[Generation]``: for each prompt (a list of
token ids) the ids the policy produced and the sampling log-prob of each. The agent loop
never sees text from an engine, only ids, which is what keeps rollouts token-exact.

Implementations here: :class:`HFEngine` (Hugging Face transformers, batched, KV cache) and
:class:`ScriptedEngine` (plays a scripted policy through the same interface). The vLLM and
OpenAI-compatible engines plug into the same seam.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    """How to sample a turn."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy. Log-probs are of softmax(logits / T) (T=1 if greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    max_new_tokens: int = 128
    """Longest turn, in tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a turn (included in the output); empty means the engine's end of turn."""
    seed: int | None = None
    """Seed of the sampling RNG for this call (None: the engine's running generator)."""


@dataclass
class Generation:
    """One engine output."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"  # "stop" (a stop token) or "length" (max_new_tokens)
    error: str | None = None  # set when the engine failed this prompt (e.g. a dead server)


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]: ...


def _apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask logits outside the smallest set whose probability mass reaches ``top_p``."""
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


class HFEngine:
    """Batched generation with a Hugging Face causal LM and its KV cache.

    Prompts are left-padded into one batch; position ids follow the attention mask so
    padding does not shift positions. Each row stops at its own stop token.

    Args:
        model: a causal LM (e.g. from ``load_policy``); shared with the trainer on the CPU.
        eos_token_id: the end-of-turn id (``<|im_end|>`` for ChatML).
        pad_token_id: id used for left padding (never attended to).
        max_batch_size: prompts per forward pass; larger lists are split.
    """

    def __init__(self, model, eos_token_id: int, pad_token_id: int, max_batch_size: int = 32):
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.generator = torch.Generator().manual_seed(0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        out: list[Generation] = []
        for i in range(0, len(prompts), self.max_batch_size):
            out.extend(self._generate_batch(prompts[i:i + self.max_batch_size], sampling))
        return out

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        gen = self.generator if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
        stop = torch.tensor(sampling.stop_token_ids or (self.eos_token_id,), device=self.device)
        b, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        was_training = self.model.training
        self.model.eval()
        past = None
        tokens = torch.zeros((b, 0), dtype=torch.long, device=self.device)
        logps = torch.zeros((b, 0), dtype=torch.float32, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        step_ids, step_pos = input_ids, positions
        try:
            for _ in range(sampling.max_new_tokens):
                res = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                 past_key_values=past, use_cache=True)
                past = res.past_key_values
                logits = res.logits[:, -1, :].float()
                greedy = sampling.temperature <= 0
                scaled = logits if greedy else logits / sampling.temperature
                logp_all = torch.log_softmax(scaled, dim=-1)
                if greedy:
                    nxt = logits.argmax(-1)
                else:
                    filt = _apply_top_p(scaled, sampling.top_p) if sampling.top_p < 1.0 else scaled
                    probs = torch.softmax(filt, dim=-1)
                    nxt = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(self.device)
                nxt = torch.where(done, torch.full_like(nxt, self.pad_token_id), nxt)
                lp = logp_all.gather(-1, nxt[:, None]).squeeze(-1).masked_fill(done, 0.0)
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                logps = torch.cat([logps, lp[:, None]], dim=1)
                newly_done = torch.isin(nxt, stop) & ~done
                lengths_done = done.clone()
                done = done | newly_done
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]
                mask = torch.cat([mask, (~lengths_done).long()[:, None]], dim=1)
                step_pos = step_pos[:, -1:] + 1
        finally:
            self.model.train(was_training)
        results = []
        stop_set = set(stop.tolist())
        for row in range(b):
            ids = tokens[row].tolist()
            lps = logps[row].tolist()
            cut = next((j + 1 for j, t in enumerate(ids) if t in stop_set), None)
            if cut is None:
                results.append(Generation(ids, lps, "length"))
            else:
                results.append(Generation(ids[:cut], lps[:cut], "stop"))
        return results


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

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        out = []
        for prompt in prompts:
            self.calls += 1
            text = self.policy(self.tokenizer.decode(prompt, skip_special_tokens=False))
            ids = list(self.tokenizer.encode(text + self.end_of_turn, add_special_tokens=False))
            finish = "stop"
            if len(ids) > sampling.max_new_tokens:
                ids, finish = ids[:sampling.max_new_tokens], "length"
            out.append(Generation(ids, [0.0] * len(ids), finish))
        return out
