"""`memact sft` and `memact train`: the SFT cold start and DCPO, configured by YAML + key=value overrides.

Also runnable as ``python -m memact.dcpo.cli_train sft|train ...``, which is what the
``deepspeed`` launcher starts (it appends ``--local_rank=N``; the rank comes from the
environment it sets).
"""

from __future__ import annotations

import argparse
import os
import sys


def _common(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--config", default=default_config,
                   help=f"YAML config (default: {default_config}; relative names are also looked up in configs/)")
    p.add_argument("--out", default=None, help="output/run directory (sets run.out_dir)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, print batch arithmetic, ZeRO stage and DeepSpeed's memory estimate "
                   "per GPU without loading weights, and exit")
    p.add_argument("--num-gpus", type=int, default=None,
                   help="world size for --dry-run (default: $WORLD_SIZE or 1)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="memory of one GPU for --dry-run's plan of a colocated vLLM engine (default 80: an H100)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.lr=2e-3 run.steps=5 model.path=runs/tiny")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sft", help="supervised cold start on trajectories (loss on generated tokens of every segment)",
        description="Cross-entropy on the loss-mask tokens of every DCPO segment of a `memact rollout` "
        "JSONL file, through DeepSpeed. Writes an HF model directory (loads in `memact rollout --policy`), "
        "metrics.jsonl and config.yaml.",
    )
    _common(p, "tiny_cpu_sft.yaml")
    p.add_argument("--data", default=None, help="trajectories JSONL (sets sft.data)")
    p.set_defaults(func=run_sft)

    p = sub.add_parser(
        "train", help="DCPO: rollouts, segments, group advantages, clipped updates through DeepSpeed",
        description="Dynamic Context Policy Optimization. Each step samples prompts, rolls out N_traj "
        "trajectories per prompt with the current policy, cuts them into segments at every context edit, "
        "and updates with the clipped surrogate (+ KL to the initial model). Writes RUN/metrics.jsonl, "
        "RUN/config.yaml and RUN/checkpoints/step_XXXXXX (HF directory + optimizer/RNG state).",
    )
    _common(p, "tiny_cpu_dcpo.yaml")
    p.add_argument("--resume", default=None, help="checkpoint directory to continue from (sets run.resume)")
    p.set_defaults(func=run_train)


def _load(args: argparse.Namespace, extra: list[str]):
    from memact.dcpo.config import ConfigError, configs_dir, load_config

    path = args.config
    if path and not os.path.isfile(path) and (configs_dir() / path).is_file():
        path = str(configs_dir() / path)
    overrides = list(args.overrides) + extra
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        raise SystemExit(f"memact: {err}") from None


def run_sft(args: argparse.Namespace) -> int:
    cfg = _load(args, [f"sft.data={args.data}"] if args.data else [])
    if not cfg.sft.data and not args.dry_run:
        raise SystemExit("memact sft: no trajectories given: pass --data FILE.jsonl (or sft.data=FILE.jsonl)")
    if args.dry_run:
        return _dry_run(cfg, args, "sft")
    from memact.dcpo.config import ConfigError
    from memact.dcpo.data import DataError
    from memact.dcpo.sft import sft

    try:
        out = sft(cfg)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"memact sft: {err}") from None
    if _is_rank0():
        print(f"[memact] SFT done -> {out}", file=sys.stderr)
    return 0


def run_train(args: argparse.Namespace) -> int:
    cfg = _load(args, [f"run.resume={args.resume}"] if args.resume else [])
    if args.dry_run:
        return _dry_run(cfg, args, "train")
    from memact.dcpo.config import ConfigError
    from memact.dcpo.trainer import train

    try:
        run_dir = train(cfg)
    except (ConfigError, FileNotFoundError) as err:
        raise SystemExit(f"memact train: {err}") from None
    if _is_rank0():
        print(f"[memact] DCPO done -> {run_dir}", file=sys.stderr)
    return 0


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _dry_run(cfg, args: argparse.Namespace, mode: str) -> int:
    from memact.dcpo.config import ConfigError
    from memact.dcpo.plan import dry_run, resolve_world

    try:
        dry_run(cfg, resolve_world(args.num_gpus), mode, gpu_gib=args.gpu_memory_gib)
    except ConfigError as err:
        raise SystemExit(f"memact {mode}: {err}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m memact.dcpo.cli_train")
    # The deepspeed launcher puts --local_rank before the subcommand; the rank itself is read
    # from the environment (RANK, LOCAL_RANK) it also sets.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="sft|train"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
