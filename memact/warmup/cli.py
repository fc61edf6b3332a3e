"""`memact pretrain`: the copy warm-up before SFT (see docs/pretrain.md)."""

from __future__ import annotations

import argparse

from memact.warmup.copy import DEFAULT_STAGES, FORMATS, LOSSES, stages_text


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="warm up a model on copying from its context before SFT",
        description="Teach a model directory (from `memact new-model`) to copy from its context before SFT: "
        "stages of synthetic episodes over the task's words, many small steps each (each stage measured in "
        "docs/pretrain.md). The default recipe is multi-query associative recall over names and values (mqar), "
        "then over every word including record ids (mqar_all); lists of the record ids shown in [id: ...] "
        "headers (idlist, trained on the ids only) are a stage to add. At the end the embedding rows of the "
        "tokens no stage fed are redrawn. Writes the model and tokenizer (save_pretrained), recall_curve.jsonl, "
        "recall_curve.png and pretrain_config.json to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory to start from (e.g. from `memact new-model`)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--stages", default=stages_text(DEFAULT_STAGES),
                   help=f"comma-separated format:steps[:n:batch:seq_len[:loss]] (formats {', '.join(FORMATS)}; "
                   f"loss {', '.join(LOSSES)}, see docs/pretrain.md)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (e.g. 0.01 to smoke-test)")
    p.add_argument("--lr", type=float, default=None,
                   help="replace every stage's peak learning rate (AdamW, warm-up then cosine; stage default 1e-3)")
    p.add_argument("--eval-every", type=int, default=500, help="steps between evaluations")
    p.add_argument("--device", default="auto", help="auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--keep-unseen-rows", action="store_true",
                   help="leave the embedding rows of the tokens the warm-up never fed as training left them "
                   "(by default they get fresh random directions at the end: the warm-up collapses them onto "
                   "one vector, and SFT then cannot tell the attribute words apart; docs/pretrain.md)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memact.models.model import resolve_device
    from memact.warmup.copy import copy_warmup, parse_stages

    if args.eval_every < 1:
        raise SystemExit(f"error: --eval-every must be >= 1, got {args.eval_every}")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise SystemExit(f"error: --device: {err}") from None
    try:
        stages = parse_stages(args.stages, scale=args.scale, lr=args.lr)
    except ValueError as err:
        raise SystemExit(f"error: --stages: {err}") from None
    copy_warmup(args.model, args.out, stages, eval_every=args.eval_every, seed=args.seed, device=device,
                redraw_unseen=not args.keep_unseen_rows)
    return 0
