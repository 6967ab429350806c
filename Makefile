# Two commands do all the set-up on a fresh machine:
#   make train   creates .venv if missing, installs mtl, runs the default experiment
#   make test    creates .venv if missing, installs mtl with its dev extra, runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: train test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# torch 2.13.0 first (CPU build where available) unless a torch is already installed, so the
# project's `torch>=2.3` never pulls a multi-GB build by accident
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/mtl-train $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
