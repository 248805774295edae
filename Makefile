# Set-up and checks. `make install` then `make test` is all a fresh machine needs.
#
# TORCH is the torch requirement installed before the package. The default takes the normal
# torch build for this platform (CUDA on Linux x86_64). On a CPU-only machine pin a CPU wheel,
# e.g. `make install TORCH=torch==2.13.0` where that wheel is available locally (CI does this).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format quickstart clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

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
