# The two commands of the README: `make quickstart` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
# CPU machines: the pinned CPU build. On a GPU machine use e.g. `make setup TORCH=torch`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup quickstart test lint

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(BIN)/tnlora train examples/quickstart.yaml --overwrite_output_dir true

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest
