"""`memact pretrain`: the in-context recall warm-up before SFT (see docs/pretrain.md)."""

from __future__ import annotations

import argparse

from memact.warmup.copy import DEFAULT_STAGES, FORMATS, stages_text
from memact.warmup.facts_config import PretrainConfig

_D = PretrainConfig()  # defaults shown in --help come from the config itself
_FACTS_ONLY = ("tokens", "batch", "seq_len", "advance", "advance_at", "eval_targets", "prune_share", "text_share",
               "heldout_frac", "fillers", "warmup", "dtype")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="warm up a model on in-context recall and id copying before SFT",
        description="Teach a model directory (from `memact new-model`) to copy from its context before SFT. "
        "--recipe copy (the default; each stage measured in docs/pretrain.md): stages of synthetic episodes "
        "over the task's words, many small steps each: multi-query associative recall over names and values "
        "(mqar), then over every word including record ids (mqar_all); lists of the record ids shown in "
        "[id: ...] headers (idlist, trained on the ids only) are a stage to add; at the end the embedding rows "
        "of the tokens no stage fed are redrawn. --recipe facts: the "
        "first design, facts in search-result records answered by questions, with a curriculum over the "
        "number of facts (slower: it did not copy within the budgets measured). Both write the model and "
        "tokenizer (save_pretrained), recall_curve.jsonl and recall_curve.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory to start from (e.g. from `memact new-model`)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--recipe", default="copy", choices=["copy", "facts"], help="which warm-up (see above)")
    p.add_argument("--stages", default=None,
                   help="copy: comma-separated format:steps[:n:batch:seq_len[:loss]] (formats "
                   f"{', '.join(FORMATS)}; loss all, targets or copy, see docs/pretrain.md); default: the measured recipe, "
                   f"{stages_text(DEFAULT_STAGES)}")
    p.add_argument("--scale", type=float, default=1.0, help="copy: multiply every stage's steps (e.g. 0.01 to smoke-test)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (AdamW, warm-up then cosine); default 1e-3 for copy (each stage), "
                   f"{_D.lr} for facts")
    p.add_argument("--tokens", type=int, default=_D.tokens, help="facts: training tokens (real, not padding)")
    p.add_argument("--batch", type=int, default=_D.batch,
                   help="facts: rows of --seq-len tokens per step; early levels use more, shorter rows of the same total")
    p.add_argument("--seq-len", type=int, default=_D.seq_len, help="facts: longest row in tokens")
    p.add_argument("--curriculum", default=",".join(map(str, _D.curriculum)),
                   help="facts: facts per episode at each level, comma-separated")
    p.add_argument("--advance", default=_D.advance, choices=["threshold", "schedule", "both"],
                   help="facts: leave a level when held-out recall passes --advance-at (threshold), after an equal "
                   "share of the tokens (schedule), or whichever comes first (both)")
    p.add_argument("--advance-at", type=float, default=_D.advance_at, help="facts: recall threshold for --advance")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"steps between evaluations; default 500 for copy, {_D.eval_every} for facts")
    p.add_argument("--eval-targets", type=int, default=_D.eval_targets,
                   help="facts: held-out recall answers per level per evaluation")
    p.add_argument("--prune-share", type=float, default=_D.prune_share, help="facts: share of prune (id-copy) episodes")
    p.add_argument("--text-share", type=float, default=_D.text_share,
                   help="facts: share of rows of Python standard-library source (at most 0.5)")
    p.add_argument("--heldout-frac", type=float, default=_D.heldout_frac,
                   help="facts: last share of the entity-name pool kept out of training, for evaluation")
    p.add_argument("--fillers", type=int, default=_D.fillers, help="facts: filler sentences per document")
    p.add_argument("--warmup", type=float, default=_D.warmup, help="facts: share of tokens with linear lr warm-up")
    p.add_argument("--dtype", default=_D.dtype, choices=["auto", "bf16", "fp32"],
                   help="facts: auto: bf16 autocast only on CPUs with bf16 instructions (else it is ~10x slower)")
    p.add_argument("--threads", type=int, default=_D.threads, help="torch threads")
    p.add_argument("--device", default="auto",
                   help="copy: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--keep-unseen-rows", action="store_true",
                   help="copy: leave the embedding rows of the tokens the warm-up never fed as training left them "
                   "(by default they get fresh random directions at the end: the warm-up collapses them onto "
                   "one vector, and SFT then cannot tell the attribute words apart; docs/pretrain.md)")
    p.add_argument("--seed", type=int, default=_D.seed)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.recipe == "copy":
        given = [f"--{k.replace('_', '-')}" for k in _FACTS_ONLY if getattr(args, k) != getattr(_D, k)]
        if args.curriculum != ",".join(map(str, _D.curriculum)):
            given.append("--curriculum")
        if given:
            raise SystemExit(f"error: {', '.join(given)} set the facts recipe; add --recipe facts or drop them")
        from memact.models.model import resolve_device
        from memact.warmup.copy import copy_warmup, parse_stages

        try:
            device = resolve_device(args.device)
        except ValueError as err:
            raise SystemExit(f"error: --device: {err}") from None

        stages = parse_stages(args.stages or stages_text(DEFAULT_STAGES), scale=args.scale, lr=args.lr)
        copy_warmup(args.model, args.out, stages, eval_every=args.eval_every or 500, seed=args.seed,
                    threads=args.threads, device=device, redraw_unseen=not args.keep_unseen_rows)
        return 0
    if args.device != "auto":
        raise SystemExit("error: --device sets the copy recipe's device; the facts recipe runs on the CPU")
    if args.keep_unseen_rows:
        raise SystemExit("error: --keep-unseen-rows belongs to the copy recipe; the facts recipe redraws nothing")
    from memact.warmup.facts import parse_curriculum, pretrain

    cfg = PretrainConfig(
        tokens=args.tokens, lr=args.lr or _D.lr, batch=args.batch, seq_len=args.seq_len,
        curriculum=parse_curriculum(args.curriculum), advance=args.advance, advance_at=args.advance_at,
        eval_every=args.eval_every or _D.eval_every, eval_targets=args.eval_targets, prune_share=args.prune_share,
        text_share=args.text_share, heldout_frac=args.heldout_frac, fillers=args.fillers, warmup=args.warmup,
        dtype=args.dtype, threads=args.threads, seed=args.seed,
    )
    pretrain(args.model, args.out, cfg)
    return 0
