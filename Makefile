# One entry point for a fresh machine: `make repro` sets up and runs the pipeline, `make test` runs the tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup repro test lint cuda-check lock docker-check

# Everything from the lock (requirements.lock, made from pyproject.toml by `make lock`): two users a month apart
# run the same packages; torch 2.14.1 / torchvision 0.29.1 come from the pins, never swapped.
$(BIN)/semanticmim: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements.lock pip
	$(BIN)/pip install --quiet -c requirements.lock -e ".[dev]"
	touch $@

setup: $(BIN)/semanticmim

# dvc runs each stage's `semanticmim ...` command through the shell: put the venv first on PATH.
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	$(BIN)/ruff check .
	$(BIN)/hadolint --config .hadolint.yaml docker/Dockerfile
	$(BIN)/pytest -q --durations=15

lint: setup
	$(BIN)/ruff check .

# on a GPU host: tests marked cuda + ViT-B/16 benchmark on the GPU, results in cuda-check/
cuda-check: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/cuda-check.sh

# after a dependency change in pyproject.toml: re-resolve in a fresh venv under /tmp and rewrite the lock
lock:
	bash scripts/lock.sh

# on a machine with a Docker engine: the cpu image, the smoke `dvc repro` and the image tests inside it
# (downloads torch into the image; not part of CI)
docker-check:
	bash scripts/docker-check.sh
