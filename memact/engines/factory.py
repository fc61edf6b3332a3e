"""The one place an engine is built from a model: ``memact rollout``, ``memact eval``,
``memact serve`` and the DCPO trainer's rollout side all call :func:`build_engine`.

Another engine plugs in here and is chosen by name (``rollout.engine`` in a training config).
"""

from __future__ import annotations

from typing import Any

from memact.engines.base import Engine
from memact.models.chatml import IM_END

ENGINES = ("hf",)
"""Engine kinds :func:`build_engine` knows (``hf``: :class:`memact.engines.hf.HFEngine`)."""


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its end-of-turn id (a checkpoint without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(IM_END)


def build_engine(kind: str, model: Any, tokenizer: Any, max_batch_size: int = 32) -> Engine:
    """An engine of ``kind`` generating from ``model`` (a loaded ``transformers`` module).

    Args:
        kind: one of :data:`ENGINES`.
        model: the policy; the HF engine shares it (no weight copy).
        tokenizer: its tokenizer (end-of-turn and pad ids).
        max_batch_size: prompts per forward pass.
    """
    if kind == "hf":
        from memact.engines.hf import HFEngine

        return HFEngine(model, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END), pad_token_id=pad_token_id(tokenizer),
                        max_batch_size=max_batch_size)
    raise ValueError(f"engine {kind!r}: expected one of {', '.join(ENGINES)}")
