# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtualenv .venv on first use; only Python 3.10+ and pip are needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/raysft demo

# ruff (config in pyproject.toml) runs before the tests: lint and formatting are not review topics. lint-imports
# checks the layers of pipeline/ARCHITECTURE.md (the [tool.importlinter] contract in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest -m "not gpu" -rs --durations=30 tests

test-fast: $(STAMP)
	$(BIN)/pytest -m "not gpu and not slow" -x -q tests

clean:
	rm -rf $(VENV) .pytest_cache
