# The two commands the README promises. Both install what they need from pyproject.toml first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install local test test-fast lint bench

$(BIN)/comms: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/comms

install: $(BIN)/comms

## Run the whole service on the embedded local stack (moto, sandboxes, demo tenant) and print a curl.
local: install
	$(BIN)/comms local

lint: install
	$(BIN)/ruff check service consumers local_stack tests bench
	$(BIN)/ruff format --check service consumers local_stack tests bench
	$(BIN)/mypy

## Lint, type-check and run every test (what CI runs).
test: lint
	$(BIN)/python -m pytest -q

## Fast tests: pure rules and use cases on in-memory fakes (no moto, no subprocesses)
test-fast: install
	$(BIN)/python -m pytest -q -p no:schemathesis --confcutdir=tests/unit tests/unit

## Benchmark one worker process on the embedded stack (SPEC §8 figures); options: make bench ARGS="--concurrency 50"
bench: install
	$(BIN)/python -m bench $(ARGS)
