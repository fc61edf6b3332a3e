"""The one seed helper and the one thread setting."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from memact.util.seeds import STREAMS, derive_seed
from memact.util.threads import THREADS_ENV, resolve_threads, set_threads


def test_streams_keep_the_formulas_runs_were_made_with():
    assert derive_seed(7, "task", 3) == 7 * 100_003 + 3
    assert derive_seed(7, "dcpo_step", 2, 1) == (7 * 1_000_003 + 2) * 1_009 + 1
    assert derive_seed(7, "dcpo_prompts", 5) == 7 * 10_007 + 5
    assert derive_seed(7, "sft_shuffle") == 7


@given(seed=st.integers(0, 2**31), a=st.integers(0, 10_000), b=st.integers(0, 10_000))
def test_different_parts_give_different_seeds(seed, a, b):
    for name, mults in STREAMS.items():
        if mults[0] > 10_000:
            assert (derive_seed(seed, name, a) == derive_seed(seed, name, b)) == (a == b)


def test_bad_stream_or_too_many_parts_name_the_input():
    with pytest.raises(ValueError, match="'nope'.*expected one of task"):
        derive_seed(0, "nope", 1)
    with pytest.raises(ValueError, match="'task' takes at most 1 parts, got 2"):
        derive_seed(0, "task", 1, 2)


def test_threads_requested_then_environment_then_small_machine_default(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")
    assert resolve_threads(2) == 2
    assert resolve_threads(0) == 3
    monkeypatch.delenv(THREADS_ENV)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert resolve_threads() == 1
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert resolve_threads() is None
    for bad in ("x", "0"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ValueError, match=f"MEMACT_THREADS={bad!r}: expected a whole number >= 1"):
            resolve_threads()
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
