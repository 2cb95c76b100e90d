# The two set-up commands of the README: `make run` (the main job) and `make test` (the suite).
# Each creates the virtual environment on first use, so a fresh machine needs only Python and pip.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[service,dev]'
	touch $@

run: $(VENV)/.installed  ## the main job: meta-train the normalized-MLP optimizer on digits (4 min), score it against tuned Adam
	$(BIN)/l2o train

# Two pytest processes, a test file each at a time: JAX compiles on one core, so the second one
# would otherwise sit idle (about 10 min instead of 12.5 on 2 cores).
test: $(VENV)/.installed  ## the test suite (CPU only)
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed  ## every benchmark; JSON lands in benchmarks/results/
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs benchmarks/results
