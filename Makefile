# Two entry points: `make demo` (main job) and `make test` (test suite). Both create .venv from
# setup.cfg on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
export JAX_PLATFORMS ?= cpu
# Test processes (pytest-xdist, one file per process: compiling is single-threaded, so two
# processes halve the suite's time on 2 cores). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev,eval]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.main $(ARGS)

test: $(STAMP)
	$(PYTEST) $(ARGS)

test-all: $(STAMP)
	$(PYTEST) --run-slow $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m experiments.model_table --xla
	$(BIN)/python -m experiments.bench_compile

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
