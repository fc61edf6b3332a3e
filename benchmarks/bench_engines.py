"""Rollout-engine throughput: ratios measured in one run, on one random tiny model.

1. HFEngine, continuous batching vs fixed batches, on a mixed-length rollout: more prompts
   than ``max_batch_size`` whose turns have very different lengths. A forward hook ends a turn
   once it reaches a fixed absolute position, so a short prompt gets a long turn and a long
   prompt a short one; decoding is greedy, so both paths produce the same tokens (checked)
   and do the same useful work. Fixed batches run each slice until its slowest row ends.
2. vLLM-CPU vs HFEngine on the same model and prompts (greedy, same tokens; checked), when
   vLLM is importable: run from .venv-vllm. vLLM runs in-process; the HF engine is timed
   before vLLM starts and again after (vLLM's start-up binds the process's OpenMP threads).

Timings on a shared 2-core machine are noisy: each configuration runs ``--repeats`` times,
interleaved, and the best time counts.

    .venv/bin/python benchmarks/bench_engines.py                                  # part 1
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_engines.py           # parts 1 and 2
    .venv-vllm/bin/python benchmarks/bench_engines.py --skip-hf-cb --vllm-eager   # part 2 only, no torch.compile
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

# Runs from a checkout without an install, too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def force_stop_at(model, eos: int, position: int):
    """Make ``eos`` certain once a row's next token would sit at ``position`` or later."""

    def hook(module, args, kwargs, out):
        pos = kwargs.get("position_ids")
        if pos is not None:
            last = pos[:, -1]
            out.logits[:, -1, eos] = torch.where(last >= position - 1, torch.tensor(1e4), out.logits[:, -1, eos])
        return out

    return model.register_forward_hook(hook, with_kwargs=True)


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(5, vocab - 1, (k,), generator=g).tolist() for k in lengths]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_continuous(model, tok, args) -> None:
    from memact.engines.base import SamplingParams
    from memact.engines.hf import HFEngine

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = random_prompts(args.cb_prompts, 16, args.cb_stop_at - 24, len(tok), seed=1)
    sp = SamplingParams(temperature=0.0, max_new_tokens=args.cb_stop_at)
    engines = {
        "fixed": HFEngine(model, eos, tok.pad_token_id, max_batch_size=args.batch, continuous_batching=False),
        "continuous": HFEngine(model, eos, tok.pad_token_id, max_batch_size=args.batch),
    }
    hook = force_stop_at(model, eos, args.cb_stop_at)
    best, outs = {k: float("inf") for k in engines}, {}
    try:
        engines["continuous"].generate(prompts[:2], sp)  # warm-up
        for _ in range(args.repeats):
            for name, engine in engines.items():
                dt, outs[name] = timed(lambda e=engine: e.generate(prompts, sp))
                best[name] = min(best[name], dt)
    finally:
        hook.remove()
    same = [g.output_ids for g in outs["fixed"]] == [g.output_ids for g in outs["continuous"]]
    lengths = [len(g.output_ids) for g in outs["fixed"]]
    tokens = sum(lengths)
    print(f"\n[1] HFEngine continuous vs fixed batches: {len(prompts)} prompts of "
          f"{min(len(p) for p in prompts)}-{max(len(p) for p in prompts)} tokens, turns of "
          f"{min(lengths)}-{max(lengths)} tokens ({tokens} in all), max_batch_size={args.batch}, greedy, "
          f"identical outputs: {same}")
    for name in engines:
        print(f"    {name:<11} {best[name]:7.2f} s  {tokens / best[name]:8.0f} generated tok/s")
    print(f"    speed-up of continuous batching: {best['fixed'] / best['continuous']:.2f}x")
    if not same:
        raise SystemExit("continuous batching changed greedy outputs")


def bench_vllm(model_dir, model, tok, args) -> None:
    from memact.engines.base import SamplingParams
    from memact.engines.hf import HFEngine

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from memact.engines.vllm import VLLMEngine

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = random_prompts(args.v_prompts, 32, 400, len(tok), seed=2)
    sp = SamplingParams(temperature=0.0, max_new_tokens=args.v_new_tokens)
    hf = HFEngine(model, eos, tok.pad_token_id, max_batch_size=args.batch)
    hf.generate(prompts[:2], sp)
    hf_before, hf_out = min((timed(lambda: hf.generate(prompts, sp)) for _ in range(args.repeats)),
                            key=lambda r: r[0])
    start, engine = timed(lambda: VLLMEngine(model_dir, dtype="float32", max_model_len=1024,
                                             enforce_eager=args.vllm_eager, seed=0))
    engine.generate(prompts[:2], sp)
    v_time, v_out = float("inf"), None
    hf_after = float("inf")
    for _ in range(args.repeats):
        dt, v_out = timed(lambda: engine.generate(prompts, sp))
        v_time = min(v_time, dt)
        hf_after = min(hf_after, timed(lambda: hf.generate(prompts, sp))[0])
    same = [g.output_ids for g in hf_out] == [g.output_ids for g in v_out]
    tokens = sum(len(g.output_ids) for g in v_out)
    print(f"\n[2] vLLM-CPU vs HFEngine: {len(prompts)} prompts of 32-400 tokens, {args.v_new_tokens} new tokens "
          f"each ({tokens} in all), greedy, identical outputs: {same}; vLLM start-up {start:.1f} s "
          f"({'eager' if args.vllm_eager else 'torch.compile'}), torch threads {torch.get_num_threads()}")
    print(f"    HFEngine (before vLLM)  {hf_before:7.2f} s  {tokens / hf_before:8.0f} generated tok/s")
    print(f"    HFEngine (after vLLM)   {hf_after:7.2f} s  {tokens / hf_after:8.0f} generated tok/s")
    print(f"    vLLM                    {v_time:7.2f} s  {tokens / v_time:8.0f} generated tok/s")
    print(f"    vLLM / HFEngine throughput: {hf_before / v_time:.2f}x (HF before vLLM), "
          f"{hf_after / v_time:.2f}x (HF after)")
    engine.llm.llm_engine.engine_core.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (memact new-model)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="torch threads (default $OMP_NUM_THREADS or 1)")
    p.add_argument("--batch", type=int, default=8, help="HFEngine max_batch_size")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration; the best counts")
    p.add_argument("--cb-prompts", type=int, default=24, help="[1] prompts")
    p.add_argument("--cb-stop-at", type=int, default=320, help="[1] absolute position where every turn ends")
    p.add_argument("--v-prompts", type=int, default=32, help="[2] prompts")
    p.add_argument("--v-new-tokens", type=int, default=64, help="[2] tokens generated per prompt")
    p.add_argument("--vllm-eager", action="store_true", help="[2] vLLM without torch.compile (faster start)")
    p.add_argument("--skip-hf-cb", action="store_true", help="skip part 1")
    p.add_argument("--skip-vllm", action="store_true", help="skip part 2")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from memact.engines.vllm import vllm_available
    from memact.models.model import load_policy, new_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = new_model(tmp, preset=args.preset, seed=0)
        model, tok = load_policy(model_dir)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {args.preset} ({n_params / 1e6:.1f} M parameters, fp32), torch {torch.__version__}, "
              f"{args.threads} thread(s)")
        if not args.skip_hf_cb:
            bench_continuous(model, tok, args)
        if not args.skip_vllm:
            if vllm_available():
                bench_vllm(model_dir, model, tok, args)
            else:
                print("\n[2] vLLM is not installed here: run from .venv-vllm (`make venv-vllm`)")


if __name__ == "__main__":
    main()
