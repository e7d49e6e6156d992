"""Experiment tracking: an MLflow run and a W&B run per training run, a parent MLflow run per sweep.

Who does what:
    driver   `start_tracking` creates the runs (MLflow: the resolved config as params) and writes their ids to
             RUN_DIR/tracking.json, so a restarted worker group or a resumed run logs into the same runs;
             `finish_tracking` uploads the adapter and the report PNGs and closes the runs.
    rank 0   `StepSinks` (used by training/metrics.py) logs every step's and eval's metrics.
A sweep's driver makes one parent run (`start_sweep_tracking`); each trial's run is its child.

Tracking never stops training: the first error talking to a sink logs one warning (and one
`tracking_lost` line in failures.jsonl), and that sink is off for the rest of the process. API keys
and tokens stay in the environment; tracking.json holds only ids, names and the tracking URI.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from raysft.pipeline.atomic import write_atomic
from raysft.pipeline.run_folder import FAILURES_FILE, RESULTS_CSV, TRACKING_FILE, TRIALS_DIR
from raysft.pipeline.runs import write_report

log = logging.getLogger("raysft.tracking")

# mlflow's defaults retry a dead server for minutes per call; a training step must not wait that long.
_MLFLOW_FAIL_FAST = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def tracking_uri(logging_cfg) -> str | None:
    """train.logging.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else mlflow's default (./mlruns)."""
    return logging_cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: the resolved config as MLflow params."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def read_handles(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_handles(run_dir: Path, handles: dict[str, Any]) -> None:
    write_atomic(run_dir / TRACKING_FILE, json.dumps(handles, indent=2))


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    for k, v in _MLFLOW_FAIL_FAST.items():
        os.environ.setdefault(k, v)
    return MlflowClient(tracking_uri=uri)


def _warned(run_dir: Path, sink: str) -> bool:
    path = run_dir / FAILURES_FILE
    if not path.is_file():
        return False
    return any(
        json.loads(x).get("event") == "tracking_lost" and json.loads(x).get("sink") == sink
        for x in path.read_text().splitlines()
        if x.strip()
    )


def warn_once(run_dir: Path, sink: str, exc: BaseException, step: int | None = None) -> None:
    """The single warning a run gets when a tracking sink fails; recorded in failures.jsonl."""
    if _warned(run_dir, sink):
        return
    where = f" at step {step}" if step is not None else ""
    log.warning(
        "%s tracking failed%s (%s: %s); training goes on without it.",
        sink,
        where,
        type(exc).__name__,
        str(exc).splitlines()[0][:200] if str(exc) else "",
    )
    with (run_dir / FAILURES_FILE).open("a") as f:
        f.write(
            json.dumps(
                {
                    "time": time.time(),
                    "event": "tracking_lost",
                    "sink": sink,
                    "step": step,
                    "error": type(exc).__name__,
                }
            )
            + "\n"
        )


# --- driver: create and close runs ---------------------------------------------------------------


def start_tracking(
    cfg,
    run_dir: str | os.PathLike,
    parent: dict[str, Any] | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Create the MLflow / W&B runs of `cfg`, or reuse those in RUN_DIR/tracking.json when resuming (not `fresh`)."""
    lg = cfg.train.logging
    run_dir = Path(run_dir)
    if not (lg.mlflow or lg.wandb):
        return {}
    handles = {} if fresh else read_handles(run_dir)
    parent = parent or {}
    if lg.mlflow and "mlflow" not in handles:
        try:
            handles["mlflow"] = _create_mlflow_run(cfg, parent.get("mlflow"))
        except Exception as exc:  # noqa: BLE001 - an unreachable server must not stop the run
            warn_once(run_dir, "mlflow", exc)
    if lg.wandb and "wandb" not in handles:
        handles["wandb"] = {
            "id": uuid.uuid4().hex[:12],
            "project": lg.project or "raysft",
            "name": cfg.run.name,
            "group": (parent.get("wandb") or {}).get("group"),
            "mode": os.environ.get("WANDB_MODE"),
            "dir": str(run_dir),
        }
    _write_handles(run_dir, handles)
    return handles


def _create_mlflow_run(cfg, parent: dict[str, Any] | None, kind: str = "train") -> dict[str, Any]:
    from mlflow.entities import Param

    lg = cfg.train.logging
    uri = (parent or {}).get("uri") or tracking_uri(lg)
    client = _client(uri)
    if parent:
        experiment_id = parent["experiment_id"]
    else:
        name = lg.project or "raysft"
        exp = client.get_experiment_by_name(name)
        experiment_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    tags = {"raysft.kind": kind}
    if parent:
        tags["mlflow.parentRunId"] = parent["run_id"]  # how MLflow nests a child run under its parent
    run = client.create_run(experiment_id, run_name=cfg.run.name, tags=tags)
    params = flat_params(cfg.to_dict())
    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return {"uri": uri, "run_id": run.info.run_id, "experiment_id": experiment_id}


def finish_tracking(
    run_dir: str | os.PathLike,
    adapter: str | os.PathLike | None,
    status: str = "FINISHED",
) -> None:
    """Upload the adapter and the report PNGs (loss curve and the rest) and close the runs."""
    run_dir = Path(run_dir)
    handles = read_handles(run_dir)
    if not handles:
        return
    plots: list[Path] = []
    if status == "FINISHED":
        try:
            plots = write_report(run_dir)
        except Exception as exc:  # noqa: BLE001 - a plot must not fail a finished run
            log.warning("could not draw the run's plots for tracking: %s", exc)
    if "mlflow" in handles:
        h = handles["mlflow"]
        try:
            client = _client(h["uri"])
            if adapter is not None and Path(adapter).is_dir():
                client.log_artifacts(h["run_id"], str(adapter), artifact_path="adapter")
            for p in plots:
                client.log_artifact(h["run_id"], str(p), artifact_path="plots")
            client.set_terminated(h["run_id"], status=status)
        except Exception as exc:  # noqa: BLE001
            warn_once(run_dir, "mlflow", exc)
    if "wandb" in handles:
        try:
            _finish_wandb(handles["wandb"], adapter, plots)
        except Exception as exc:  # noqa: BLE001
            warn_once(run_dir, "wandb", exc)


def _finish_wandb(h: dict[str, Any], adapter, plots: list[Path]) -> None:
    import wandb

    run = wandb.init(**_wandb_init_args(h))
    if adapter is not None and Path(adapter).is_dir():
        art = wandb.Artifact(f"adapter-{h['id']}", type="model")
        art.add_dir(str(adapter))
        run.log_artifact(art)
    if plots:
        run.log({p.stem: wandb.Image(str(p)) for p in plots})
    run.finish()


def _wandb_init_args(h: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    import wandb

    args = {
        "id": h["id"],
        "project": h["project"],
        "name": h["name"],
        "group": h.get("group"),
        "dir": h["dir"],
        "resume": "allow",
        "settings": wandb.Settings(console="off", silent=True),
    }
    if h.get("mode"):
        args["mode"] = h["mode"]
    if config is not None:
        args["config"] = config
    return args


# --- sweep: one parent run ---------------------------------------------------------------------------


def start_sweep_tracking(cfg, sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """The sweep's parent MLflow run (its params: the base config with tune.search_space); W&B groups by sweep name."""
    lg = cfg.train.logging
    sweep_dir = Path(sweep_dir)
    handles = read_handles(sweep_dir)
    if lg.mlflow and "mlflow" not in handles:
        try:
            handles["mlflow"] = _create_mlflow_run(cfg, None, kind="sweep")
        except Exception as exc:  # noqa: BLE001
            warn_once(sweep_dir, "mlflow", exc)
    if lg.wandb and "wandb" not in handles:
        handles["wandb"] = {"group": cfg.run.name}
    if handles:
        _write_handles(sweep_dir, handles)
    return handles


def finish_sweep_tracking(sweep_dir: str | os.PathLike, sweep) -> None:
    """Log the best trial's metric, results.csv and the sweep plots to the parent run, and close it."""
    sweep_dir = Path(sweep_dir)
    h = read_handles(sweep_dir).get("mlflow")
    if not h or "run_id" not in h:
        return
    try:
        from mlflow.entities import Metric

        client = _client(h["uri"])
        if sweep.best is not None:
            value = sweep.best.metrics.get(f"final_{sweep.metric}")  # what the best trial was picked by
            if isinstance(value, (int, float)) and math.isfinite(value):
                client.log_batch(
                    h["run_id"],
                    metrics=[Metric(f"best_trial_{sweep.metric}", float(value), _ms(), 0)],
                )
            client.set_tag(h["run_id"], "raysft.best_trial", sweep.best.trial_id)
        for row in sweep.table:  # children that did not finish (ASHA stop, error, interrupt) are closed too
            child = read_handles(sweep_dir / TRIALS_DIR / row["trial_id"]).get("mlflow")
            if child and row["stop_reason"] != "completed" and client.get_run(child["run_id"]).info.status == "RUNNING":
                stopped = row["stop_reason"].startswith("early")
                client.set_terminated(child["run_id"], status="KILLED" if stopped else "FAILED")
        for path in [sweep_dir / RESULTS_CSV, *map(Path, sweep.plots)]:
            if path.is_file():
                client.log_artifact(h["run_id"], str(path))
        client.set_terminated(h["run_id"], status="FINISHED")
    except Exception as exc:  # noqa: BLE001
        warn_once(sweep_dir, "mlflow", exc)


def _ms() -> int:
    return int(time.time() * 1000)


# --- rank 0: per-step metrics ----------------------------------------------------------------------------


class StepSinks:
    """MLflow / W&B metric logging on rank 0, into the runs the driver created (RUN_DIR/tracking.json)."""

    def __init__(self, run_dir: str | os.PathLike, config_dict: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        handles = read_handles(self.run_dir)
        self.mlflow = None
        self.mlflow_run = None
        self.wandb = None
        if "mlflow" in handles:
            self.mlflow_run = handles["mlflow"]["run_id"]
            self.mlflow = _client(handles["mlflow"]["uri"])
        if "wandb" in handles:
            try:
                import wandb

                self.wandb = wandb.init(**_wandb_init_args(handles["wandb"], config_dict))
            except Exception as exc:  # noqa: BLE001 - includes wandb not installed
                warn_once(self.run_dir, "wandb", exc)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        numbers = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        if self.mlflow is not None:
            from mlflow.entities import Metric

            ts = _ms()
            # MLflow rejects NaN/inf in some stores; metrics.jsonl keeps every value.
            batch = [Metric(k, v, ts, step) for k, v in numbers.items() if math.isfinite(v)]
            try:
                self.mlflow.log_batch(self.mlflow_run, metrics=batch)
            except Exception as exc:  # noqa: BLE001 - a server that went away must not stop training
                warn_once(self.run_dir, "mlflow", exc, step)
                self.mlflow = None
        if self.wandb is not None:
            try:
                self.wandb.log(numbers, step=step)
            except Exception as exc:  # noqa: BLE001
                warn_once(self.run_dir, "wandb", exc, step)
                self.wandb = None

    def close(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as exc:  # noqa: BLE001
                warn_once(self.run_dir, "wandb", exc)
            self.wandb = None
