"""The Ray Train implementation of `WorkerContext` (training/context.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class RayTrainContext:
    """Rank and device from `ray.train`; `ray.train.report` (a barrier) carries metrics and checkpoints."""

    def __init__(self, resume_from: str | None = None) -> None:
        import ray.train
        import ray.train.torch

        self.resume_from = resume_from  # the driver's verified checkpoint, used when Ray registered none newer
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, step: int = 0, validation: bool = False
    ) -> None:
        import ray.train
        from ray.train import Checkpoint

        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(str(checkpoint_dir)),
                checkpoint_dir_name=f"checkpoint_{step:06d}",
                validation=validation,
            )

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        from raysft.pipeline.training.checkpoint import resume_checkpoint

        resume = resume_checkpoint(ray.train.get_checkpoint(), self.resume_from, self.rank)
        if resume is None:
            yield None
            return
        with resume.as_directory() as d:
            yield Path(d)
