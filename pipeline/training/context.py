"""What the per-worker training loop needs from whoever runs it: a small `typing.Protocol`.

Two implementations: Ray Train (`ray_context.RayTrainContext`, the product's path) and plain
torch.distributed / torchrun (`torchrun_entry.TorchrunContext`, the same loop without Ray, which is
how a GPU machine without Ray runs the exact loop code).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from raysft.pipeline.training.preemption import Notice


class WorkerContext(Protocol):
    """Rank, world size and device of this worker; where metrics and checkpoints go; where to resume from."""

    rank: int
    world_size: int
    device: torch.device

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: Path | None = None,
        step: int = 0,
        validation: bool = False,
        durable: bool = False,
    ) -> None:
        """Called by every rank the same number of times; with `checkpoint_dir`, this rank's part of the
        checkpoint of `step`: the context takes the folder over (persists it, maybe in the background, and
        deletes it; with `durable`, before returning); with `validation`, the generation eval
        (training/generate_eval.py) runs on that checkpoint, off the workers."""
        ...

    def report_would_wait(self) -> bool:
        """Non-blocking: True when a report now would wait for the runtime to take this rank's last one (Ray
        Train's controller takes one per poll, `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`). The loop then skips a
        metrics-only report on every rank (the step's all-reduce carries this answer), so a step is never
        slower than the poll; checkpoint, eval and last-step reports are never skipped, and rank 0's
        metrics.jsonl has every step."""
        ...

    def progress(self) -> None:
        """A skipped metrics report: publish rank 0's progress files if they are due, report nothing."""
        ...

    def drain_notice(self) -> Notice | None:
        """Non-blocking: the drain of this worker group's nodes the runtime announced, or None."""
        ...

    def latest_checkpoint(self) -> AbstractContextManager[Path | None]:
        """The folder of the latest complete checkpoint (every rank's part), or None on a fresh start."""
        ...
