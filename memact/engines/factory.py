"""The one place an engine is built from a model: ``memact rollout``, ``memact eval``,
``memact serve`` and the DCPO trainer's rollout side all call :func:`build_engine`.

Another engine plugs in here and is chosen by name (``rollout.engine`` in a training config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memact.engines.base import Engine
from memact.models.chatml import IM_END

ENGINES = ("hf", "vllm")
"""Engine kinds :func:`build_engine` knows: ``hf`` (:class:`memact.engines.hf.HFEngine`, on the
loaded module) and ``vllm`` (:class:`memact.engines.vllm.VLLMEngine`, from the model directory)."""
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Weight dtypes of the vLLM engine (``auto``: the checkpoint's, or the trainer's)."""


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its end-of-turn id (a checkpoint without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(IM_END)


def build_engine(kind: str, model: Any, tokenizer: Any, max_batch_size: int = 32, *,
                 model_dir: str | Path | None = None, seed: int = 0, vllm: dict[str, Any] | None = None,
                 prefix_cache_tokens: int = 262_144) -> Engine:
    """An engine of ``kind`` for the policy ``model`` (a loaded ``transformers`` module) or ``model_dir``.

    Args:
        kind: one of :data:`ENGINES`.
        model: the policy; the HF engine shares it (no weight copy). Unused by vLLM.
        tokenizer: its tokenizer (end-of-turn and pad ids).
        max_batch_size: prompts per forward pass (HF).
        model_dir: the model directory vLLM loads (its weights are then replaced by pushes).
        seed: vLLM's sampling seed (the HF engine's generator starts at 0; checkpoints carry its state).
        vllm: keyword arguments of :class:`memact.engines.vllm.VLLMEngine`.
        prefix_cache_tokens: the HF engine's KV kept between the calls of one rollout (0: off).
    """
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    if kind == "hf":
        from memact.engines.hf import HFEngine

        return HFEngine(model, eos_token_id=eos, pad_token_id=pad_token_id(tokenizer), max_batch_size=max_batch_size,
                        prefix_cache_tokens=prefix_cache_tokens)
    if kind == "vllm":
        if model_dir is None:
            raise ValueError("the vllm engine loads a model directory: pass model_dir")
        from memact.engines.vllm import VLLMEngine

        return VLLMEngine(model_dir, eos_token_id=eos, seed=seed, **(vllm or {}))
    raise ValueError(f"engine {kind!r}: expected one of {', '.join(ENGINES)}")
