# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtualenv .venv on first use and install exactly what requirements.lock pins (only Python 3.10+
# and pip are needed); `make lock` refreshes the lock, `make test-latest` tries the newest allowed versions.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
LATEST := .venv-latest
# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-fast test-latest lint lock venv clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(LOCK) "$(TORCH)"
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/raysft demo

# ruff (config in pyproject.toml) runs before the tests: lint and formatting are not review topics. lint-imports
# checks the layers of pipeline/ARCHITECTURE.md (the [tool.importlinter] contract in pyproject.toml).
# The docs build is strict (mkdocs.yml): a broken link, a missing anchor or a page not in the nav fails it.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mkdocs build --strict --site-dir site  # not --quiet: it hides the warnings strict counts

test: lint
	$(BIN)/pytest -n 2 -m "not gpu" -rs --durations=30 tests  # two lanes: tests/conftest.py

test-fast: $(STAMP)
	$(BIN)/pytest -m "not gpu and not slow" -x -q tests

# pip's own resolver, newest versions pyproject.toml allows, nothing installed (.ci/lock.py); then run `make test`.
lock:
	$(PYTHON) .ci/lock.py $(LOCK)

# The canary (not part of CI): the newest allowed versions in a separate venv, a smoke subset and a 4-step demo.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet "$(TORCH)"
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
	$(LATEST)/bin/python .ci/versions.py $(LOCK)
	$(LATEST)/bin/pytest -m "smoke and not gpu" -q -p no:cacheprovider tests
	$(LATEST)/bin/raysft demo --output runs/demo-latest --set train.max_steps=4 --set train.eval_every=2 --set train.save_every=4
	$(LATEST)/bin/python .ci/versions.py $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache site
