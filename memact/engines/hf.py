"""The Hugging Face transformers engine: batched generation with a KV cache and continuous batching."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from memact.engines.base import Generation, SamplingParams, TokenCallback


def _next_tokens(logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of every row; returns (ids, log_softmax(logits / T) over the vocabulary).

    logits: (rows, vocab) float32. T is 1 when greedy; top-p only restricts what is drawn.
    """
    greedy = sampling.greedy
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

    Inside :meth:`session` (the agent loop opens one per batch of episodes) the KV cache of
    every finished row is kept for the next call: an episode's next prompt extends its
    previous prompt and output, so only the new tokens (the tool response and the generation
    prompt) are prefilled; after a context edit the cache is cut at the first changed token
    and only what follows the edit is recomputed (:class:`_PrefixCache`). Outside a session
    nothing is kept, so weights that change between calls never meet a stale cache.

    Args:
        model: a causal LM (e.g. from ``load_policy``); shared with the trainer on the CPU.
        eos_token_id: the end-of-turn id (``<|im_end|>`` for ChatML).
        pad_token_id: id used for left padding (never attended to).
        max_batch_size: rows per forward pass.
        continuous_batching: refill freed rows from the waiting prompts (False: fixed
            slices of ``max_batch_size`` prompts, each run until its slowest row ends).
        prefix_cache_tokens: most tokens whose KV a session keeps (oldest dropped first);
            0 turns the reuse off.
    """

    def __init__(self, model, eos_token_id: int, pad_token_id: int, max_batch_size: int = 32,
                 continuous_batching: bool = True, prefix_cache_tokens: int = 262_144):
        if prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be >= 0, got {prefix_cache_tokens}")
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.continuous_batching = continuous_batching
        self.prefix_cache_tokens = prefix_cache_tokens
        self.generator = torch.Generator().manual_seed(0)
        self._cache_mergeable: bool | None = None  # learnt from the first prefill
        self._prefix: _PrefixCache | None = None  # set inside session()
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0}
        """Prompt tokens fed to the model and prompt tokens whose KV came from the session's cache."""

    @contextmanager
    def session(self) -> Iterator[None]:
        """Keep finished rows' KV caches from one ``generate`` call to the next inside this block.

        The weights must not change inside it (the agent loop opens one per rollout, the trainer
        updates between rollouts). Nested sessions share the outer one's cache.
        """
        if self._prefix is not None or self.prefix_cache_tokens == 0:
            yield
            return
        self._prefix = _PrefixCache(self.prefix_cache_tokens)
        try:
            yield
        finally:
            self._prefix = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    streams_tokens = True

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 on_token: TokenCallback | None = None) -> list[Generation]:
        """One turn per prompt; ``on_token(i, id)`` (if given) hears each token of prompt ``i`` as it is sampled."""
        slotted = self.continuous_batching and len(prompts) > self.max_batch_size or self._prefix is not None
        if slotted and sampling.max_new_tokens > 0 and self._cache_mergeable is not False:
            out = self._generate_continuous(prompts, sampling, on_token)
            if out is not None:
                return out
        out: list[Generation] = []
        for i in range(0, len(prompts), self.max_batch_size):
            shifted = None if on_token is None else (lambda row, tok, i=i: on_token(i + row, tok))
            out.extend(self._generate_batch(prompts[i:i + self.max_batch_size], sampling, shifted))
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
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams,
                        on_token: TokenCallback | None = None) -> list[Generation]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        gen = self.generator if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
        stop = torch.tensor(sampling.stop_token_ids or (self.eos_token_id,), device=self.device)
        b = len(prompts)
        input_ids, mask, positions = self._left_pad(prompts)
        self.stats["prefill_tokens"] += sum(len(p) for p in prompts)
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
                if on_token is not None:
                    sampled = nxt.tolist()
                    for row in (~done).nonzero().flatten().tolist():
                        on_token(row, sampled[row])
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
    def _generate_continuous(self, prompts: list[list[int]], sampling: SamplingParams,
                             on_token: TokenCallback | None = None) -> list[Generation] | None:
        """Slot-based decoding over more prompts than fit in one batch.

        The running rows share one left-padded KV cache (``_Slots``). Each round either admits
        waiting prompts into free slots (prefilled as their own left-padded batch, then merged
        on the batch axis after padding both caches to one width) or decodes one token for
        every running row; rows that stop are evicted right away and the columns no survivor
        attends to are trimmed. Positions are per row, so padding never shifts them.

        Inside a :meth:`session`, admission reuses the longest cached prefix of each prompt and
        a row that stops leaves its KV (prompt and output but the last token, which was never
        fed) in the session's cache.

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
                    if on_token is not None:
                        on_token(i, tok)
                finished = []
                for i in slots.rows:
                    if out_ids[i][-1] in stop_set:
                        results[i] = Generation(out_ids[i], out_lps[i], "stop")
                    elif len(out_ids[i]) >= sampling.max_new_tokens:
                        results[i] = Generation(out_ids[i], out_lps[i], "length")
                    else:
                        continue
                    finished.append(i)
                if self._prefix is not None:
                    for i in finished:
                        self._prefix.put(prompts[i] + out_ids[i][:-1], slots.row_kv(i))
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
        """One forward over left-padded prompts: (cache, attention mask, last-position logits).

        With a session's cache (and a cache known to be mergeable) rows start from their cached
        prefixes. One forward feeds every row the same number S of new tokens, S the most any
        row lacks; a row that lacks fewer recomputes the last cached ones it would otherwise
        pad, so each row is ``[pad][cached prefix][S new tokens]``, contiguous, and the cache
        is no wider than the longest prompt.
        """
        taken = ([self._prefix.take(p) for p in prompts] if self._prefix is not None and self._cache_mergeable
                 else [(0, None)] * len(prompts))
        width_s = max(len(p) - n for p, (n, _) in zip(prompts, taken))
        used = [max(len(p) - width_s, 0) for p in prompts]  # <= n: a prefix of what was cached
        width_c = max(used)
        if width_c == 0:
            input_ids, mask, positions = self._left_pad(prompts)
            self.stats["prefill_tokens"] += sum(len(p) for p in prompts)
            res = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
            return res.past_key_values, mask, res.logits[:, -1, :].float()
        from transformers.cache_utils import DynamicCache

        b, dev = len(prompts), self.device
        input_ids = torch.full((b, width_s), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, width_c + width_s), dtype=torch.long)
        positions = torch.zeros((b, width_s), dtype=torch.long)
        for row, (p, n) in enumerate(zip(prompts, used)):
            fed = len(p) - n
            input_ids[row, width_s - fed:] = torch.tensor(p[n:])
            mask[row, width_c + width_s - len(p):] = 1
            positions[row, width_s - fed:] = torch.arange(n, len(p))
        self.stats["prefill_tokens"] += sum(len(p) - n for p, n in zip(prompts, used))
        self.stats["reused_tokens"] += sum(used)
        taken = [(n, [(k[:, :n], v[:, :n]) for k, v in kv] if n else None) for n, (_, kv) in zip(used, taken)]
        like = next(kv for n, kv in taken if n > 0)
        past = DynamicCache()
        for layer, (k0, v0) in enumerate(like):
            empty_k, empty_v = k0.new_zeros((k0.shape[0], 0, k0.shape[2])), v0.new_zeros((v0.shape[0], 0, v0.shape[2]))
            keys = torch.stack([_left_pad(kv[layer][0] if kv else empty_k, width_c, 1) for _, kv in taken])
            values = torch.stack([_left_pad(kv[layer][1] if kv else empty_v, width_c, 1) for _, kv in taken])
            past.update(keys, values, layer)
        res = self.model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                         past_key_values=past, use_cache=True)
        return res.past_key_values, mask.to(dev), res.logits[:, -1, :].float()


class _PrefixCache:
    """Finished rows' KV caches, found again by the longest common prefix of a new prompt.

    An entry is the token ids its KV covers and, per layer, (keys, values) of shape
    (kv_heads, tokens, head_dim). :meth:`take` removes the entry it uses (the row that uses it
    leaves a longer one when it stops), so a session holds about one entry per live episode;
    past ``max_tokens`` the oldest entries go.
    """

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: list[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = []
        self.tokens = 0

    def take(self, prompt: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """(n, the first n tokens' KV per layer) for the longest cached prefix, at most len - 1."""
        p = torch.tensor(prompt, dtype=torch.long)
        best, best_n = -1, 0
        for idx, (ids, _) in enumerate(self.entries):
            n = min(len(ids), len(prompt) - 1)  # at least one token is fed, for its logits
            if n <= best_n:
                continue
            differ = (ids[:n] != p[:n]).nonzero()
            common = n if len(differ) == 0 else int(differ[0])
            if common > best_n:
                best, best_n = idx, common
        if best < 0:
            return 0, None
        ids, kv = self.entries.pop(best)
        self.tokens -= len(ids)
        return best_n, [(k[:, :best_n], v[:, :best_n]) for k, v in kv]

    def put(self, ids: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not ids or len(ids) > self.max_tokens:
            return
        self.entries.append((torch.tensor(ids, dtype=torch.long), kv))
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            old, _ = self.entries.pop(0)
            self.tokens -= len(old)


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

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The KV of prompt ``row``'s attended columns, per layer: (kv_heads, tokens, head_dim) copies."""
        j = self.rows.index(row)
        cols = self.mask[j].nonzero().squeeze(-1)
        return [(layer.keys[j].index_select(1, cols), layer.values[j].index_select(1, cols))
                for layer in self.cache.layers]

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
