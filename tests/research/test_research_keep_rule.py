"""The noise-margin keep rule, as pure functions."""

import pytest

from memact.research.results import baseline_best, noise_margin, should_keep


def test_margin_is_the_range_of_the_baseline_runs():
    assert noise_margin([2.50, 2.53, 2.51]) == pytest.approx(0.03)
    assert baseline_best([2.50, 2.53, 2.51]) == pytest.approx(2.5133333)


def test_margin_needs_two_runs():
    with pytest.raises(ValueError, match="at least 2 baseline runs"):
        noise_margin([2.5])


def test_noise_level_win_is_discarded():
    best, margin = 2.5133, 0.03
    assert not should_keep(2.50, best, margin)  # better, but within what noise alone did
    assert not should_keep(best - margin, best, margin)  # exactly at the margin: not enough
    assert not should_keep(best, best, margin)  # a tie


def test_real_win_is_kept():
    assert should_keep(2.40, 2.5133, 0.03)


def test_crash_is_never_kept():
    assert not should_keep(None, 2.5, 0.0)


def test_zero_margin_keeps_strict_improvements_only():
    assert should_keep(2.4999, 2.5, 0.0)
    assert not should_keep(2.5, 2.5, 0.0)
