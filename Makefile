# The two commands the README promises. Both install what they need from pyproject.toml first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install local test test-fast lint bench lock lock-upgrade

# Installs exactly requirements/dev.lock (every file checked against its hashes, nothing resolved afresh), then
# the project itself in editable mode with the locked setuptools. `make lock` refreshes the locks.
$(BIN)/comms: pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/dev.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
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

## Re-lock after editing pyproject.toml's dependencies (keeps every other pin); lock-upgrade moves every pin.
## The dev lock is constrained by the runtime lock, so the tests run on exactly the versions the image ships.
PIP_TOOLS := .tools/pip-tools/bin/pip-compile
LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links

$(PIP_TOOLS):
	$(PYTHON) -m venv .tools/pip-tools
	.tools/pip-tools/bin/pip install -q pip-tools==7.6.2

lock: $(PIP_TOOLS)
	$(PIP_TOOLS) $(LOCK_FLAGS) $(LOCK_ARGS) --build-deps-for=wheel -o requirements/runtime.lock pyproject.toml
	$(PIP_TOOLS) $(LOCK_FLAGS) $(LOCK_ARGS) --build-deps-for=editable --extra dev --extra local \
		--constraint requirements/runtime.lock -o requirements/dev.lock pyproject.toml

lock-upgrade:
	$(MAKE) lock LOCK_ARGS=--upgrade
