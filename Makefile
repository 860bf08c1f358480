# The two commands a new user runs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all faults install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installed markers: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/dmd demo

# `make test` stays within 15 minutes on 2 cores; tests marked slow (minutes each, covered in part by
# faster ones) run with `make test-slow`, everything with `make test-all`.
test: install-dev
	$(BIN)/python -m pytest -q -m "not slow and not faults_full" --durations=25

# The reliability suites in full: kill -9 at every fault point of every stage, every corruption, every bad input.
faults: install-dev
	$(BIN)/python -m pytest -q tests/faults tests/bad_input

test-slow: install-dev
	$(BIN)/python -m pytest -q -m slow

test-all: install-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
