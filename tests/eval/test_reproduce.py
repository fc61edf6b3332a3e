"""benchmarks/reproduce.py: the stage plan, the ledger that makes it resumable, --reuse, the targets."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("preset", ["full", "smoke"])
@pytest.mark.parametrize("large", [True, False])
def test_plan_is_closed_and_chains_memory_after_nomem(repro, preset, large):
    plan = repro.build_plan(repro.PRESETS[preset], seed=0, large=large)
    for stage, (deps, _) in plan.items():
        assert set(deps) <= set(plan), f"{stage} builds on a stage the plan does not make"
    for stage, _, _ in repro.systems(large):
        assert stage in plan or stage in repro.SCRIPTED

    def ancestors(stage):
        deps = plan[stage][0]
        return set(deps).union(*(ancestors(d) for d in deps)) if deps else set()

    mem = ancestors(repro.MEM_SFT)
    assert {"sft_nomem_k2", "sft_mem_k2_c", "sft_mem_k6", "data_mem_cur", "data_mem_all", "warm_small"} <= mem
    assert repro.NOMEM_SFT not in mem  # the memory chain branches off the no-memory K=2 policy
    assert ("warm_large" in plan) is large and (repro.LARGE_SFT in plan) is large
    if large:
        assert "warm_large" in ancestors(repro.LARGE_SFT) and "warm_small" not in ancestors(repro.LARGE_SFT)


def test_full_preset_curricula(repro):
    data = repro.PRESETS["full"].data
    assert max(data["nomem_cur"][1]) <= 3  # without memory, K >= 4 overflows the context budget
    assert min(data["mem_cur"][1]) == 1 and max(data["mem_cur"][1]) >= 4
    # MemAct-SFT's last phase sees every evaluated K, in equal parts.
    assert set(repro.EVAL_K) <= set(data["mem_all"][1]) and len(set(data["mem_all"][1].values())) == 1


def test_ledger_records_and_forgets_missing_outputs(repro, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    made = out / "a"
    made.mkdir()
    ledger = repro.Ledger(out)
    assert ledger.done("a") is None
    assert ledger.run("a", lambda: made) == made
    again = repro.Ledger(out)  # read back from stages.json
    assert again.done("a") == made and again.stages["a"]["reused"] is False
    made.rmdir()
    assert again.done("a") is None  # a deleted output is made again


def test_reuse_parsing_errors(repro, tmp_path):
    known = {"sft_mem", "dcpo"}
    assert repro.parse_reuse([f"sft_mem={tmp_path}"], known) == {"sft_mem": tmp_path.resolve()}
    for bad, msg in ((["sft_mem"], "STAGE=PATH"), ([f"nope={tmp_path}"], "not a stage"),
                     ([f"dcpo={tmp_path / 'missing'}"], "no such file")):
        with pytest.raises(SystemExit, match=msg):
            repro.parse_reuse(bad, known)


def _row(policy, strategy, k, acc, tokens):
    return {"policy": policy, "strategy": strategy, "k": k, "n": 4, "accuracy": acc, "f1": acc, "all_correct": acc,
            "mean_context": 500.0, "peak_context": 900.0, "max_peak_context": 1000, "total_tokens": tokens,
            "memory_actions": 1.0, "steps": 5.0, "overflow": 0.0, "failed": 0, "seconds": 1.0}


def test_targets(repro):
    rows = [_row("MemAct-RL", "memact", k, a, 4000) for k, a in zip(repro.EVAL_K, (0.9, 0.85, 0.8, 0.75))]
    rows += [_row("MemAct-SFT", "memact", k, a, 4000) for k, a in zip(repro.EVAL_K, (0.9, 0.7, 0.6, 0.5))]
    rows += [_row("NoMemory-SFT", "full", k, a, 9000) for k, a in zip(repro.EVAL_K, (1.0, 0.1, 0.0, 0.0))]
    met = [ok for _, ok, _ in repro.check_targets(rows)]
    assert met == [True, True, True]
    rows[3] = _row("MemAct-RL", "memact", 8, 0.5, 4000)  # K=8 below 80% of K=2
    assert [ok for _, ok, _ in repro.check_targets(rows)][2] is False
    assert [ok for _, ok, _ in repro.check_targets(rows[4:])] == [False, False, False]  # no RL rows


def test_main_refuses_a_used_out_and_reports_from_reused_stages(repro, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("earlier run")
    with pytest.raises(SystemExit, match="--resume"):
        repro.main(["--out", str(out), "--preset", "smoke"])
    with pytest.raises(SystemExit):
        repro.main(["--out", str(out), "--preset", "smoke", "--resume", "--fresh"])

    # Every stage the evaluation needs is reused: main trains nothing and writes the report.
    reuse = []
    for stage in ("dcpo", repro.MEM_SFT, repro.NOMEM_SFT):
        (tmp_path / stage).mkdir()
        reuse.append(f"{stage}={tmp_path / stage}")
    for _, strategy, name in repro.systems(large=False):
        d = tmp_path / "eval" / f"{name}_{strategy}"
        d.mkdir(parents=True)
        d.joinpath("summary.json").write_text(json.dumps([_row(name, strategy, k, 0.5, 1000) for k in repro.EVAL_K]))
        reuse.append(f"{repro.eval_stage(name, strategy)}={d}")
    argv = ["--out", str(out), "--preset", "smoke", "--resume", "--skip-large"]
    assert repro.main(argv + [x for r in reuse for x in ("--reuse", r)]) == 0
    report = (out / "REPORT.md").read_text()
    assert "| dcpo | reused |" in report and "--skip-large" in report
    assert len(json.loads((out / "summary.json").read_text())) == 7 * len(repro.EVAL_K)
    # Equal accuracy everywhere: RL is no better than SFT or no memory, and K=8 holds K=2's accuracy.
    assert [t["met"] for t in json.loads((out / "targets.json").read_text())] == [False, False, True]
    assert repro.main(argv) == 0  # the ledger remembers the reused stages


def test_dcpo_stage_resumes_from_its_last_checkpoint(repro, tmp_path):
    run = tmp_path / "dcpo"
    assert repro._dcpo_resume(run) == ("run.save_every=10",)
    for step in (10, 20):
        (run / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    assert repro._dcpo_resume(run)[-1] == f"run.resume={run / 'checkpoints' / 'step_000020'}"
