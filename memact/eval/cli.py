"""`memact eval`: accuracy against context length for policies and memory strategies."""

from __future__ import annotations

import argparse


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    from memact.engines.factory import ENGINES
    from memact.env.memory import DEFAULT_CONTEXT_BUDGET, DEFAULT_MAX_STEPS
    from memact.env.sources import add_source_arguments

    p = sub.add_parser(
        "eval", help="evaluate policies x memory strategies x objectives; table + plots",
        description="Run every (policy, strategy, K) combination on the same tasks and write episodes.jsonl, "
        "summary.json, REPORT.md with the paper-style table, accuracy_vs_k.png and accuracy_vs_cost.png.",
    )
    p.add_argument("--policy", required=True, action="append",
                   help="MODEL_DIR | scripted | scripted-plan | scripted-nomem | openai:MODEL; repeat or "
                   "comma-separate for several")
    p.add_argument("--strategy", default="memact",
                   help="comma-separated: memact, full, sliding_window[:K], summarize[:F] (default memact)")
    p.add_argument("--objectives", type=_ints, default=[2, 4, 6, 8], help="comma-separated K values")
    p.add_argument("--n", type=int, default=16, help="tasks per (policy, strategy, K)")
    p.add_argument("--seed", type=int, default=1000, help="task seed (held out from training seeds)")
    add_source_arguments(p, split="eval")
    p.add_argument("--context-budget", type=_ints, default=[DEFAULT_CONTEXT_BUDGET],
                   help=f"context budget in tokens, or several comma-separated for a sweep (accuracy against "
                   f"budget and measured context per K; default {DEFAULT_CONTEXT_BUDGET})")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="step budget")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default greedy)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest turn")
    p.add_argument("--engine", default="hf", choices=ENGINES,
                   help="what rolls out model directories: hf (transformers) or vllm (needs vLLM installed)")
    p.add_argument("--judge", default=None, help="openai:MODEL: an LLM judge for answers that miss exact match")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memact.agent.rollout import close_engines
    from memact.agent.strategies import parse_strategy
    from memact.engines.base import SamplingParams
    from memact.env.memory import Budget
    from memact.env.sources import source_from_args
    from memact.eval.evaluate import EvalSpec, evaluate
    from memact.eval.report import write_report

    policies = [p for item in args.policy for p in item.split(",") if p]
    strategies = [s for s in args.strategy.split(",") if s]
    for s in strategies:
        parse_strategy(s)  # fail before any work
    source = source_from_args(args, "eval")
    judge = None
    if args.judge:
        from memact.eval.judge import make_judge

        judge = make_judge(args.judge)
    budgets = [Budget(b, args.max_steps) for b in sorted(set(args.context_budget))]
    spec = EvalSpec.grid(policies, strategies, args.objectives, n=args.n, seed=args.seed, data=args.data,
                    retrieval=args.retrieval,
                    split=args.split, budgets=budgets,
                    sampling=SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens),
                    engine=args.engine)
    try:
        summary = evaluate(spec, args.out, judge=judge, progress=not args.quiet)
    finally:
        close_engines()
    path = write_report(summary, args.out, title="memact evaluation",
                        preamble=f"Data: {source.spec}" + (f" ({args.split} split)" if source.path else "")
                        + f"; n={args.n} tasks per cell; context budget "
                        f"{', '.join(str(b.max_context_tokens) for b in budgets)} tokens; seed {args.seed}.")
    print(f"wrote {path}")
    return 0
