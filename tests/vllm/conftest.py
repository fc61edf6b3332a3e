"""The vLLM lane (`make test-vllm`, from .venv-vllm); its engine tests skip where vLLM is not installed."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as vLLM's CPU backend uses: on a shared 2-core machine two can be 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
