# Two commands do everything on a fresh machine: `make run` (the main job) and `make test` (the suite).
# Both create .venv and install the project into it on first use (torch==2.13.0 first: see README), at the
# exact versions of constraints.txt. `make lint` is what CI runs before the tests; `make lock` refreshes the
# constraints (see below).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.metaopt-installed
TORCH := torch==2.13.0
CONSTRAINTS := constraints.txt

.PHONY: run test lint install lock clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[all,test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/metaopt run experiments/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20 tests

# Lint and types (settings in pyproject.toml): the whole tree through ruff, the core modules through mypy.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Refresh constraints.txt: install the project into a fresh venv at the newest versions pyproject.toml allows,
# then freeze it (the project itself and pip left out; torch without its +cpu label, so the CUDA wheel fits too).
# Review `git diff constraints.txt`, run `make test`, commit both. Upgrading past a bound is a pyproject.toml edit.
LOCK_VENV ?= $(or $(TMPDIR),/tmp)/metaopt-lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[all,test]"
	{ sed -n '/^#/p' $(CONSTRAINTS); \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
	    | grep -v '^pip==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) ray_results mlflow.db mlruns mlartifacts
