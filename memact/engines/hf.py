"""The Hugging Face transformers engine: batched generation with a KV cache and continuous batching."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch

from memact.engines.base import Generation, SamplingParams


def _next_tokens(logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of every row; returns (ids, log_softmax(logits / T) over the vocabulary).

    logits: (rows, vocab) float32. T is 1 when greedy; top-p only restricts what is drawn.
    """
    greedy = sampling.temperature <= 0
    scaled = logits if greedy else logits / sampling.temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    if greedy:
        return logits.argmax(-1), logp_all
    filt = _apply_top_p(scaled, sampling.top_p) if sampling.top_p < 1.0 else scaled
    probs = torch.softmax(filt, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(device), logp_all


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

    With more prompts than ``max_batch_size``, continuous batching keeps the batch full: a
    row that stops leaves at once and a waiting prompt is prefilled and merged into the
    running KV cache, so one long turn no longer holds a whole batch back
    (:meth:`_generate_continuous`). Greedy outputs are the same either way; sampled ones
    draw from the same distribution in a different order.

    Args:
        model: a causal LM (e.g. from ``load_policy``); shared with the trainer on the CPU.
        eos_token_id: the end-of-turn id (``<|im_end|>`` for ChatML).
        pad_token_id: id used for left padding (never attended to).
        max_batch_size: rows per forward pass.
        continuous_batching: refill freed rows from the waiting prompts (False: fixed
            slices of ``max_batch_size`` prompts, each run until its slowest row ends).
    """

    def __init__(self, model, eos_token_id: int, pad_token_id: int, max_batch_size: int = 32,
                 continuous_batching: bool = True):
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.continuous_batching = continuous_batching
        self.generator = torch.Generator().manual_seed(0)
        self._cache_mergeable: bool | None = None  # learnt from the first prefill

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        if (self.continuous_batching and len(prompts) > self.max_batch_size and sampling.max_new_tokens > 0
                and self._cache_mergeable is not False):
            out = self._generate_continuous(prompts, sampling)
            if out is not None:
                return out
        out: list[Generation] = []
        for i in range(0, len(prompts), self.max_batch_size):
            out.extend(self._generate_batch(prompts[i:i + self.max_batch_size], sampling))
        return out

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's tensors into the engine's model (nothing to do for shared ones).

        On the CPU the engine and the trainer share one model, so every tensor is already in
        place; a trainer that holds its own copy (another device, another dtype) pushes it here.
        Names are the model's ``state_dict`` keys (``lm_head.weight`` of a tied model included).
        """
        own = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in own:
                    raise KeyError(f"sync_weights: {name!r} is not a tensor of the engine's model")
                if own[name].data_ptr() != tensor.data_ptr():
                    own[name].copy_(tensor)

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        gen = self.generator if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
        stop = torch.tensor(sampling.stop_token_ids or (self.eos_token_id,), device=self.device)
        b = len(prompts)
        input_ids, mask, positions = self._left_pad(prompts)
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
                nxt, logp_all = _next_tokens(res.logits[:, -1, :].float(), sampling, gen, self.device)
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

    @torch.no_grad()
    def _generate_continuous(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation] | None:
        """Slot-based decoding over more prompts than fit in one batch.

        The running rows share one left-padded KV cache (``_Slots``). Each round either admits
        waiting prompts into free slots (prefilled as their own left-padded batch, then merged
        on the batch axis after padding both caches to one width) or decodes one token for
        every running row; rows that stop are evicted right away and the columns no survivor
        attends to are trimmed. Positions are per row, so padding never shifts them.

        Returns None (and the caller falls back to fixed slices) for a model whose cache is not
        plain ``DynamicLayer`` s, e.g. sliding-window layers, which cannot be padded and merged.
        """
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        gen = self.generator if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
        stop_set = set(sampling.stop_token_ids or (self.eos_token_id,))
        waiting = deque(range(len(prompts)))
        out_ids: list[list[int]] = [[] for _ in prompts]
        out_lps: list[list[float]] = [[] for _ in prompts]
        results: list[Generation | None] = [None] * len(prompts)
        slots = _Slots()
        was_training = self.model.training
        self.model.eval()
        try:
            while waiting or slots.rows:
                free = self.max_batch_size - len(slots.rows)
                if waiting and free > 0:
                    admit = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                    cache, mask, logits = self._prefill([prompts[i] for i in admit])
                    if self._cache_mergeable is None:
                        from transformers.cache_utils import DynamicLayer

                        self._cache_mergeable = all(type(layer) is DynamicLayer for layer in cache.layers)
                    if not self._cache_mergeable:
                        return None
                    positions = torch.tensor([len(prompts[i]) for i in admit], device=self.device)
                    nxt, logp_all = _next_tokens(logits, sampling, gen, self.device)
                    slots.admit(admit, cache, mask, positions, nxt)
                    sampled_rows = admit
                else:
                    nxt, logp_all = _next_tokens(slots.decode(self.model), sampling, gen, self.device)
                    slots.last = nxt
                    sampled_rows = slots.rows
                lps = logp_all.gather(-1, nxt[:, None]).squeeze(-1).tolist()
                for i, tok, lp in zip(sampled_rows, nxt.tolist(), lps):
                    out_ids[i].append(tok)
                    out_lps[i].append(lp)
                finished = []
                for i in slots.rows:
                    if out_ids[i][-1] in stop_set:
                        results[i] = Generation(out_ids[i], out_lps[i], "stop")
                    elif len(out_ids[i]) >= sampling.max_new_tokens:
                        results[i] = Generation(out_ids[i], out_lps[i], "length")
                    else:
                        continue
                    finished.append(i)
                slots.evict(finished)
        finally:
            self.model.train(was_training)
        return results

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids, attention mask and position ids (positions follow the mask)."""
        b, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _prefill(self, prompts: list[list[int]]):
        """One forward over left-padded prompts: (cache, attention mask, last-position logits)."""
        input_ids, mask, positions = self._left_pad(prompts)
        res = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        return res.past_key_values, mask, res.logits[:, -1, :].float()


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros before ``t`` along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Slots:
    """The running rows of continuous batching and their shared, left-padded KV cache.

    ``rows`` are prompt indices; ``mask`` (rows, width) marks the cache columns each row
    attends to; ``positions`` is the position of each row's next input token and ``last``
    that token (sampled, not yet fed).
    """

    def __init__(self):
        self.rows: list[int] = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.last: torch.Tensor | None = None

    def admit(self, rows: list[int], cache, mask: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.last = list(rows), cache, mask, positions, last
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, last])
        self.rows += rows

    def decode(self, model) -> torch.Tensor:
        """Feed every row its last token; returns the next-token logits (rows, vocab), float32."""
        step_mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        res = model(input_ids=self.last[:, None], attention_mask=step_mask, position_ids=self.positions[:, None],
                    past_key_values=self.cache, use_cache=True)
        self.cache, self.mask, self.positions = res.past_key_values, step_mask, self.positions + 1
        return res.logits[:, -1, :].float()

    def evict(self, finished: list[int]) -> None:
        if not finished:
            return
        gone = set(finished)
        keep = [j for j, i in enumerate(self.rows) if i not in gone]
        self.rows = [self.rows[j] for j in keep]
        if not keep:
            self.cache = self.mask = self.positions = self.last = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx]
        first = int(mask.any(0).nonzero()[0])  # columns before it are padding for every survivor
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]
        self.mask, self.positions, self.last = mask[:, first:], self.positions[idx], self.last[idx]
