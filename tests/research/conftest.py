"""Fixtures of the research tests."""

import pytest
from research_helpers import make_workspace


@pytest.fixture
def stub_workspace(tmp_path):
    """A cpu-template workspace whose train.py is the fast stub, committed."""
    return make_workspace(tmp_path / "ws")
