"""raysft.pipeline.train: the training side (step.py without Ray, loop.py for Ray Train workers).

This subpackage shares its name with the public API function `raysft.pipeline.train(cfg)`. Once the
subpackage is imported, Python binds `raysft.pipeline.train` to it, so the module itself is made
callable and forwards to `raysft.pipeline.trainer.train`: `from raysft.pipeline import train;
train(cfg)` works whichever of the two the name holds.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _TrainModule(types.ModuleType):
    def __call__(self, cfg: Any) -> Any:
        from raysft.pipeline.trainer import train

        return train(cfg)


sys.modules[__name__].__class__ = _TrainModule
