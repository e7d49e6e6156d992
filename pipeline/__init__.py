"""raysft.pipeline: the public Python API (mirrors the command line).

    from raysft.pipeline import load_config, prepare, train, tune
    cfg = load_config("examples/demo.yaml", overrides=["train.lr=1e-4"])
    stats = prepare(cfg, output="prepared/")
    result = train(cfg)
    sweep = tune(cfg)

Importing this package runs only the standard library: every API name, `Config` and `load_config` included,
loads on first use. That matters beyond the driver: `import_guard.install` is the `worker_process_setup_hook` of
every Ray worker raysft starts (data-plan actors, Ray Train's own actors), and importing it runs this file first;
pydantic and pyarrow (config.py, storage.py) there cost 0.2-0.4 s of CPU per process
(tests/test_import_guard.py checks that the hook imports neither). It does install `import_guard`: the bare
names `kernels` and `pipeline` then find the installed PyPI packages even where a raysft checkout is on sys.path.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from raysft.pipeline import import_guard
from raysft.pipeline.errors import ConfigError, DataError, ModelError, RaysftError

if TYPE_CHECKING:
    from raysft.pipeline.config import Config, load_config

import_guard.install()  # before anything raysft runs imports transformers (which imports PyPI's `kernels`)

__all__ = ["Config", "load_config", "prepare", "train", "tune", "RaysftError", "ConfigError", "DataError", "ModelError"]

_LAZY = {
    "Config": ("raysft.pipeline.config", "Config"),
    "load_config": ("raysft.pipeline.config", "load_config"),
    "prepare": ("raysft.pipeline.data.plan", "prepare"),
    "train": ("raysft.pipeline.trainer", "train"),
    "tune": ("raysft.pipeline.sweep.run", "tune"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'raysft.pipeline' has no attribute {name!r}")
