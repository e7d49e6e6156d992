"""`raysft runs [STORAGE]` and `raysft report RUN`: what the runs in a storage path did, read from their folders.

A run folder is STORAGE/NAME holding config.yaml (written by the trainer); a sweep folder is
STORAGE/NAME holding sweep.yaml, whose trials are runs under trials/ID/. Everything is read from
files the run wrote (metrics.jsonl, events.jsonl, adapter/, trial.json), so it works on a stopped
cluster and on runs from other machines.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from raysft.pipeline import plots
from raysft.pipeline.errors import ConfigError
from raysft.pipeline.plots import is_number
from raysft.pipeline.run_folder import (
    ADAPTER_DIR,
    GEN_PREFIX,
    METRICS_FILE,
    REPORT_DIR,
    RESOLVED_CONFIG,
    SWEEP_CONFIG,
    TRIALS_DIR,
    read_events,
    read_metrics,
)

RUNNING_WITHIN_S = 300  # a run whose metrics.jsonl changed this recently counts as running


@dataclass
class RunRow:
    """One line of `raysft runs`."""

    name: str
    status: str  # finished | running | stopped (failed or interrupted: resume with the same run.name)
    steps_done: int
    steps_total: int | None
    last_eval_loss: float | None
    best_eval_loss: float | None
    tokens_per_s: float | None  # median over the run's steps
    adapter: str | None
    sweep: str | None  # the sweep (STORAGE/NAME) this run is a trial of
    path: str


def run_row(run_dir: Path, name: str, sweep: str | None = None) -> RunRow:
    """Summarise one run folder from its metrics, events and adapter."""
    metrics = read_metrics(run_dir)
    steps = [m for m in metrics if isinstance(m.get("step"), (int, float))]
    done = int(max((m["step"] for m in steps), default=0))
    starts = [e for e in read_events(run_dir) if e.get("event") == "start" and "total_steps" in e]
    total = int(starts[-1]["total_steps"]) if starts else None
    evals = [float(m["eval_loss"]) for m in steps if is_number(m.get("eval_loss"))]
    tok = [float(m["tokens_per_s"]) for m in steps if is_number(m.get("tokens_per_s"))]
    adapter = run_dir / ADAPTER_DIR
    has_adapter = (adapter / "adapter_config.json").is_file()
    if has_adapter and (total is None or done >= total):
        status = "finished"
    elif (run_dir / METRICS_FILE).is_file() and time.time() - (
        run_dir / METRICS_FILE
    ).stat().st_mtime < RUNNING_WITHIN_S:
        status = "running"
    else:
        status = "stopped"
    return RunRow(
        name=name,
        status=status,
        steps_done=done,
        steps_total=total,
        last_eval_loss=evals[-1] if evals else None,
        best_eval_loss=min(evals) if evals else None,
        tokens_per_s=statistics.median(tok) if tok else None,
        adapter=str(adapter) if has_adapter else None,
        sweep=sweep,
        path=str(run_dir),
    )


def list_runs(storage: str | os.PathLike = "runs") -> list[RunRow]:
    """Every run under `storage`: plain runs and each sweep's trials, in name order."""
    root = Path(storage).expanduser()
    if not root.is_dir():
        raise ConfigError(f"Storage path {root} does not exist or is not a folder.")
    rows: list[RunRow] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / SWEEP_CONFIG).is_file():
            trials = d / TRIALS_DIR
            for t in sorted(p for p in trials.iterdir() if p.is_dir()) if trials.is_dir() else []:
                rows.append(run_row(t, f"{d.name}/{t.name}", sweep=d.name))
        elif (d / RESOLVED_CONFIG).is_file() or (d / METRICS_FILE).is_file():
            rows.append(run_row(d, d.name))
    return rows


def format_table(rows: list[RunRow]) -> str:
    """The runs as an aligned text table (one header line, one line per run)."""
    head = [
        "NAME",
        "STATUS",
        "STEPS",
        "EVAL LOSS (LAST)",
        "EVAL LOSS (BEST)",
        "TOK/S",
        "SWEEP",
        "ADAPTER",
    ]
    body = [
        [
            r.name,
            r.status,
            f"{r.steps_done}/{r.steps_total if r.steps_total is not None else '?'}",
            _fmt(r.last_eval_loss, ".4f"),
            _fmt(r.best_eval_loss, ".4f"),
            _fmt(r.tokens_per_s, ".0f"),
            r.sweep or "-",
            r.adapter or "-",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    return "\n".join(lines)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def rows_json(rows: list[RunRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


# --- raysft report RUN ---------------------------------------------------------------------------------


def resolve_run(run: str | os.PathLike) -> Path:
    """A run folder by path (a sweep trial's folder works too)."""
    path = Path(run).expanduser()
    if not (path / METRICS_FILE).is_file():
        raise ConfigError(f"{path} is not a run folder: it has no {METRICS_FILE}.")
    return path.resolve()


def write_report(run: str | os.PathLike, output: str | os.PathLike | None = None) -> list[Path]:
    """PNGs from RUN/metrics.jsonl into RUN/report/ (or `output`): loss.png (train and eval loss), lr.png,
    tokens_per_s.png, grad_norm.png, and one per generation metric (gen_*.png) when the run has them."""
    run_dir = resolve_run(run)
    out = Path(output) if output is not None else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    metrics = read_metrics(run_dir)
    paths = [plots.loss_curve(metrics, out / "loss.png", run_dir.name)]
    for key, label in [
        ("lr", "learning rate"),
        ("tokens_per_s", "trained tokens / s"),
        ("grad_norm", "gradient norm"),
    ]:
        paths.append(plots.line_plot({key: plots.series(metrics, key)}, out / f"{key}.png", label, run_dir.name))
    gen_keys = sorted({k for m in metrics for k in m if k.startswith(GEN_PREFIX) and is_number(m[k])})
    for key in gen_keys:
        paths.append(plots.line_plot({key: plots.series(metrics, key)}, out / f"{key}.png", key, run_dir.name))
    return paths
