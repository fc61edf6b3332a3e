"""`memact pretrain`: the in-context recall warm-up before SFT (see docs/pretrain.md)."""

from __future__ import annotations

import argparse

from memact.policy.pretrain_config import PretrainConfig

_D = PretrainConfig()  # defaults shown in --help come from the config itself


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="warm up a model on in-context recall and id copying before SFT",
        description="Train a model directory (from `memact new-model`) on associative-recall episodes "
        "(facts in search-result records, then questions answered by the value token) and prune episodes "
        "(a prune_context call that repeats record ids and notes answers), with a curriculum over the number "
        "of facts. Recall is measured on entity names that no training sequence contains. Writes the model "
        "and tokenizer (save_pretrained), recall_curve.jsonl and recall_curve.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory to start from (e.g. from `memact new-model`)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--tokens", type=int, default=_D.tokens, help="training tokens (real, not padding)")
    p.add_argument("--lr", type=float, default=_D.lr, help="peak learning rate (AdamW, warm-up then cosine)")
    p.add_argument("--batch", type=int, default=_D.batch,
                   help="rows of --seq-len tokens per step; early levels use more, shorter rows of the same total")
    p.add_argument("--seq-len", type=int, default=_D.seq_len, help="longest row in tokens")
    p.add_argument("--curriculum", default=",".join(map(str, _D.curriculum)),
                   help="facts per episode at each level, comma-separated")
    p.add_argument("--advance", default=_D.advance, choices=["threshold", "schedule", "both"],
                   help="leave a level when held-out recall passes --advance-at (threshold), after an equal "
                   "share of the tokens (schedule), or whichever comes first (both)")
    p.add_argument("--advance-at", type=float, default=_D.advance_at, help="recall threshold for --advance")
    p.add_argument("--eval-every", type=int, default=_D.eval_every, help="steps between evaluations")
    p.add_argument("--eval-targets", type=int, default=_D.eval_targets,
                   help="held-out recall answers per level per evaluation")
    p.add_argument("--prune-share", type=float, default=_D.prune_share, help="share of prune (id-copy) episodes")
    p.add_argument("--text-share", type=float, default=_D.text_share,
                   help="share of rows of Python standard-library source (at most 0.5)")
    p.add_argument("--heldout-frac", type=float, default=_D.heldout_frac,
                   help="last share of the entity-name pool kept out of training, for evaluation")
    p.add_argument("--fillers", type=int, default=_D.fillers, help="filler sentences per document")
    p.add_argument("--warmup", type=float, default=_D.warmup, help="share of tokens with linear lr warm-up")
    p.add_argument("--dtype", default=_D.dtype, choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast only on CPUs with bf16 instructions (else it is ~10x slower)")
    p.add_argument("--threads", type=int, default=_D.threads, help="torch threads")
    p.add_argument("--seed", type=int, default=_D.seed)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memact.policy.pretrain import parse_curriculum, pretrain

    cfg = PretrainConfig(
        tokens=args.tokens, lr=args.lr, batch=args.batch, seq_len=args.seq_len,
        curriculum=parse_curriculum(args.curriculum), advance=args.advance, advance_at=args.advance_at,
        eval_every=args.eval_every, eval_targets=args.eval_targets, prune_share=args.prune_share,
        text_share=args.text_share, heldout_frac=args.heldout_frac, fillers=args.fillers, warmup=args.warmup,
        dtype=args.dtype, threads=args.threads, seed=args.seed,
    )
    pretrain(args.model, args.out, cfg)
    return 0
