"""Peak memory and wall time of naive vs chunked (vs Triton on CUDA) LM-head log-probs + entropy.

    .venv/bin/python benchmarks/bench_linear_logprobs.py --tokens 8192 --vocab 32000 --hidden 1024 --repeats 1

Quick smoke run: ``--tokens 1024 --vocab 8000 --hidden 256``. Other options: ``--dtype bf16``,
``--temperature``, ``--chunk-size``, ``--variants naive,chunked``, ``--device cpu|cuda``.

Each variant does one training-style step: forward to (logprobs, entropy) [N], then backward of
``sum(g_lp * logprobs + g_ent * entropy)`` (fixed random per-token upstream grads, as an RL loss would
give) to both hidden [N, H] and weight [V, H].

* naive:   ``logp = log_softmax(hidden @ W.T / T)``; gather; ``entropy = -(exp(logp) * logp).sum(-1)``;
           plain autograd (the [N, V] logits and several same-sized intermediates stay alive).
* chunked: ``memact_kernels.linear_logprobs(..., impl="chunked")``.
* triton:  ``memact_kernels.linear_logprobs(..., impl="triton")`` (CUDA only).

How memory is measured
----------------------
CPU: every variant runs in its own fresh subprocess (this script re-invoked with ``--child``). The child
runs a tiny warm-up step (so one-off library allocations - oneDNN/MKL scratch, thread pools - are not
charged to the variant), builds the inputs, reads its *current* resident set size (``/proc/self/statm``)
as the baseline, runs the real steps, and reports ``ru_maxrss - baseline``, where
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is the process's high-water mark of resident memory: the
peak memory the step needs on top of its inputs, including the returned gradients. The baseline is the
current RSS rather than the high-water mark so that temporaries freed while building the inputs are not
subtracted. A fresh process per variant is required because ru_maxrss can't be reset and because pages
cached by one variant would hide the next one's peak. RSS counts pages actually touched, which is what
decides an OOM; glibc returns large freed blocks (mmap'd) to the OS, so freed intermediates don't
inflate it. Caveat: if a step needed less than the inputs' construction transients the number would be
an overestimate; not the case for these sizes (the weight is scaled in place).

CUDA: one process, ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the step,
after ``reset_peak_memory_stats()``; time from ``torch.cuda.synchronize()``-bracketed wall clock after one
warm-up step (which also compiles the Triton kernels).

Time is the median over ``--repeats`` steps (on CPU the first step counts: there is no cache to warm,
and a long step dwarfs any one-off cost). On CPU the table also gives the process CPU time
(user + system, all threads) per step: on a machine shared with other jobs the wall time of a 2-thread
GEMM swings by +-30% with the neighbours' load, the CPU time much less, so compare ratios of both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from memact_kernels import linear_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(args, device, seed=0):
    """hidden [N, H], weight [V, H] (requires grad), targets [N], and upstream grads g_lp, g_ent [N]."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[args.dtype]
    n, v, h = args.tokens, args.vocab, args.hidden
    hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    # Scale like an initialised LM head so logits are O(1) and the softmax is not one-hot.
    weight = torch.randn(v, h, generator=gen).mul_(h**-0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    g_lp = torch.randn(n, generator=gen).to(device)
    g_ent = torch.randn(n, generator=gen).to(device)
    return hidden, weight, targets, g_lp, g_ent


def naive(hidden, weight, targets, temperature):
    logits = hidden @ weight.T  # [N, V]
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V] fp32
    logprobs = logp.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def run_variant(variant, inputs, args):
    """One forward + backward step; returns (logprobs, entropy, grad_hidden, grad_weight)."""
    hidden, weight, targets, g_lp, g_ent = inputs
    if variant == "naive":
        lp, ent = naive(hidden, weight, targets, args.temperature)
    else:
        lp, ent = linear_logprobs(hidden, weight, targets, args.temperature, chunk_size=args.chunk_size, impl=variant)
    loss = (lp * g_lp).sum() + (ent * g_ent).sum()
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return lp.detach(), ent.detach(), grad_hidden, grad_weight


def summary(outputs):
    """Small fingerprints of the results, to check the variants agree without shipping tensors around."""
    lp, ent, gh, gw = (t.double() for t in outputs)
    return {"lp_sum": lp.sum().item(), "ent_sum": ent.sum().item(), "gh_norm": gh.norm().item(), "gw_norm": gw.norm().item()}


def maxrss_mib():
    """High-water mark of this process's resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds():
    """User + system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_mib():
    """Resident memory right now (Linux /proc; falls back to the high-water mark elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return maxrss_mib()


def child_cpu(variant, args):
    """Run in a fresh process: print one JSON line with peak RSS growth and step times."""
    # Warm-up on tiny inputs: loads GEMM kernels/thread pools without touching big memory.
    tiny = argparse.Namespace(**{**vars(args), "tokens": 64, "vocab": 128, "hidden": 32})
    run_variant(variant, make_inputs(tiny, "cpu", seed=1), tiny)

    inputs = make_inputs(args, "cpu")
    base = current_rss_mib()
    times, cpu_times, result = [], [], None
    for _ in range(args.repeats):
        result = None  # free the previous step's grads before the next step
        t0, c0 = time.perf_counter(), cpu_seconds()
        result = run_variant(variant, inputs, args)
        times.append(time.perf_counter() - t0)
        cpu_times.append(cpu_seconds() - c0)
    peak = maxrss_mib() - base  # read before summary(), which allocates fp64 copies
    row = {"variant": variant, "peak_mib": peak, "times": times, "cpu_times": cpu_times, **summary(result)}
    print(json.dumps(row))


def bench_cpu(variants, args):
    rows = []
    for variant in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  done {variant}: {rows[-1]['times']}", flush=True)
    return rows


def bench_cuda(variants, args):
    rows = []
    inputs = make_inputs(args, "cuda")
    for variant in variants:
        run_variant(variant, inputs, args)  # warm-up (Triton compile, cuBLAS handles)
        torch.cuda.synchronize()
        times, result = [], None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.repeats):
            result = None
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = run_variant(variant, inputs, args)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append({"variant": variant, "peak_mib": peak, "times": times, **summary(result)})
        del result
        print(f"  done {variant}: {times}", flush=True)
    return rows


def print_table(rows, args, device):
    print(
        f"\nN={args.tokens} V={args.vocab} H={args.hidden} dtype={args.dtype} T={args.temperature} "
        f"device={device} threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    naive_row = next((r for r in rows if r["variant"] == "naive"), None)
    has_cpu = all("cpu_times" in r for r in rows)
    header = f"{'variant':<10}{'peak MiB':>12}{'wall s':>10}" + (f"{'cpu s':>10}" if has_cpu else "")
    if naive_row is not None:
        header += f"{'mem/naive':>11}{'wall/naive':>12}" + (f"{'cpu/naive':>11}" if has_cpu else "")
        header += f"{'max rel diff':>14}"
    print(header)
    print("-" * len(header))
    med = statistics.median
    for r in rows:
        line = f"{r['variant']:<10}{r['peak_mib']:>12.1f}{med(r['times']):>10.3f}"
        if has_cpu:
            line += f"{med(r['cpu_times']):>10.3f}"
        if naive_row is not None:
            line += f"{r['peak_mib'] / max(naive_row['peak_mib'], 1e-9):>11.3f}"
            line += f"{med(r['times']) / med(naive_row['times']):>12.3f}"
            if has_cpu:
                line += f"{med(r['cpu_times']) / med(naive_row['cpu_times']):>11.3f}"
            diff = max(
                abs(r[k] - naive_row[k]) / max(abs(naive_row[k]), 1e-12)
                for k in ("lp_sum", "ent_sum", "gh_norm", "gw_norm")
            )
            line += f"{diff:>14.2e}"
        print(line)
    chunked_row = next((r for r in rows if r["variant"] == "chunked"), None)
    if naive_row is not None and chunked_row is not None:
        mem_ratio = chunked_row["peak_mib"] / max(naive_row["peak_mib"], 1e-9)
        time_ratio = med(chunked_row["times"]) / med(naive_row["times"])
        verdict = f"chunked vs naive: memory {mem_ratio:.3f}x (goal <= 0.125: {'ok' if mem_ratio <= 0.125 else 'MISSED'})"
        verdict += f", wall time {time_ratio:.3f}x (goal <= 1.2: {'ok' if time_ratio <= 1.2 else 'MISSED'})"
        if has_cpu:
            cpu_ratio = med(chunked_row["cpu_times"]) / med(naive_row["cpu_times"])
            verdict += f", cpu time {cpu_ratio:.3f}x"
        print("\n" + verdict)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="N = batch * sequence rows")
    parser.add_argument("--vocab", type=int, default=32000, help="V")
    parser.add_argument("--hidden", type=int, default=1024, help="H")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: library's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=None, help="comma list of naive,chunked,triton")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one CPU variant
    args = parser.parse_args()

    if args.child is not None:
        child_cpu(args.child, args)
        return

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variants:
        variants = args.variants.split(",")
    else:
        variants = ["naive", "chunked"] + (["triton"] if device == "cuda" else [])
    print(f"running {variants} on {device} ...", flush=True)
    rows = bench_cuda(variants, args) if device == "cuda" else bench_cpu(variants, args)
    print_table(rows, args, device)


if __name__ == "__main__":
    main()
