"""The `memact` command line: one entry point, one subcommand per job.

Each subcommand lives next to the code it drives and registers itself through an
``add_parser(subparsers)`` function that sets ``func`` to the handler taking the parsed
namespace. Heavy imports (torch, transformers, deepspeed) happen inside the handlers, so
``memact --help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# Errors of the machine, not of memact: one line naming the file instead of a traceback.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "over the disk quota: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "no permission: write elsewhere or fix the directory's permissions",
    errno.EPERM: "not permitted: write elsewhere or fix the directory's permissions",
}

# (module, short help) in the order `memact --help` lists them.
SUBCOMMANDS = [
    ("memact.models.cli", "new-model: build a tiny Qwen-architecture model and tokenizer"),
    ("memact.warmup.cli", "pretrain: in-context recall warm-up before SFT"),
    ("memact.agent.cli_rollout", "rollout: run episodes and write trajectories with DCPO segments"),
    ("memact.agent.cli_serve", "serve: OpenAI-compatible chat server over a model directory"),
    ("memact.agent.cli_retrieval", "index / retrieval-serve: a corpus search index and its HTTP server"),
    ("memact.dcpo.cli_train", "sft / train: SFT cold start and DCPO on DeepSpeed"),
    ("memact.eval.cli", "eval: accuracy against context length for policies and memory strategies"),
    ("memact.demo", "demo: the whole pipeline on a tiny CPU model, leaving a report"),
    ("memact.research.cli", "research: autoresearch loop whose history the memory policy curates"),
]

DESCRIPTION = """\
memact: train LLM agents to manage their own working memory (Memory-as-Action + DCPO).

Typical flow on a CPU:
  memact new-model --preset tiny --out runs/tiny            # random tiny model + tokenizer
  memact rollout --policy scripted --objectives 4 --n 16 --out runs/scripted.jsonl
  memact rollout --policy runs/tiny --objectives 2 --n 8 --out runs/tiny.jsonl
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memact", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, _ in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # a subcommand whose module is not part of this install
            raise
        module.add_parser(sub)
    return parser


def _quiet_deepspeed_probe() -> None:
    """Tell DeepSpeed it is on the CPU when it is, instead of a warning on every command."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def _quiet_hf_progress_bars() -> None:
    """Weight loading/saving bars of tiny models are noise; our own bars show the work."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command != "research":  # the research loop never loads a model in this process
        _quiet_deepspeed_probe()
        _quiet_hf_progress_bars()
        from memact.util.threads import set_threads

        set_threads()
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"\nmemact {args.command}: interrupted (outputs are published whole or not at all; "
              "`memact train --resume` continues from the last checkpoint)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS or os.environ.get("MEMACT_DEBUG"):
            raise
        where = f": {err.filename}" if err.filename else ""
        raise SystemExit(f"error: memact {args.command}: {err.strerror}{where} "
                         f"({ENVIRONMENT_ERRNOS[err.errno]}; MEMACT_DEBUG=1 shows the traceback)") from None
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
