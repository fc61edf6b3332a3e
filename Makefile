# The two commands that matter: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export WANDB_MODE := offline
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test lint clean
.DEFAULT_GOAL := test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python setup.py
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/memact demo --out runs/demo --fresh

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# ruff, then the import layers of pyproject.toml ([tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check memact kernels tests scripts benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info

# The vLLM CPU lane (its own environment): make test-vllm
include mk/vllm.mk
