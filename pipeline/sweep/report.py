"""A finished (or interrupted) sweep as a table, a best trial, PNG plots and one summary line.

Pure functions over per-trial records (what each trial reported, in order), so they are tested
without Ray; `sweep/run.py` builds the records from Ray Tune's results.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysft.pipeline import plots

COMPLETED = "completed"
EARLY_STOPPED = "early-stopped by ASHA"
ERROR = "error"
INTERRUPTED = "interrupted"


@dataclass
class TrialRecord:
    """One trial: its values, every result it reported (in order), and how it ended."""

    trial_id: str
    params: dict[str, Any]  # searched (and derived) values by dotted key
    history: list[dict[str, Any]]
    wall_time_s: float
    stop_reason: str  # COMPLETED | EARLY_STOPPED | ERROR (with its message) | INTERRUPTED
    run_dir: str = ""
    adapter: str | None = None  # the final PEFT adapter when the trial completed


@dataclass
class BestTrial:
    trial_id: str
    config: dict[str, Any]  # the resolved config the trial trained with
    metrics: dict[str, Any]  # its results.csv row
    adapter: str | None  # the sweep's best_adapter/ copy


@dataclass
class SweepResult:
    """What `raysft.pipeline.tune` returns: the results table and the best trial."""

    sweep_dir: str
    metric: str
    mode: str
    table: list[dict[str, Any]]
    best: BestTrial | None
    plots: list[str] = field(default_factory=list)

    def summary_line(self) -> str:
        return summary_line(self.table, self.best, self.metric, self.sweep_dir)


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in history if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def _best(values: list[float], mode: str) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return min(finite) if mode == "min" else max(finite)


def table_row(rec: TrialRecord, metric: str, mode: str) -> dict[str, Any]:
    """The results.csv row of one trial: id, hyper-parameters, final and best eval loss, tokens, time, why it ended."""
    row: dict[str, Any] = {"trial_id": rec.trial_id, **rec.params}
    evals = _series(rec.history, "eval_loss")
    row["final_eval_loss"] = evals[-1] if evals else math.nan
    row["best_eval_loss"] = _best(evals, "min")
    if metric != "eval_loss":
        values = _series(rec.history, metric)
        row[f"final_{metric}"] = values[-1] if values else math.nan
        row[f"best_{metric}"] = _best(values, mode)
    tokens = _series(rec.history, "trained_tokens")
    steps = _series(rec.history, "step")
    row["trained_tokens"] = int(max(tokens)) if tokens else 0
    row["steps"] = int(max(steps)) if steps else 0
    row["wall_time_s"] = round(rec.wall_time_s, 2)
    row["stop_reason"] = rec.stop_reason
    row["adapter"] = rec.adapter or ""
    return row


def pick_best(table: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The completed trial with the best final metric (its adapter is the one that metric describes)."""
    key = "final_eval_loss" if metric == "eval_loss" else f"final_{metric}"
    done = [r for r in table if r["stop_reason"] == COMPLETED and not math.isnan(float(r[key]))]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: float(r[key]))


def write_csv(table: list[dict[str, Any]], path: str | Path) -> None:
    columns: list[str] = []
    for row in table:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)


def plot_loss_vs_lr(
    table: list[dict[str, Any]],
    path: str | Path,
    lr_key: str = "train.lr",
    rank_key: str = "lora.r",
    defaults: dict[str, Any] | None = None,
) -> None:
    """Final eval loss against learning rate, one line per LoRA rank (early-stopped trials hollow);
    `defaults` give the value of an axis the sweep did not search."""
    plots.sweep_loss_vs_lr(table, path, COMPLETED, lr_key=lr_key, rank_key=rank_key, defaults=defaults)


def plot_curves(records: list[TrialRecord], path: str | Path, keys: list[str]) -> None:
    """Eval loss against step for every trial (training loss when a trial never evaluated)."""
    curves = []
    for rec in records:
        label = rec.trial_id + " " + ", ".join(f"{k.split('.')[-1]}={_fmt(rec.params.get(k))}" for k in keys)
        metric = "eval_loss" if _series(rec.history, "eval_loss") else "loss"
        points = [(r["step"], r[metric]) for r in rec.history if metric in r and "step" in r]
        curves.append((f"{label} [{rec.stop_reason}]", points, metric == "eval_loss"))
    plots.sweep_curves(curves, path)


def summary_line(table: list[dict[str, Any]], best: BestTrial | None, metric: str, sweep_dir: str) -> str:
    counts: dict[str, int] = {}
    for r in table:
        reason = ERROR if str(r["stop_reason"]).startswith(ERROR) else r["stop_reason"]
        counts[reason] = counts.get(reason, 0) + 1
    parts = ", ".join(f"{n} {k}" for k, n in counts.items())
    if best is None:
        return (
            f"Sweep of {len(table)} trials ({parts}): no trial completed with a {metric}; see {sweep_dir}/results.csv."
        )
    key = "final_eval_loss" if metric == "eval_loss" else f"final_{metric}"
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.metrics.items() if "." in k)
    return (
        f"Sweep of {len(table)} trials ({parts}): best {best.trial_id} ({params}) "
        f"{metric}={float(best.metrics[key]):.4f}; "
        f"adapter {best.adapter}; table {sweep_dir}/results.csv."
    )


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
