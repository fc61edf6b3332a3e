"""Two ranks: `memact sft` under torchrun (gloo on the CPU) equals one rank on the same data.

Data parallel SFT splits each optimizer step's segments between the ranks; the loss is
normalised over the whole step on every rank, so 2 ranks must give the 1-rank losses,
gradient norms and weights up to float rounding. The second step holds a single segment, so
rank 1 has nothing to train there and must still take part in the gradient reduction.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import memact

ROOT = Path(memact.__file__).resolve().parents[1]


def _args(data, out, model, *extra):
    # 8 segments, 7 a step: step 0 splits 4 / 3 between the ranks, step 1 is 1 / 0.
    return ["sft", "--data", str(data), "--out", str(out), f"model.path={model}", "logging.progress=false",
            "run.threads=1", "optim.lr=1e-2", "optim.warmup_steps=0", "sft.epochs=1", "sft.segments_per_step=7",
            "sft.shuffle=false", "batch.max_seq_len=1024", "batch.max_tokens_per_micro_batch=1024", *extra]


def _torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MEMACT_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # set by an earlier in-process run; torchrun sets its own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "memact.dcpo.cli_train", *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def zero3_every_param_sharded(tmp_path) -> str:
    """``deepspeed.config=`` for ZeRO-3 that partitions every parameter of the micro model
    (ds_zero3.json keeps parameters under 1e5 elements whole, i.e. all of them here), so
    every module call all-gathers and every rank must make the same calls."""
    from memact.dcpo.config import configs_dir

    ds = json.loads((configs_dir() / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path.parent / f"{tmp_path.name}_ds_zero3_shard_all.json"
    path.write_text(json.dumps(ds))
    return f"deepspeed.config={path}"


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 3])
def test_two_ranks_equal_one(micro_model_dir, scripted_jsonl, tmp_path, zero):
    from memact.dcpo.cli_train import main

    ds = f"deepspeed.zero_stage={zero}" if zero != 3 else zero3_every_param_sharded(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(scripted_jsonl, one, micro_model_dir, ds)) == 0
    t0 = time.perf_counter()
    proc = _torchrun(_args(scripted_jsonl, two, micro_model_dir, ds), tmp_path)
    print(f"2-rank torchrun ZeRO {zero}: {time.perf_counter() - t0:.1f} s")
    assert proc.stderr.count("SFT done") == 1  # reported once, by rank 0
    assert f"ZeRO stage {zero}" in proc.stdout

    # Written once, by rank 0: the model, one metrics row per optimizer step, no staging left over.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert {"config.json", "model.safetensors", "metrics.jsonl", "config.yaml", "tokenizer.json"} <= {
        p.name for p in two.iterdir()}
    r1, r2 = _rows(one), _rows(two)
    assert [r["step"] for r in r2] == [0, 1]
    for a, b in zip(r1, r2, strict=True):
        assert b["tokens"] == a["tokens"]  # trained tokens over both ranks
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert set(w1) == set(w2)
    base = load_file(str(micro_model_dir / "model.safetensors"))
    for k in w1:
        assert not torch.equal(w1[k], base[k]) or "norm" in k, k  # trained
        assert torch.allclose(w2[k], w1[k], rtol=0, atol=1e-5), (k, (w2[k] - w1[k]).abs().max())


@pytest.mark.slow
def test_two_rank_dcpo_zero3_reduces_metrics(micro_model_dir, tmp_path):
    """DCPO on 2 ranks, ZeRO-3 with every parameter sharded (policy and KL reference loaded
    partitioned): runs, and each metrics row covers both ranks' prompts."""
    run = tmp_path / "run"
    _torchrun(["train", "--out", str(run), f"model.path={micro_model_dir}", zero3_every_param_sharded(tmp_path),
               "logging.progress=false", "logging.table_every=0", "run.steps=2", "run.threads=1",
               "rollout.prompts_per_step=2", "rollout.n_traj=2", "rollout.max_steps=2", "rollout.max_new_tokens=8",
               "batch.max_seq_len=1280", "dcpo.segment_sampling=round_robin", "dcpo.n_seg=3", "dcpo.kl_coef=0.01", "dcpo.entropy_coef=0.01",
               "optim.lr=1e-2", "optim.warmup_steps=0"], tmp_path)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["segments_trained"] == 2 * 3  # N_seg per prompt, one prompt on each rank
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0
    from memact.models.model import load_policy

    model, _ = load_policy(run / "checkpoints" / "step_000002")
    assert all(p.numel() > 0 for p in model.parameters())
