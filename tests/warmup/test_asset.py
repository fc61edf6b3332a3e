"""The shipped warm-up (memact/assets/tiny_warm): loads, and measures as ASSET.md records."""

import json

import pytest

from memact.assets import tiny_warm


def test_shipped_warm_model_measures_as_recorded():
    from memact.models.model import count_parameters, load_policy
    from memact.warmup.copy import CopyWarmup, parse_stages

    path = tiny_warm()
    curve = [json.loads(line) for line in (path / "recall_curve.jsonl").read_text().splitlines()]
    before, after = curve[-2], curve[-1]
    assert after["after_redraw"] and not before.get("after_redraw")
    assert before["acc"]["mqar/recall"] > 0.2 and before["acc"]["mqar_all/recall"] > 0.2  # chance: about 0.01
    cfg = json.loads((path / "pretrain_config.json").read_text())
    stages = parse_stages(",".join(f"{s['format']}:{s['steps']}:{s['n']}:{s['batch']}:{s['seq_len']}:{s['loss']}"
                                   for s in cfg["stages"]))
    model, tok = load_policy(path)
    assert count_parameters(model) == 1_037_184
    measured = CopyWarmup(model, tok, stages, seed=cfg["seed"], log=lambda line: None).evaluate(1, [])
    for key in after["acc"]:
        assert measured["acc"][key] == pytest.approx(after["acc"][key], abs=1e-3)
        assert measured["nll"][key] == pytest.approx(after["nll"][key], abs=1e-2)
