"""The examples in pipeline/data's docstrings hold: every module of the data plan is imported and its `>>>` examples
run (doctest); a failing example fails here, and the pure data functions keep their examples (counted per module)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

from raysft.pipeline import data

MODULES = sorted(m.name for m in pkgutil.iter_modules(data.__path__))
# Examples per module at least: masks by construction, Arrow list helpers, packing, source ids, byte -> char spans.
EXAMPLES = {"masks": 26, "arrow_lists": 5, "pack": 7, "sources": 4, "fast_bpe": 2}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name, capsys):
    module = importlib.import_module(f"{data.__name__}.{name}")
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failed == 0, f"{failed} of {attempted} examples in {module.__file__} fail:\n{capsys.readouterr().out}"
    assert attempted >= EXAMPLES.get(name, 0), f"{module.__file__} lost examples: {attempted} < {EXAMPLES[name]}"


def test_every_module_with_examples_exists():
    assert set(EXAMPLES) <= set(MODULES)
