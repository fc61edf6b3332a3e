"""benchmarks/token_cost.py: what solving a task costs in tokens with and without memory."""

import pytest


def test_cost_model_limits(token_cost):
    # Long results: the ratio tends to 2/(K+1); no results: (2K+1)/(K+1).
    assert token_cost.model_ratio(4, 1.0, 1e9) == pytest.approx(0.4, abs=1e-6)
    assert token_cost.model_ratio(8, 1.0, 0.0) == pytest.approx(17 / 9)
    # The thresholds stated in the docstring: half at L = 6.5 P (K=4) and 1.25 P (K=8).
    assert token_cost.model_ratio(4, 1.0, 6.5) == pytest.approx(0.5)
    assert token_cost.model_ratio(8, 1.0, 1.25) == pytest.approx(0.5)


def test_longer_documents_make_memory_cheaper(token_cost, capsys):
    rows = token_cost.main(["--n", "3", "--objectives", "8", "--distractors", "3,12"])
    short, long = rows
    assert long["L"] > 2 * short["L"] and long["P"] == short["P"]
    assert short["ratio"] > 1.0 > long["ratio"]  # memory costs more with short results, less with long ones
    assert "| 12 | 8 |" in capsys.readouterr().out


def test_an_episode_left_unsolved_is_an_error(token_cost):
    with pytest.raises(RuntimeError, match="raise --context-budget"):
        token_cost.measure(8, 3, 2, 0, budget=600)


def test_distractors_out_of_range(token_cost):
    with pytest.raises(SystemExit):
        token_cost.main(["--distractors", "13"])
