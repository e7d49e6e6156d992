"""raysft.pipeline: the public Python API (mirrors the command line).

    from raysft.pipeline import load_config, prepare, train, tune
    cfg = load_config("examples/demo.yaml", overrides=["train.lr=1e-4"])
    stats = prepare(cfg, output="prepared/")
    result = train(cfg)
    sweep = tune(cfg)

Heavy modules (ray, torch, transformers) load on first use, so importing this package is cheap
and changes nothing in other libraries. It does install `import_guard`: the bare names `kernels` and
`pipeline` then find the installed PyPI packages even where a raysft checkout is on sys.path.
"""

from __future__ import annotations

import importlib
from typing import Any

from raysft.pipeline import import_guard
from raysft.pipeline.config import Config, load_config
from raysft.pipeline.errors import ConfigError, DataError, ModelError, RaysftError

import_guard.install()  # before anything raysft runs imports transformers (which imports PyPI's `kernels`)

__all__ = ["Config", "load_config", "prepare", "train", "tune", "RaysftError", "ConfigError", "DataError", "ModelError"]

_LAZY = {
    "prepare": ("raysft.pipeline.data.plan", "prepare"),
    "train": ("raysft.pipeline.trainer", "train"),
    "tune": ("raysft.pipeline.sweep.run", "tune"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'raysft.pipeline' has no attribute {name!r}")
