# Two commands do all the set-up on a fresh machine:
#   make train   creates .venv if missing, installs mtl, runs the default experiment
#   make test    creates .venv if missing, installs mtl with its test extras, runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: train test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# torch 2.13.0 first (CPU build where available) unless a torch is already installed, so the
# project's `torch>=2.3` never pulls a multi-GB build by accident
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e .
	touch $@

# the test extras: pytest, transformers (backbone=hf tests), and timm without its torchvision
# dependency, which would replace this torch (the timm tests stub torchvision; real users install
# mtl[timm] beside a torchvision that matches their torch)
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -e ".[dev,hf]"
	$(BIN)/python -m pip install --no-deps "timm>=1.0"
	$(BIN)/python -m pip install pillow "huggingface_hub>=0.23" "safetensors>=0.4" pyyaml
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# one intra-op thread unless OMP_NUM_THREADS says otherwise: the default job's small CNN runs
# fastest that way, and on a shared machine two threads made an epoch take twice as long
train: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/mtl-train $(ARGS)

test: install-dev
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
