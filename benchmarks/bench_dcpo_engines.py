"""The same DCPO run with HF and with vLLM rollouts, side by side (run in the vLLM lane's environment).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/bench_dcpo_engines.py \\
        --model runs/tiny_sft --out /tmp/engines --steps 3 [--temperature 0] [overrides ...]

Runs ``memact train`` twice, one process each, from the same config (``configs/tiny_cpu_dcpo.yaml``
and the overrides given), with ``rollout.engine=hf`` then ``rollout.engine=vllm`` (fp32, eager:
the rollouts match the trainer to rounding). Prints each step's rollout throughput and times,
and the vLLM/HF ratios of their means over the steps. With ``--temperature 0`` (greedy) the
first step's rewards, accuracy and context must be equal: both engines decode the same tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("reward_mean", "accuracy", "context_mean", "turns")


def run(engine: str, args: argparse.Namespace, out: Path) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "memact.cli", "train", f"model.path={args.model}", f"run.out_dir={out}",
           f"run.steps={args.steps}", f"rollout.engine={engine}", f"rollout.temperature={args.temperature}",
           "rollout.vllm.dtype=float32", "rollout.vllm.enforce_eager=true", "logging.progress=false",
           "logging.table_every=0", *args.overrides]
    t0 = time.time()
    with open(out.parent / f"{engine}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], time.time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (an SFT checkpoint gives real episodes)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    args = p.parse_args(argv)
    base = Path(args.out)
    if base.exists() and any(base.iterdir()):
        raise SystemExit(f"{base} is not empty")
    base.mkdir(parents=True, exist_ok=True)
    results = {}
    for engine in ("hf", "vllm"):
        rows, wall = run(engine, args, base / engine)
        results[engine] = rows
        print(f"{engine}: process {wall:.0f} s (start-up and {len(rows)} steps)", flush=True)
        for r in rows:
            print(f"  step {r['step']}: rollout {r['rollout_s']:.1f} s, {r['rollout_tok_s']:.0f} gen tok/s | update "
                  f"{r['update_s']:.1f} s | push {r['push_s']:.2f} s | step {r['step_s']:.1f} s | reward "
                  f"{r['reward_mean']:.3f} | mismatch mean {r['logprob_mismatch_mean']:.2e} "
                  f"max {r['logprob_mismatch_max']:.2e}", flush=True)

    def avg(engine: str, key: str) -> float:
        return sum(r[key] for r in results[engine]) / len(results[engine])

    for key in ("rollout_tok_s", "rollout_s", "step_s"):
        print(f"vllm / hf, mean {key}: {avg('vllm', key) / avg('hf', key):.2f} "
              f"({avg('vllm', key):.1f} / {avg('hf', key):.1f})")
    if args.temperature == 0:
        first = {e: {k: results[e][0][k] for k in KEYS} for e in results}
        same = first["hf"] == first["vllm"]
        print(f"greedy: first step {'EQUAL' if same else 'DIFFERENT'}: hf {first['hf']} vllm {first['vllm']}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
