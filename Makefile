# One set of targets for humans and CI. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: serve test lint format bench bench-serving proto lock clean

$(STAMP): pyproject.toml setup.py rtbserve/codecs/_csv_fast.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rtbserve needs Python >= 3.11 (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m rtbserve.predictors.numba_impl  # fills numba's kernel cache once (~1 min)
	@touch $(STAMP)

serve: $(STAMP)
	$(BIN)/rtbserve serve $(MODEL)

test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m bench.core $(BENCH_ARGS)

bench-serving: $(STAMP)
	$(BIN)/python -m bench.serving $(BENCH_ARGS)

lock: $(STAMP)
	$(BIN)/python scripts/lock_requirements.py

proto: $(STAMP)
	$(BIN)/python -m rtbserve.transports.grpc.codegen

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
