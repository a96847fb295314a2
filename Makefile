# One entry point for a fresh machine: `make repro` sets up and runs the pipeline, `make test` runs the tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup repro test lint cuda-check

$(BIN)/semanticmim: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/semanticmim

# dvc runs each stage's `semanticmim ...` command through the shell: put the venv first on PATH.
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .

# on a GPU host: tests marked cuda + ViT-B/16 benchmark on the GPU, results in cuda-check/
cuda-check: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/cuda-check.sh
