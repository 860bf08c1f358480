# The two commands a new user runs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all faults install install-dev clean k8s-commands

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

# Test files run side by side on TEST_JOBS processes (pytest-xdist; a file's tests stay on one process, so
# its module fixtures, e.g. the Prefect server, are built once). Most tests wait on subprocesses, so 2 jobs
# nearly halve the time on 2 cores. At most 4 by default: each process holds its own torch and test models.
# TEST_JOBS=0 runs serially.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

# `make test` stays within 15 minutes on 2 cores; tests marked slow (minutes each, covered in part by
# faster ones) run with `make test-slow`, everything with `make test-all`.
test: install-dev
	$(PYTEST) -m "not slow and not faults_full" --durations=25

# The reliability suites in full: kill -9 at every fault point of every stage, every corruption, every bad input.
faults: install-dev
	$(PYTEST) tests/faults tests/bad_input

test-slow: install-dev
	$(PYTEST) -m slow

test-all: install-dev
	$(PYTEST)

# Prints (runs nothing) the commands that set up the Kubernetes work pool: image, store Secret, pool, deployments,
# worker. `make k8s-commands DMD_IMAGE=registry/dmd-pipeline:TAG DMD_STORE=s3://BUCKET/PREFIX` fills them in.
k8s-commands:
	@DMD_IMAGE="$(DMD_IMAGE)" DMD_STORE="$(DMD_STORE)" $(PYTHON) deploy/k8s/commands.py

clean:
	rm -rf $(VENV) runs .pytest_cache
