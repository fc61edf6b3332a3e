import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/NAME.py`` as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and spawned workers look the module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def repro():
    return load_benchmark("reproduce")


@pytest.fixture(scope="session")
def behaviour():
    return load_benchmark("behaviour")


@pytest.fixture(scope="session")
def token_cost():
    return load_benchmark("token_cost")
