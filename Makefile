# Set-up and checks. `make install` then `make test` is all a fresh machine needs.
#
# TORCH is the torch requirement installed before the package. The default takes the normal
# torch build for this platform (CUDA on Linux x86_64, which also runs on a CPU-only machine).
# To install a CPU-only build instead, e.g. `make install TORCH=torch==2.13.0` where that wheel is
# on your package index.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format quickstart clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# The development loop: everything but the tests marked slow (multi-process, subprocess CLI, long fits).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

lint: $(STAMP)
	$(BIN)/ruff check ipo_lightning tests scripts benchmarks
	$(BIN)/ruff format --check ipo_lightning tests scripts benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix ipo_lightning tests scripts benchmarks
	$(BIN)/ruff format ipo_lightning tests scripts benchmarks

quickstart: $(STAMP)
	$(BIN)/python -m ipo_lightning fit --config configs/quickstart.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
