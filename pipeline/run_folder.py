"""The run folder (`run.storage_path/run.name/`) and the sweep folder: every file name in them, where a run's
folder is, and the torch-free readers and writers of their small files, local or on an object store.

A local run folder is written in place. For a run folder on an object store (`run.storage_path` as
s3:// or gs://) rank 0 (or a sweep's driver) writes a local staging copy (`RunFolder`), filled from the
store when the worker group (re)starts and uploaded after every checkpoint and at the end, so a restarted
group on any node continues the same files and no node reads another node's disk. Between checkpoints the
small progress files (metrics.jsonl, events.jsonl) are also published at most every PROGRESS_PUSH_S
seconds, for the driver's console (console.RunFollower) to follow; a restarted group rewinds metrics.jsonl
to its checkpoint. Checkpoints go through Ray Train; what is inside a checkpoint folder is
training/checkpoint.py's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from raysft.pipeline import jsonl, storage
from raysft.pipeline.storage import StorageOptions

# --- the run folder (ARCHITECTURE.md, "The run folder") ---
RESOLVED_CONFIG = "config.yaml"  # the resolved config, written once a (re)run is accepted
IDENTITY_FILE = "run.json"  # the run's identity and planned length (training/identity.py)
METRICS_FILE = "metrics.jsonl"  # one line per optimizer step (training/metrics.py), gen_* lines of evals
GEN_PREFIX = "gen_"  # metrics.jsonl keys of a generation eval (training/generate_eval.py)
EVENTS_FILE = "events.jsonl"  # one line per (re)start, reader counters, checkpoints, preemption notices
LEDGER_FILE = "samples.jsonl"  # the data ledger (training/ledger.py)
GEN_SAMPLES_FILE = "gen_samples.jsonl"  # every generation-eval prompt, reply, reference and score
# One line per incident that did not stop the run: a lost tracking sink, worker failures (console.py).
FAILURES_FILE = "failures.jsonl"
TRACKING_FILE = "tracking.json"  # MLflow / W&B run ids (tracking.py)
LOG_FILE = "raysft.log"  # the driver's complete console output (console.py)
TENSORBOARD_DIR = "tensorboard"
ADAPTER_DIR = "adapter"  # the final PEFT adapter (also inside each checkpoint folder)
MERGED_DIR = "merged"  # base + adapter, `raysft export --merge`
REPORT_DIR = "report"  # `raysft report` PNGs
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of registered checkpoints

SYNCED = (METRICS_FILE, EVENTS_FILE, LEDGER_FILE, TENSORBOARD_DIR)  # rank 0's files, staged for an object store
PROGRESS = (METRICS_FILE, EVENTS_FILE)  # what the console follows between checkpoints
PROGRESS_PUSH_S = 5.0  # at most one small upload per file this often (the first report pushes at once)

# --- the sweep folder (`raysft tune`): the driver's files, and one run folder per trial under trials/ ---
SWEEP_CONFIG = "sweep.yaml"
TUNE_DIR = "tune"  # Ray Tune's experiment folder
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"  # written by a trial whose training finished
ATTEMPTS_FILE = "attempts.jsonl"  # one line each time a trial's function starts (resume proof)
RESULTS_CSV = "results.csv"
SWEEP_PLOTS = ("loss_vs_lr.png", "eval_curves.png")
BEST_ADAPTER = "best_adapter"
BEST_CONFIG = "best_config.yaml"
# The files the sweep's driver writes (staged locally for a sweep folder on an object store).
SWEEP_DRIVER_FILES = (SWEEP_CONFIG, EVENTS_FILE, RESULTS_CSV, *SWEEP_PLOTS, BEST_ADAPTER, BEST_CONFIG, TRACKING_FILE)


def run_dir_of(cfg) -> Path | str:
    """The run folder of a Config: a local Path, or a URI string when run.storage_path is on an object store."""
    if storage.is_remote(cfg.run.storage_path):
        return storage.join(cfg.run.storage_path, cfg.run.name)
    return Path(cfg.run.storage_path).expanduser().resolve() / cfg.run.name


def local_dir_of(cfg) -> Path:
    """Where this machine keeps the run's console log: the run folder, or ~/.cache/raysft/runs/NAME for a run
    folder on an object store."""
    run_dir = run_dir_of(cfg)
    return run_dir if isinstance(run_dir, Path) else Path.home() / ".cache" / "raysft" / "runs" / cfg.run.name


def append_event(run_dir: str | os.PathLike, event: dict[str, Any]) -> None:
    """events.jsonl (in a local or staged run folder): one line, stamped with the time."""
    jsonl.append(Path(run_dir) / EVENTS_FILE, {"time": time.time(), **event})


def read_events(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return jsonl.read(Path(run_dir) / EVENTS_FILE)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return jsonl.read(Path(run_dir) / METRICS_FILE)


class RunFolder:
    """Rank 0's view of the run folder (or the sweep driver's of its sweep folder): `local` is where it writes;
    `push()` publishes the `names` of a remote folder."""

    def __init__(self, run_dir: str, options: StorageOptions | None = None, names: tuple[str, ...] = SYNCED) -> None:
        self.uri, self.options, self.names = str(run_dir), options or StorageOptions(), names
        self.remote = storage.is_remote(self.uri)
        self._pushed_at = 0.0
        if not self.remote:
            self.local = Path(self.uri)
            return
        self.local = Path(tempfile.mkdtemp(prefix="raysft-run-"))
        for name in names:
            storage.download(storage.join(self.uri, name), self.local / name, self.options)

    def push(self, names: tuple[str, ...] | None = None) -> None:
        if not self.remote:
            return
        for name in names or self.names:
            if (self.local / name).exists():
                storage.upload(self.local / name, storage.join(self.uri, name), self.options)
        self._pushed_at = time.monotonic()

    def push_progress(self, every_s: float = PROGRESS_PUSH_S) -> None:
        """Publish metrics.jsonl and events.jsonl when the last push is `every_s` old (cheap: two small PUTs)."""
        if self.remote and time.monotonic() - self._pushed_at >= every_s:
            self.push(PROGRESS)

    def close(self) -> None:
        self.push()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
