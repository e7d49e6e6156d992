"""The demo's report: report.json, report.md and loss_curve.png (train and eval loss per step).

Inputs are plain: the before/after evaluations, the run's metrics.jsonl rows and a few facts about
the run, so the report can be rebuilt from a finished run directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOSS_PNG = "loss_curve.png"


def loss_series(metrics: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
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


def plot_losses(
    metrics: list[dict[str, Any]],
    path: str | os.PathLike,
    title: str = "raysft demo",
    before_eval: float | None = None,
    after_eval: float | None = None,
) -> Path:
    """Train loss per step, the run's eval loss points, and the demo's before/after eval as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = loss_series(metrics)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], lw=1.2, label="train loss per step (NF4 base)")
    if evals:
        ax.plot(
            [s for s, _ in evals], [v for _, v in evals], "o-", lw=1.5, label="eval loss during training (NF4 base)"
        )
    last = max([s for s, _ in train] + [s for s, _ in evals] + [1])
    if before_eval is not None:
        ax.plot([0], [before_eval], "s", color="tab:red", label=f"eval before, fp32 base: {before_eval:.3f}")
    if after_eval is not None:
        ax.plot(
            [last], [after_eval], "D", color="tab:green", label=f"eval after, fp32 base + adapter: {after_eval:.3f}"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on response tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(output: str | os.PathLike, report: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Path]:
    """Write report.json, report.md and the loss-curve PNG into `output`; return their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    before, after = report["before"], report["after"]
    png = plot_losses(
        metrics,
        output / LOSS_PNG,
        title=f"raysft demo: {report.get('task', 'task')}",
        before_eval=before["eval_loss"],
        after_eval=after["eval_loss"],
    )
    report = {**report, "loss_curve": png.name}
    (output / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (output / REPORT_MD).write_text(markdown(report))
    return {"json": output / REPORT_JSON, "md": output / REPORT_MD, "png": png}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The short console report."""
    b, a = report["before"], report["after"]
    lines = [
        f"model       {report['model']}",
        f"task        {report['task']} ({report['n_train']} train rows, {b['total']} held-out prompts)",
        f"training    {report['steps']} steps, {report['workers']} workers, ZeRO-{report['zero_stage']}, "
        f"{report['train_seconds']:.0f} s, {report.get('tokens_per_s') or 0:.0f} tokens/s",
        f"eval loss   {b['eval_loss']:.3f} -> {a['eval_loss']:.3f}",
        f"accuracy    {b['accuracy']:.1%} ({b['correct']}/{b['total']}) -> "
        f"{a['accuracy']:.1%} ({a['correct']}/{a['total']})",
        f"wall time   {report['wall_seconds']:.0f} s",
    ]
    if report.get("machine"):
        lines.insert(3, f"machine     {report['machine']}, trained in {report.get('dtype')}")
    return lines


def markdown(report: dict[str, Any]) -> str:
    b, a = report["before"], report["after"]
    rows = "\n".join(
        f"| `{s['prompt']}` | `{s['answer']}` | `{s['reply']}` | `{t['reply']}` |"
        for s, t in zip(b.get("samples", []), a.get("samples", []))
    )
    return (
        "# raysft demo report\n\n"
        + "\n".join(f"    {line}" for line in summary_lines(report))
        + "\n\n| | before | after |\n| --- | --- | --- |\n"
        + f"| eval loss | {b['eval_loss']:.4f} | {a['eval_loss']:.4f} |\n"
        + f"| exact-match accuracy | {b['accuracy']:.1%} | {a['accuracy']:.1%} |\n\n"
        + "| prompt | expected | before | after |\n| --- | --- | --- | --- |\n"
        + rows
        + "\n\n"
        + f"Run directory: `{report['run_dir']}`; adapter: `{report['adapter_path']}`.\n\n"
        + f"![loss curve]({report['loss_curve']})\n"
    )
