"""The HF engine's KV cache kept between turns (``HFEngine.session``) against today's engine,
which prefills every turn's whole prompt again: the same episodes, one process.

Greedy decoding, so both engines produce the same tokens (checked) and do the same useful
work; every configuration runs ``--repeats`` times, interleaved, and the best time counts
(the machine is shared). Prints rollout seconds, generated tokens/s, prompt tokens computed,
and the ratio.

    .venv/bin/python benchmarks/bench_prefix_cache.py                       # the shipped warm-up model
    .venv/bin/python benchmarks/bench_prefix_cache.py --policy runs/demo/sft_mem --strategy memact
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# Runs from a checkout without an install, too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="", help="model directory (default: the shipped warm-up model)")
    p.add_argument("--strategy", default="full", help="memact | full | sliding_window[:K] | summarize[:F]")
    p.add_argument("--k", type=int, default=4, help="objectives per task")
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=12, help="turns per episode at most")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from memact.agent.chat import ChatRenderer
    from memact.agent.loop import run_episodes
    from memact.assets import tiny_warm
    from memact.engines.base import SamplingParams
    from memact.engines.factory import build_engine
    from memact.env.memory import Budget
    from memact.env.task import make_tasks
    from memact.models.model import load_tokenizer

    path = args.policy or tiny_warm()
    tok, model = load_tokenizer(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tasks = make_tasks(args.episodes, args.k, seed=0)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    engines = {"prefill every turn": build_engine("hf", model, tok, args.max_batch_size, prefix_cache_tokens=0),
               "KV kept between turns": build_engine("hf", model, tok, args.max_batch_size)}
    best: dict[str, float] = {}
    outputs: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            engine.stats = {"prefill_tokens": 0, "reused_tokens": 0}
            t0 = time.perf_counter()
            trajs = run_episodes(engine, tasks, ChatRenderer(tok), sampling, budget=Budget(max_steps=args.max_steps),
                                 strategy=args.strategy, progress=False)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
            outputs[name] = [[c.output_ids for c in t.calls] for t in trajs]
    base, new = engines
    same = outputs[base] == outputs[new]
    gen = sum(len(o) for t in outputs[base] for o in t)
    calls = sum(len(t) for t in outputs[base])
    edits = sum(c.edited_before for t in trajs for c in t.calls)
    print(f"policy {path}; strategy {args.strategy}, K={args.k}, {args.episodes} episodes, {calls} calls, "
          f"{edits} after a context edit, {gen} generated tokens; greedy, {args.threads} thread(s), "
          f"best of {args.repeats}")
    print(f"same tokens: {same}")
    print("| engine | rollout s | generated tok/s | prompt tokens computed | reused |")
    print("|---|---|---|---|---|")
    for name, engine in engines.items():
        s = engine.stats
        print(f"| {name} | {best[name]:.2f} | {gen / best[name]:.0f} | {s['prefill_tokens']} | {s['reused_tokens']} |")
    print(f"ratio (rollout time, prefill every turn / KV kept): x{best[base] / best[new]:.2f}")
    if not same:
        sys.exit("the engines generated different tokens")


if __name__ == "__main__":
    main()
