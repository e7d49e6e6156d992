"""Rank-0 metric sinks: RUN_DIR/metrics.jsonl, TensorBoard events, and MLflow / W&B when configured.

Ray Train keeps only metrics reported with a checkpoint, so this file is the full record. Values are
plain numbers; nothing from the environment (tokens, keys) is ever written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from raysft.pipeline import jsonl
from raysft.pipeline.run_folder import METRICS_FILE, TENSORBOARD_DIR
from raysft.pipeline.tracking import StepSinks

log = logging.getLogger("raysft.train")


class MetricsLog:
    """Writes one JSON line per report; optional TensorBoard / MLflow / W&B sinks."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        logging_cfg,
        config_dict: dict[str, Any] | None = None,
        run_name: str = "raysft",
        resume_step: int = 0,
    ):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rewind(resume_step)
        self.tb = None
        if logging_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR))
            except ImportError:
                log.warning("tensorboard is not installed: no event files are written")
        if logging_cfg.mlflow or logging_cfg.wandb:
            # Into the runs the driver created (RUN_DIR/tracking.json); rank 0 only.
            self.sinks = StepSinks(run_dir, config_dict)
        else:
            self.sinks = None

    def _rewind(self, step: int) -> None:
        """Drop lines past `step` (a restart from a checkpoint repeats them)."""
        jsonl.rewind(self.path, step)

    def log(self, metrics: dict[str, Any]) -> None:
        jsonl.append(self.path, metrics)
        step = int(metrics["step"])
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(("eval/" if k.startswith("eval_") else "train/") + k, v, step)
            self.tb.flush()
        if self.sinks is not None:
            self.sinks.log(metrics, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.sinks is not None:
            self.sinks.close()
