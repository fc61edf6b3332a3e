"""`memact rollout`: run episodes and write trajectories (calls + DCPO segments) as JSONL."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    from memact.engines.factory import ENGINES
    from memact.env.memory import DEFAULT_CONTEXT_BUDGET, DEFAULT_MAX_STEPS
    from memact.env.sources import add_source_arguments

    p = sub.add_parser(
        "rollout", help="run episodes of a policy and write trajectories with their DCPO segments",
        description="Run N multi-objective QA episodes with K sub-questions each and write one JSON object "
        "per trajectory: task_id, reward, metrics, calls (prompt_ids, output_ids, logprobs) and segments "
        "(prompt_ids, response_ids, loss_mask, logprobs).",
    )
    p.add_argument("--policy", required=True,
                   help="'scripted' (expert with memory), 'scripted-plan' (its notes also list the questions still "
                   "to answer), 'scripted-nomem' (never prunes), a model directory, "
                   "or openai:MODEL (an OpenAI-compatible endpoint: OPENAI_BASE_URL, OPENAI_API_KEY)")
    p.add_argument("--objectives", "-k", type=int, default=2, help="sub-questions per task (K)")
    p.add_argument("--n", type=int, default=16, help="number of episodes")
    p.add_argument("--seed", type=int, default=0, help="task and record-id seed")
    add_source_arguments(p, split="train")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--context-budget", type=int, default=DEFAULT_CONTEXT_BUDGET,
                   help=f"largest context in tokens (default {DEFAULT_CONTEXT_BUDGET})")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="largest number of turns")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest turn in tokens")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for scripted policies "
                   "(default: the tokenizer `memact new-model` trains)")
    p.add_argument("--strategy", default=None,
                   help="memact | full | sliding_window[:K] | summarize[:F] (default: memact; full for scripted-nomem)")
    p.add_argument("--engine", default="hf", choices=ENGINES,
                   help="what rolls out a model directory: hf (transformers) or vllm (needs vLLM installed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memact.agent.rollout import close_engines, rollout
    from memact.engines.base import SamplingParams
    from memact.env.memory import Budget
    from memact.env.sources import source_from_args
    from memact.trajectory import trajectory_stats, write_jsonl

    if args.objectives < 1 or args.n < 1:
        raise SystemExit("--objectives and --n must be >= 1")
    source = source_from_args(args, "rollout")
    try:
        tasks = source.tasks(args.n, args.objectives, args.seed, split=args.split)
    except ValueError as err:  # e.g. K above the split's questions
        raise SystemExit(f"memact rollout: --data {args.data!r}: {err}") from None
    t0 = time.time()
    trajs = rollout(
        args.policy, args.objectives, args.n, seed=args.seed, budget=Budget(args.context_budget, args.max_steps),
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens),
        tokenizer_dir=args.tokenizer, progress=not args.quiet, strategy=args.strategy, engine=args.engine,
        tasks=tasks,
    )
    close_engines()
    write_jsonl(args.out, trajs)
    s = trajectory_stats(trajs)
    print(
        f"{args.policy} K={args.objectives} n={s['episodes']}: mean reward {s['reward_mean']:.3f} | "
        f"context mean {s['context_mean']:.0f} peak {s['context_peak_max']} (budget {args.context_budget}) | "
        f"memory actions {s['memory_actions']:.1f} | overflow {s['overflow_rate']:.0%} | "
        f"steps {s['steps']:.1f} | {time.time() - t0:.1f}s -> {args.out}",
        file=sys.stderr,
    )
    return 0
