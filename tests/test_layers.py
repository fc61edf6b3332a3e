"""The import layers of pyproject.toml ([tool.importlinter]) hold, and a back-import breaks them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e .[dev])")


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(pythonpath)})


def test_the_tree_keeps_its_layers():
    res = _lint(ROOT, ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "memact layers KEPT" in res.stdout


def test_an_import_back_up_the_layers_is_caught(tmp_path):
    shutil.copytree(ROOT / "memact", tmp_path / "memact", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", tmp_path / "memact_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "memact" / "env" / "task.py", "a") as f:
        f.write("\nfrom memact.dcpo import trainer  # noqa\n")
    res = _lint(tmp_path, tmp_path)
    assert res.returncode != 0
    assert "memact.env is not allowed to import memact.dcpo" in res.stdout
