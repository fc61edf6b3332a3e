"""Several copy warm-up recipes side by side, each in its own process, under one time limit.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/warmup_sweep.py --out /tmp/sweep --minutes 4 \\
        "cyc=/tmp/s3/J1|(mqar_all:200:4:4:128:all,idlist:100:1:4:128:targets)*40" \\
        "chain=new:tiny|mqar:3000:4:16:128:all,mqar_all:1000:4:16:128:all"

A variant is ``NAME=INIT|STAGES``: INIT is a model directory or ``new:PRESET`` (a fresh
``memact new-model``, id direction included); STAGES is ``memact pretrain --stages`` text,
where ``(...)*N`` repeats a group. Every variant trains on the same device (a GPU when torch
sees one: the tiny models there are bound by kernel launches, so several processes share
it well) and is evaluated on the same fixed batches: mqar and mqar_all recall, idlist copy
of one and of three ids. The model is saved (replacing the last save) at the end of every
stage that is not an ``idlist`` stage, and at the end of the run, so a variant stopped by
the time limit leaves its last recall-trained model: ``OUT/NAME/model``. ``OUT/NAME/curve.jsonl``
holds every evaluation and ``OUT/summary.json`` the last saved evaluation of each variant.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXTRA_EVALS = (("idlist1", "idlist", 1), ("idlist3", "idlist", 3), ("mqar_all", "mqar_all", 4), ("mqar", "mqar", 4))


def expand(stages: str) -> str:
    """``a,(b,c)*2,d`` -> ``a,b,c,b,c,d``."""
    while True:
        m = re.search(r"\(([^()]*)\)\*(\d+)", stages)
        if not m:
            return stages
        stages = stages[:m.start()] + ",".join([m.group(1)] * int(m.group(2))) + stages[m.end():]


def parse_variant(text: str) -> tuple[str, str, str]:
    name, sep, rest = text.partition("=")
    init, sep2, stages = rest.partition("|")
    if not (sep and sep2 and name and init and stages) or not re.fullmatch(r"[\w.-]+", name):
        raise SystemExit(f"variant {text!r}: write NAME=INIT|STAGES (NAME in letters, digits, '.', '_', '-')")
    return name, init, expand(stages)


class _TimeUp(Exception):
    pass


def run_one(name: str, init: str, stages_text: str, out: Path, seconds: float, seed: int) -> None:
    import torch

    from memact.models.model import load_policy, new_model, resolve_device
    from memact.warmup.copy import CopyWarmup, make_batch, parse_stages

    t0 = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    stages = parse_stages(stages_text)
    vdir = out / name
    vdir.mkdir(parents=True, exist_ok=True)
    if init.startswith("new:"):
        init = str(new_model(vdir / "init", preset=init[4:], seed=seed))
    device = resolve_device(os.environ.get("MEMACT_DEVICE", "auto"))
    model, tok = load_policy(init, device=device)
    warm = CopyWarmup(model, tok, stages, eval_every=250, seed=seed + 1, log=lambda s: print(f"[{name}] {s}", flush=True))
    warm.eval_batches = {key: make_batch(fmt, n, random.Random(12_345), tok, 32, 128) for key, fmt, n in EXTRA_EVALS}
    saved: dict = {}

    def save(row: dict) -> None:
        tmp = vdir / "model.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(vdir / "model", ignore_errors=True)
        tmp.rename(vdir / "model")
        saved.clear()
        saved.update(row)

    def on_eval(row: dict) -> None:
        row["wall_s"] = round(time.time() - t0, 1)
        with (vdir / "curve.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        stage_done = row["step"] == sum(s.steps for s in stages[:row["stage"] + 1])
        if stage_done and (stages[row["stage"]].format != "idlist" or row["stage"] == len(stages) - 1):
            save(row)
        if time.time() - t0 > seconds:
            raise _TimeUp

    try:
        warm.run(on_eval=on_eval)
    except _TimeUp:
        print(f"[{name}] time limit: stopped at step {warm.step}", flush=True)
    result = {"name": name, "init": init, "device": str(model.device), "steps_done": warm.step,
              "steps_planned": sum(s.steps for s in stages), "train_s": round(warm.train_s, 1),
              "s_per_step": round(warm.train_s / max(warm.step, 1), 4), "saved": saved}
    (vdir / "result.json").write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="NAME=INIT|STAGES")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, required=True, help="wall-clock limit of every variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    variants = [parse_variant(v) for v in args.variants]
    if args.one:
        (name, init, stages), = variants
        run_one(name, init, stages, out, args.minutes * 60, args.seed)
        return 0
    from memact.warmup.copy import parse_stages

    for name, _, stages in variants:  # refuse a bad recipe before anything starts
        try:
            parse_stages(stages)
        except ValueError as err:
            raise SystemExit(f"variant {name}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, (name, init, stages) in enumerate(variants):
        log = (out / f"{name}.log").open("w")
        cmd = [sys.executable, __file__, "--one", "--out", str(out), "--minutes", str(args.minutes),
               "--seed", str(args.seed), f"{name}={init}|{stages}"]
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        if i + 1 < len(variants):
            time.sleep(2)  # simultaneous interpreter starts have failed to import here
    summary = []
    for name, proc in procs:
        rc = proc.wait()
        res = out / name / "result.json"
        summary.append(json.loads(res.read_text()) if res.exists() else {"name": name, "error": f"exit {rc}"})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for r in summary:
        acc = r.get("saved", {}).get("acc", {})
        print(f"{r['name']:>14}: {r.get('error') or ''}steps {r.get('steps_done')}/{r.get('steps_planned')} "
              f"{r.get('s_per_step')} s/step on {r.get('device')} | saved at step {r.get('saved', {}).get('step')}: "
              + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
