"""The demo's report: report.json, report.md and loss_curve.png (train and eval loss per step).

Inputs are plain: the before/after evaluations, the run's metrics.jsonl rows and a few facts about
the run, so the report can be rebuilt from a finished run directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raysft.pipeline import plots

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOSS_PNG = "loss_curve.png"


def write_report(output: str | os.PathLike, report: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Path]:
    """Write report.json, report.md and the loss-curve PNG into `output`; return their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    before, after = report["before"], report["after"]
    png = plots.loss_curve(
        metrics,
        output / LOSS_PNG,
        title=f"raysft demo: {report.get('task', 'task')}",
        label_note=" (NF4 base)",
        before_eval=("eval before, fp32 base", before["eval_loss"]),
        after_eval=("eval after, fp32 base + adapter", after["eval_loss"]),
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
