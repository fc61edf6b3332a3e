"""Achieved FLOP/s of the DCPO update as a share of this CPU's measured fp32 matmul throughput.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_flops.py --model /tmp/mb/tiny --data /tmp/mb/seg.jsonl

The work counted is the useful work of the naive layout (every segment's tokens once, no
padding), whatever a layout actually computes, so a layout that skips work (shared
prefixes) shows as a higher share:

- dense: 6 x decoder parameters (embedding table excluded: a lookup, not a matmul) per token
  (2 forward + 4 backward FLOPs per weight and token);
- LM head: 6 x V x H per *trained* token (the head runs only where tokens are trained);
- attention: per layer and query at position p (0-based), QK^T and AV cost 2 x 2 x heads x
  head_dim x (p + 1) forward, x3 for forward + backward.

The ceiling is a 2048 x 2048 fp32 matmul (2 x 2048^3 FLOPs) timed in the same run at 1 and
2 threads; the update runs at ``--threads`` (1 by default: the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def matmul_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def update_flops(model, seqs) -> dict[str, float]:
    """FLOPs of one DCPO update (forward + backward) over ``seqs`` in the naive layout."""
    c = model.config
    emb = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters())
    if not c.tie_word_embeddings:
        params -= model.get_output_embeddings().weight.numel()
    dense_params = params - emb
    tokens = sum(len(s) for s in seqs)
    trained = sum(s.n_trained for s in seqs)
    head_dim = getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    # sum over tokens of (p + 1) = L (L + 1) / 2 per segment
    attn_pairs = sum(len(s) * (len(s) + 1) // 2 for s in seqs)
    return {
        "dense": 6.0 * dense_params * tokens,
        "head": 6.0 * c.vocab_size * c.hidden_size * trained,
        "attention": 3.0 * 4.0 * c.num_hidden_layers * c.num_attention_heads * head_dim * attn_pairs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="naive,prefix+fused")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench_dcpo_update import Bench  # same directory

    ceiling = {t: matmul_gflops(t) for t in (1, 2)}
    bench = Bench(args.model, args.data, args.threads)
    flops = update_flops(bench.model, bench.seqs)
    total = sum(flops.values())
    print(f"fp32 2048^2 matmul: {ceiling[1]:.1f} GFLOP/s (1 thread), {ceiling[2]:.1f} GFLOP/s (2 threads)")
    print(f"useful work per update: {total / 1e9:.2f} GFLOP (" +
          ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items()) + f"), {bench.useful} tokens")
    for name in args.variants.split(","):
        v = bench.variant(name)
        bench.seconds(v)  # warm-up
        sec = statistics.median(bench.seconds(v) for _ in range(args.rounds))
        achieved = total / sec / 1e9
        print(f"{name:13s} {achieved:6.2f} GFLOP/s = {achieved / ceiling[args.threads]:.1%} of the "
              f"{args.threads}-thread matmul ceiling ({bench.useful / sec:,.0f} useful tok/s)")


if __name__ == "__main__":
    main()
