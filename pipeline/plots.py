"""Every PNG raysft draws: a run's curves (`raysft report`, uploaded by tracking.py), the demo's loss curve,
and a sweep's loss-by-learning-rate and eval curves. matplotlib is set up here once (the Agg backend: no
display needed); the data comes in as plain rows (metrics.jsonl lines, results.csv rows).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Points = list[tuple[int, float]]


def _pyplot():
    # matplotlib loads here, not at import: it is heavy, and only the commands that draw need it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): what a plot or a table can show."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(metrics: list[dict[str, Any]], key: str) -> Points:
    """(step, value) pairs of `key` from metrics.jsonl rows, in step order (the last row of a step wins)."""
    by_step = {int(m["step"]): float(m[key]) for m in metrics if "step" in m and is_number(m.get(key))}
    return sorted(by_step.items())


def loss_series(metrics: list[dict[str, Any]]) -> tuple[Points, Points]:
    """(step, train loss) and (step, eval loss) pairs from metrics.jsonl rows, in step order."""
    train, evals = {}, {}
    for row in metrics:
        step = row.get("step")
        if step is None:
            continue
        loss = row.get("loss", row.get("train_loss"))
        if isinstance(loss, (int, float)):
            train[int(step)] = float(loss)
        if isinstance(row.get("eval_loss"), (int, float)):
            evals[int(step)] = float(row["eval_loss"])
    return sorted(train.items()), sorted(evals.items())


def _finish(fig, ax, path: str | os.PathLike, title: str, legend: bool, dpi: int | None = None) -> Path:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def line_plot(series_by_label: dict[str, Points], path: str | os.PathLike, ylabel: str, title: str) -> Path:
    """One line per label against the optimizer step ("no values recorded" when all are empty)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, points in series_by_label.items():
        if points:
            style = "o-" if len(points) < 30 else "-"
            ax.plot([s for s, _ in points], [v for _, v in points], style, lw=1.3, ms=3, label=label)
    if not any(series_by_label.values()):
        ax.text(0.5, 0.5, "no values recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, path, title, legend=any(series_by_label.values()))


def loss_curve(
    metrics: list[dict[str, Any]],
    path: str | os.PathLike,
    title: str,
    label_note: str = "",
    before_eval: tuple[str, float] | None = None,
    after_eval: tuple[str, float] | None = None,
) -> Path:
    """The loss curve: train loss per step and the run's eval loss points; `before_eval` / `after_eval`
    (label, value) are drawn as markers at step 0 and at the last step (the demo's evaluations)."""
    plt = _pyplot()
    train, evals = loss_series(metrics)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], lw=1.2, label=f"train loss per step{label_note}")
    if evals:
        label = f"eval loss during training{label_note}"
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", lw=1.5, label=label)
    last = max([s for s, _ in train] + [s for s, _ in evals] + [1])
    if before_eval is not None:
        ax.plot([0], [before_eval[1]], "s", color="tab:red", label=f"{before_eval[0]}: {before_eval[1]:.3f}")
    if after_eval is not None:
        ax.plot([last], [after_eval[1]], "D", color="tab:green", label=f"{after_eval[0]}: {after_eval[1]:.3f}")
    if not (train or evals or before_eval or after_eval):
        ax.text(0.5, 0.5, "no values recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on response tokens")
    return _finish(fig, ax, path, title, legend=bool(train or evals or before_eval or after_eval))


def sweep_loss_vs_lr(
    table: list[dict[str, Any]],
    path: str | os.PathLike,
    completed: str,
    lr_key: str = "train.lr",
    rank_key: str = "lora.r",
    defaults: dict[str, Any] | None = None,
) -> Path:
    """Final eval loss against learning rate, one line per LoRA rank; trials whose stop_reason is not
    `completed` are hollow. `defaults` give the value of an axis the sweep did not search."""
    plt = _pyplot()
    table = [{**(defaults or {}), **r} for r in table]
    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = sorted({r.get(rank_key) for r in table}, key=lambda v: (v is None, v))
    for rank in ranks:
        rows = sorted(
            (r for r in table if r.get(rank_key) == rank and r.get(lr_key) is not None), key=lambda r: float(r[lr_key])
        )
        xs = [float(r[lr_key]) for r in rows]
        ys = [float(r["final_eval_loss"]) for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", label=f"r = {rank}" if rank is not None else "all trials")
        for x, y, r in zip(xs, ys, rows):
            if r["stop_reason"] != completed:
                ax.plot([x], [y], marker="o", markerfacecolor="white", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final eval loss")
    ax.set_title("Sweep: final eval loss by learning rate and LoRA rank\n(hollow: stopped early or failed)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def sweep_curves(curves: Sequence[tuple[str, Points, bool]], path: str | os.PathLike) -> Path:
    """One line per trial: (label, points, is_eval); eval loss solid, training loss (a trial that never
    evaluated) dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points, is_eval in curves:
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "-" if is_eval else ":", marker="." if len(xs) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (dotted: training loss)")
    ax.set_title("Sweep: eval curves of all trials", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
