"""Checkpoints: a Hugging Face model directory plus the state to continue exactly.

Layout of ``RUN/checkpoints/step_000004/``::

    config.json, model.safetensors, tokenizer files ...   # save_pretrained: loads as is in
                                                          # transformers, vLLM, `memact rollout`
    trainer/deepspeed/...                                 # DeepSpeed: weights, optimizer, LR scheduler
    trainer/trainer_state.pt                              # step, RNG states (torch, python, engine)

A checkpoint is written to a hidden temporary directory and renamed into place, so a crash
mid-save never leaves a half-written ``step_*`` directory (and ``--resume`` never reads one).
LoRA adapters are merged into the saved HF weights; DeepSpeed's state keeps them separate.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from memact.dcpo.distributed import barrier, full_weights
from memact.dcpo.modeling import core_model, merged_lora_state_dict
from memact.util.holds import rotate

DS_TAG = "deepspeed"
STATE_FILE = "trainer_state.pt"


def save_hf(engine: Any, tokenizer: Any, out: Path, is_main: bool = True) -> None:
    """Model (LoRA merged) and tokenizer via ``save_pretrained`` into ``out``."""
    model = getattr(engine, "module", engine)
    with full_weights(engine):
        if not is_main:
            return
        if hasattr(model, "get_base_model"):  # peft: save merged weights, keep training the adapters
            core_model(model).save_pretrained(out, state_dict=merged_lora_state_dict(model))
        else:
            core_model(model).save_pretrained(out)
    tokenizer.save_pretrained(out)


def rng_state(rollout_generator: torch.Generator | None) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "engine": rollout_generator.get_state() if rollout_generator is not None else None,
    }


def set_rng_state(state: dict[str, Any], rollout_generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if rollout_generator is not None and state.get("engine") is not None:
        rollout_generator.set_state(state["engine"])


def save_checkpoint(engine: Any, tokenizer: Any, run_dir: Path, step: int, state: dict[str, Any],
                    keep: int = 0, is_main: bool = True) -> Path:
    """Write ``run_dir/checkpoints/step_{step:06d}`` atomically; keep the newest ``keep`` (0: all)
    and any a live reader holds (:mod:`memact.util.holds`).

    Args:
        state: the trainer's own state (step counter, RNG states, ...), saved with torch.save.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        save_hf(engine, tokenizer, tmp, is_main)
        engine.save_checkpoint(str(tmp / "trainer"), tag=DS_TAG, save_latest=False)
        if is_main:
            torch.save(state, tmp / "trainer" / STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:  # a full disk, Ctrl-C: no half-written checkpoint stays behind
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main:
        rotate(root, keep)
    barrier()
    return final


def load_checkpoint(engine: Any, ckpt: str | os.PathLike) -> dict[str, Any]:
    """Restore weights, optimizer and scheduler into ``engine``; return the trainer state."""
    ckpt = Path(ckpt)
    state_file = ckpt / "trainer" / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(
            f"--resume {str(ckpt)!r}: not a training checkpoint (no trainer/{STATE_FILE}); "
            "pass a RUN/checkpoints/step_XXXXXX directory"
        )
    try:  # read first: a damaged state file is found before the engine is half-restored
        state = torch.load(state_file, weights_only=False)
    except Exception as err:  # a truncated pickle/zip gives OSError, EOFError, RuntimeError, UnpicklingError ...
        raise RuntimeError(f"--resume {str(ckpt)!r}: {str(state_file)!r} is unreadable ({type(err).__name__}: "
                           f"{err}); the checkpoint is damaged: resume from an earlier one") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "rng" not in state:
        raise RuntimeError(f"--resume {str(ckpt)!r}: {str(state_file)!r} is not a memact trainer state "
                           "(no step and rng); resume from a checkpoint that memact train wrote")
    try:
        path, _ = engine.load_checkpoint(str(ckpt / "trainer"), tag=DS_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except Exception as err:
        raise RuntimeError(f"--resume {str(ckpt)!r}: DeepSpeed could not load {str(ckpt / 'trainer' / DS_TAG)!r} "
                           f"({type(err).__name__}: {err}); the checkpoint is damaged or was written with "
                           "another model or ZeRO layout") from err
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {str(ckpt / 'trainer' / DS_TAG)!r}")
    return state
