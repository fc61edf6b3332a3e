"""Policy models: tiny Qwen-architecture models built from a config, or any local checkpoint.

Every command that takes a model takes a directory: the tiny models written by
``memact new-model`` and a real checkpoint (e.g. Qwen2.5-14B-Instruct on a local path) go
through the same ``load_policy``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16")
"""Weight and compute dtypes a model can be loaded and trained in."""


def torch_dtype(name: str):
    """The torch dtype of a name in :data:`DTYPES`; warns once when bf16 is chosen for a CPU
    without bf16 instructions (there it ran 22x slower than fp32: docs/models.md)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if name == "bfloat16" and not torch.cuda.is_available() and cpu_bf16() is False:
        _warn_once("bfloat16 on a CPU without avx512_bf16 or amx_bf16 (its /proc/cpuinfo flags): it runs many "
                   "times slower than float32 there (22x measured, docs/models.md); choose float32")
    return getattr(torch, name)


def cpu_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16``); None where
    ``cpuinfo`` cannot be read (not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


_WARNED: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _WARNED:
        _WARNED.add(text)
        print(f"[memact] warning: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a Qwen3-style decoder built from scratch."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 4096


PRESETS: dict[str, ModelPreset] = {
    # about 1.2M parameters with the local tokenizer: 13k tok/s fwd+bwd fp32 on 2 cores.
    "tiny": ModelPreset(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384),
    # about 6M parameters: 3-4x slower, noticeably better recall.
    "small": ModelPreset(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=768),
    # several times "small": the stand-in for a much larger no-memory model.
    "base": ModelPreset(hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2, intermediate_size=1152),
}


def build_model(preset: str | ModelPreset, vocab_size: int, seed: int = 0, pad_token_id: int | None = None,
                eos_token_id: int | None = None):
    """A randomly initialised Qwen3ForCausalLM of the given preset."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.hidden_size // preset.num_heads,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    import torch

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    return model


WORD_GROUPS = ("id", "name", "value")  # the synthetic world's single-token word groups
TYPE_GROUPS = ("id",)  # the word groups new_model gives a shared embedding direction (measured: ids)


def world_token_groups(tokenizer, groups: tuple[str, ...] = TYPE_GROUPS) -> dict[str, list[int]]:
    """Token ids of the synthetic world's single-token words, by group: ``id``, ``name``, ``value``."""
    from memact.env.memory import ID_POOL
    from memact.env.task import ATTRIBUTES, NAME_POOL

    words = {"id": list(ID_POOL), "name": list(NAME_POOL), "value": [v for vs in ATTRIBUTES.values() for v in vs]}
    unknown = set(groups) - set(WORD_GROUPS)
    if unknown:
        raise ValueError(f"unknown word groups {sorted(unknown)}; choose from {', '.join(WORD_GROUPS)}")
    out = {}
    for g in groups:
        ids = [tokenizer.convert_tokens_to_ids(w) for w in words[g]]
        if any(i is None or i == tokenizer.unk_token_id for i in ids) or len(
                tokenizer.encode(words[g][0], add_special_tokens=False)) != 1:
            raise ValueError(f"the tokenizer has no single token for every {g} word (build it with `memact new-model`)")
        out[g] = ids
    return out


def add_type_directions(model, groups: dict[str, list[int]], seed: int = 0) -> None:
    """Add one shared random direction to the embedding rows of each group of tokens, in place.

    A type embedding fixed at initialisation (norm: the group's mean row norm): with it the
    record ids are a kind of their own, which a tiny model needs before it learns to copy
    them (docs/pretrain.md, "Third round"). With tied embeddings it shifts the group's
    output logits together.
    """
    import torch

    emb = model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for _, rows in sorted(groups.items()):
            index = torch.tensor(rows, dtype=torch.long)
            direction = torch.randn(emb.shape[1], generator=gen)
            direction *= emb[index].norm(dim=1).mean() / direction.norm()
            emb[index] += direction.to(emb.dtype)


def new_model(out: str | os.PathLike, preset: str = "tiny", seed: int = 0, vocab_size: int = 1024,
              type_groups: tuple[str, ...] = TYPE_GROUPS) -> Path:
    """Train a tokenizer on task text, build a random model, save both to ``out`` (absent or
    empty), atomically: a run that fails or is stopped half-way leaves no ``out``.

    ``type_groups``: word groups whose embeddings share a direction (:func:`add_type_directions`);
    () for a plain random initialisation.
    """
    from memact.models.tokenizer import task_corpus, train_tokenizer

    out = Path(out)
    staging = staging_dir(out)  # refuses a non-empty ``out`` before any work
    tokenizer = train_tokenizer(task_corpus(seed=seed), vocab_size=vocab_size)
    model = build_model(
        preset, vocab_size=len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if type_groups:
        add_type_directions(model, world_token_groups(tokenizer, type_groups), seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return publish(model, tokenizer, staging, out)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` (or None): ``cuda`` when torch sees a GPU, else ``cpu``; anything else as given,
    checked, so that ``cuda`` on a machine without one is a clear error rather than a CUDA trace."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no GPU here (use cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def load_policy(path: str | os.PathLike, dtype=None, device: str = "cpu"):
    """Model and tokenizer from a local directory (tiny or a real checkpoint); fp32 by default."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{str(path)!r} is not a model directory (no config.json); build one with "
            "`memact new-model --preset tiny --out DIR` or pass a local checkpoint"
        )
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    model.eval()
    return model, tokenizer


def staging_dir(out: str | os.PathLike) -> Path:
    """A fresh hidden sibling of ``out`` (``.NAME.partial``) to write a run into; a non-empty ``out`` is refused.

    With :func:`publish` a run that stops half-way leaves ``out`` untouched.
    """
    import shutil

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {str(out)!r} exists and is not empty; choose another --out")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(model, tokenizer, staging: Path, out: str | os.PathLike) -> Path:
    """Save ``model`` and ``tokenizer`` into ``staging`` and rename it to ``out`` (empty or absent).

    On any failure (a full disk, Ctrl-C) ``staging`` is removed and ``out`` is left as it was.
    """
    import shutil

    out = Path(out)
    try:
        model.eval()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # staging_dir checked that it is empty
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
