"""The model card (README.md) written into every export: what was trained, on what, how, and how well.

Read from the run folder: config.yaml (base model, hyper-parameters), run.json (the prepared data's
cache key, hence its stats.json with the row counts per source) and metrics.jsonl (the last eval
loss and generation metric). What cannot be found is said in the card, never guessed.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from raysft.pipeline.config import Config
from raysft.pipeline.data.cache import cache_root

CARD = "README.md"


def raysft_version() -> str:
    try:
        return version("raysft")
    except PackageNotFoundError:
        return "unknown"


def write_card(folder: Path, run: Path, cfg: Config, fmt: str, details: dict[str, str]) -> Path:
    path = folder / CARD
    path.write_text(card_text(run, cfg, fmt, details), encoding="utf-8")
    return path


def card_text(run: Path, cfg: Config, fmt: str, details: dict[str, str]) -> str:
    stats, stats_where = _stats(run, cfg)
    evals = _last_metrics(run)
    lines = [
        "---",
        f"base_model: {cfg.model.name_or_path}",
        "library_name: " + ("peft" if fmt == "peft" else "transformers" if fmt == "merged" else "gguf"),
        "tags: [raysft, sft, lora" + (", qlora" if cfg.model.quantization == "nf4" else "") + "]",
        "---",
        "",
        f"# {cfg.run.name} ({fmt} export)",
        "",
        f"Fine-tuned with raysft {raysft_version()} from the run folder `{run}`.",
        "",
        "## Export",
        "",
        f"- format: {fmt}",
        *(f"- {k}: {v}" for k, v in details.items()),
        "",
        "## Base model",
        "",
        f"- {cfg.model.name_or_path}" + (f" (GGUF file {cfg.model.gguf_file})" if cfg.model.gguf_file else ""),
        f"- trained on: {'NF4 4-bit base (QLoRA)' if cfg.model.quantization == 'nf4' else 'full-precision base'}"
        f", model.dtype {cfg.model.dtype}",
        "",
        "## Data",
        "",
        *_data_lines(cfg, stats, stats_where),
        "",
        "## Hyper-parameters",
        "",
        "| key | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in _hparams(cfg).items()),
        "",
        "## Evaluation",
        "",
        *(_eval_lines(evals) or ["No eval loss was recorded (the run had no eval data)."]),
        "",
    ]
    return "\n".join(lines)


def _stats(run: Path, cfg: Config) -> tuple[dict[str, Any] | None, str]:
    try:
        key = json.loads((run / "run.json").read_text())["identity"]["data.prepared_key"]
    except (OSError, ValueError, KeyError, TypeError):
        key = None
    if key is None:
        return None, f"{run / 'run.json'} names no prepared data"
    root = cache_root(cfg)
    path = Path(str(root)) / key / "stats.json"
    try:
        return json.loads(path.read_text()), str(path)
    except (OSError, ValueError):
        return None, f"{path} is not readable here"


def _data_lines(cfg: Config, stats: dict[str, Any] | None, where: str) -> list[str]:
    train = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    sources = [str(getattr(s, "path", s)) for s in train]
    if stats is None:
        return [f"- {s}" for s in sources] + ["", f"Row counts unknown: {where}."]
    lines = ["| source | rows read | rows used | rows dropped |", "| --- | --- | --- | --- |"]
    for s in stats.get("per_source") or []:
        dropped = sum((s.get("rows_dropped") or {}).values())
        lines.append(f"| {s.get('source')} | {s.get('rows_read')} | {s.get('rows_used')} | {dropped} |")
    drops = sum((stats.get("rows_dropped") or {}).values())
    lines += [
        f"| all (train) | {stats.get('rows_read')} | {stats.get('rows_used')} | {drops} |",
        "",
        f"Trainable tokens {stats.get('tokens_trainable')} of {stats.get('tokens_total')}; "
        f"format {stats.get('format')}, train_on {stats.get('train_on')}, packing {stats.get('packing')} "
        f"(from {where}).",
    ]
    if isinstance(stats.get("eval"), dict):
        lines.append(f"Held-out eval rows used: {stats['eval'].get('rows_used')}.")
    return lines


def _hparams(cfg: Config) -> dict[str, Any]:
    t, lo = cfg.train, cfg.lora
    return {
        "lora.r / alpha / dropout": f"{lo.r} / {lo.alpha} / {lo.dropout}",
        "lora.target_modules": lo.target_modules,
        "lora.use_rslora / use_dora": f"{lo.use_rslora} / {lo.use_dora}",
        "train.lr": t.lr,
        "train.epochs / max_steps": f"{t.epochs} / {t.max_steps}",
        "global batch (rows per step)": cfg.rows_per_step(),
        "data.max_seq_len": cfg.data.max_seq_len,
        "model.quantization": cfg.model.quantization,
        "train.seed": t.seed,
    }


def _last_metrics(run: Path) -> dict[str, Any]:
    last: dict[str, Any] = {}
    path = run / "metrics.jsonl"
    if not path.is_file():
        return last
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        for k, v in row.items():
            if k == "eval_loss" or k.startswith("gen_"):
                last[k] = (row.get("step"), v)
    return last


def _eval_lines(evals: dict[str, Any]) -> list[str]:
    return [
        f"- final {k}: {v:.4f} (step {step})" if isinstance(v, float) else f"- final {k}: {v} (step {step})"
        for k, (step, v) in sorted(evals.items())
    ]
