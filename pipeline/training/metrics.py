"""Rank-0 metric sinks: RUN_DIR/metrics.jsonl, TensorBoard events, and MLflow / W&B when configured.

Ray Train keeps only metrics reported with a checkpoint, so this file is the full record. Values are
plain numbers; nothing from the environment (tokens, keys) is ever written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from raysft.pipeline import jsonl

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger("raysft.train")


class MetricsLog:
    """Writes one JSON line per report; optional TensorBoard / MLflow / W&B sinks."""

    def __init__(self, run_dir: str | os.PathLike, logging_cfg, config_dict: dict[str, Any] | None = None,
                 run_name: str = "raysft", resume_step: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rewind(resume_step)
        self.tb = None
        self.mlflow = None
        self.wandb = None
        if logging_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: no event files are written")
        if logging_cfg.mlflow:
            try:
                import mlflow

                mlflow.set_experiment(logging_cfg.project or "raysft")
                mlflow.start_run(run_name=run_name)
                mlflow.log_params(_flat(config_dict or {}))
                self.mlflow = mlflow
            except ImportError:
                log.warning("train.logging.mlflow is on but mlflow is not installed")
        if logging_cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=logging_cfg.project or "raysft", name=run_name, config=config_dict,
                                        resume="allow")
            except ImportError:
                log.warning("train.logging.wandb is on but wandb is not installed")

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
        if self.mlflow is not None:
            self.mlflow.log_metrics(numbers, step=step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return jsonl.read(Path(run_dir) / METRICS_FILE)
