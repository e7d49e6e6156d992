"""Generation eval during training (`train.eval_generate`): greedy replies of the base model plus a saved
checkpoint's LoRA adapter to held-out prompts, scored by exact_match, contains or the user's function.

It runs as Ray Train 2.60's asynchronous checkpoint validation: the loop saves a checkpoint at each
`every` step and reports it with `validation=True`; the Train controller starts `validate_checkpoint`
as a Ray task (holding `num_cpus` / `num_gpus`, off the training workers), so the step loop never
waits for it. At most one such task runs at a time (Ray Train's limit); later checkpoints queue and
are kept until validated. `fit()` returns once every queued eval has finished.

Results: one `{"step": S, "gen_<metric>": value}` line per eval in RUN/metrics.jsonl (the task appends
it), every reply in RUN/gen_samples.jsonl, and MLflow / W&B when on. Ray hands the returned dict to
its checkpoint manager only; it does not reach Tune's per-step results (TuneReportCallback), so a
sweep reads gen_* from each trial's metrics.jsonl when the trials end (sweep/run.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysft.pipeline import jsonl, storage
from raysft.pipeline.config import Config, resolve_relative
from raysft.pipeline.data.formats import parse_and_normalise
from raysft.pipeline.data.sources import expand, plan_chunks, read_chunk, split_source_id
from raysft.pipeline.errors import ConfigError, DataError
from raysft.pipeline.models.load import load_base_model
from raysft.pipeline.models.tokenizer import load_tokenizer
from raysft.pipeline.run_folder import ADAPTER_DIR, FAILURES_FILE, GEN_PREFIX, METRICS_FILE
from raysft.pipeline.run_folder import GEN_SAMPLES_FILE as SAMPLES_FILE
from raysft.pipeline.tracking import StepSinks

BUILTIN_METRICS = ("exact_match", "contains")


def enabled(cfg: Config) -> bool:
    return cfg.train.eval_generate.prompts is not None


def due(cfg: Config, step: int, last: bool) -> bool:
    """Whether the checkpoint of `step` gets a generation eval: every `every` steps and at the end."""
    return enabled(cfg) and (step % cfg.train.eval_generate.every == 0 or last)


# --- prompts and references --------------------------------------------------------------------------


@dataclass
class Prompt:
    """One held-out example: the turns before the last assistant turn, and that turn's content."""

    messages: list[dict[str, Any]]
    reference: str
    tools: list[Any] | None = None


def read_prompts(cfg: Config) -> list[Prompt]:
    """Every row of train.eval_generate.prompts through the data plan's readers; a bad row is an error
    naming its file and row (a held-out set that silently shrinks would change the metric)."""
    g = cfg.train.eval_generate
    spec = cfg.resolve_path(g.prompts) or g.prompts
    fmt = g.format or cfg.data.format
    files = expand(spec)
    out: list[Prompt] = []
    for chunk in plan_chunks(files, rows_per_chunk=1 << 20):
        table = read_chunk(chunk)
        for sid, raw, why in zip(
            table.column("source_id").to_pylist(),
            table.column("row").to_pylist(),
            table.column("read_reason").to_pylist(),
        ):
            _, row = split_source_id(sid)
            where = f"train.eval_generate.prompts {files[chunk.file_index]} row {row}"
            if why == "blank_line":
                continue  # a blank line is not a row (the data plan counts it, it holds no example)
            n = parse_and_normalise(raw, fmt, cfg.data.system_prompt, why)
            if n.messages is None:
                raise DataError(f"{where} is not a prompt with a reference answer ({n.drop_reason}: {n.detail}).")
            last = max(i for i, m in enumerate(n.messages) if m["role"] == "assistant")
            if not any(m["role"] == "user" for m in n.messages[:last]):
                raise DataError(f"{where} has no user turn before its last assistant turn.")
            out.append(Prompt(n.messages[:last], str(n.messages[last]["content"]), n.tools))
    if not out:
        raise DataError(f"train.eval_generate.prompts {spec} holds no prompts.")
    return out


# --- metrics ----------------------------------------------------------------------------------------


def exact_match(replies: list[str], references: list[str]) -> float:
    """Share of replies equal to their reference, both stripped of surrounding whitespace."""
    return sum(r.strip() == a.strip() for r, a in zip(replies, references)) / max(len(replies), 1)


def contains(replies: list[str], references: list[str]) -> float:
    """Share of replies that contain their (stripped) reference."""
    return sum(a.strip() in r for r, a in zip(replies, references)) / max(len(replies), 1)


def load_metric(spec: str, source: str | None = None) -> tuple[str, Callable[[list[str], list[str]], float]]:
    """(name, function) of train.eval_generate.metric: a built-in, `module:function`, or `file.py:function`
    (relative to the config file's folder when it exists there). One sentence when it cannot be used."""
    if spec in BUILTIN_METRICS:
        return spec, {"exact_match": exact_match, "contains": contains}[spec]
    where = f"train.eval_generate.metric '{spec}'"
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name.isidentifier():
        raise ConfigError(f"{where} is neither {' nor '.join(BUILTIN_METRICS)} nor module:function.")
    try:
        if module_name.endswith(".py"):
            path = Path(_metric_file(module_name, source))
            if not path.is_file():
                raise ConfigError(f"{where}: the file {path} does not exist.")
            mod_spec = importlib.util.spec_from_file_location(f"raysft_user_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything on import
        raise ConfigError(
            f"{where}: importing {module_name} failed ({type(exc).__name__}: {str(exc)[:120]})."
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {module_name} has no function {fn_name}.")
    name = re.sub(r"\W", "_", fn_name)
    return name, fn


def _metric_file(module_name: str, source: str | None) -> str:

    return str(Path(resolve_relative(module_name, source) or module_name).expanduser().resolve())


def score(fn: Callable, name: str, replies: list[str], references: list[str]) -> float:
    value = fn(replies, references)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"train.eval_generate.metric {name} returned a {type(value).__name__}, not a number.")
    return float(value)


# --- driver side ---------------------------------------------------------------------------------------


def preflight(cfg: Config) -> dict[str, Any]:
    """Check the section before any worker starts (prompts readable and non-empty, metric loadable); return
    the overrides that make its paths absolute for the eval task."""
    if not enabled(cfg):
        return {}
    g = cfg.train.eval_generate
    if g.format == "text" or (g.format is None and cfg.data.format == "text"):
        raise ConfigError("train.eval_generate needs prompts with reference answers; the text format has none.")
    read_prompts(cfg)
    load_metric(g.metric, cfg.source)
    updates: dict[str, Any] = {}
    spec = cfg.resolve_path(g.prompts) or g.prompts
    if "://" not in spec:
        updates["train.eval_generate.prompts"] = str(Path(spec).expanduser().resolve())
    module_name, _, fn_name = g.metric.rpartition(":")
    if module_name.endswith(".py"):
        updates["train.eval_generate.metric"] = f"{_metric_file(module_name, cfg.source)}:{fn_name}"
    return updates


def metric_key(cfg: Config) -> str:
    """The metrics.jsonl key the eval writes: gen_<metric name>."""
    return GEN_PREFIX + load_metric(cfg.train.eval_generate.metric, cfg.source)[0]


def validation_config(cfg: Config, run_dir: str | os.PathLike):
    """Ray Train's ValidationConfig for `cfg` (None when the eval is off): `validate_checkpoint` as a Ray task
    holding the section's CPUs/GPUs, with the config and the run folder as its arguments."""
    if not enabled(cfg):
        return None

    if storage.is_remote(run_dir):  # the eval task appends to metrics.jsonl and gen_samples.jsonl there
        raise ConfigError(
            "train.eval_generate writes its results into the run folder, which must be local; "
            "turn it off or use a local run.storage_path."
        )
    from ray.train import ValidationConfig
    from ray.train.v2.api.validation_config import ValidationTaskConfig

    g = cfg.train.eval_generate
    return ValidationConfig(
        validate_checkpoint,
        task_config=ValidationTaskConfig(
            fn_kwargs={"config": cfg.to_dict(), "run_dir": str(run_dir)}, timeout_s=g.timeout_s
        ),
        # "DEFAULT": never inside the caller's placement group. A Tune trial's controller runs in the trial's
        # 1-CPU bundle, which captures child tasks; there the eval would wait for a CPU its own driver holds.
        ray_remote_kwargs={
            "num_cpus": g.num_cpus,
            "num_gpus": g.num_gpus,
            "max_retries": 0,
            "scheduling_strategy": "DEFAULT",
        },
    )


# --- the eval task --------------------------------------------------------------------------------------


def validate_checkpoint(checkpoint, *, config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Ray Train's validation fn: generate on the checkpoint's adapter, score, write the results; returns
    {"step": S, "gen_<metric>": value}. A failure is one failures.jsonl line (Ray Train only logs it)."""
    # torch: the driver's prompt checks need no checkpoint code
    from raysft.pipeline.training.checkpoint import step_of

    step = step_of(checkpoint.path)
    try:
        return _validate(checkpoint, Config.from_dict(config), Path(run_dir), step)
    except Exception as exc:
        jsonl.append(
            Path(run_dir) / FAILURES_FILE,
            {
                "time": time.time(),
                "event": "generation_eval_failed",
                "step": step,
                "error": f"{type(exc).__name__}: {str(exc)[:300]}",
            },
        )
        print(
            f"[raysft] generation eval of step {step} failed ({type(exc).__name__}: {str(exc)[:200]}); "
            "training goes on.",
            flush=True,
        )
        raise


def _validate(checkpoint, cfg: Config, run_dir: Path, step: int) -> dict[str, Any]:

    g = cfg.train.eval_generate
    start = time.perf_counter()
    prompts = read_prompts(cfg)
    name, fn = load_metric(g.metric)
    with checkpoint.as_directory() as d:
        model, tokenizer = load_with_adapter(cfg, Path(d) / ADAPTER_DIR)
        replies = generate(model, tokenizer, prompts, g.max_new_tokens, g.batch_size)
    del model
    references = [p.reference for p in prompts]
    value = score(fn, name, replies, references)
    key = GEN_PREFIX + name
    jsonl.append(
        run_dir / SAMPLES_FILE,
        {
            "step": step,
            "metric": key,
            "value": value,
            "seconds": round(time.perf_counter() - start, 3),
            "samples": [
                {"prompt": p.messages[-1]["content"], "reply": r, "reference": p.reference}
                for p, r in zip(prompts, replies)
            ],
        },
    )
    jsonl.append(run_dir / METRICS_FILE, {"step": step, key: value})
    _track(cfg, run_dir, {key: value}, step)
    print(
        f"[raysft] generation eval at step {step}: {key} {value:.4f} over {len(prompts)} prompts "
        f"({time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    return {"step": step, key: value}


def _track(cfg: Config, run_dir: Path, metrics: dict[str, float], step: int) -> None:
    """Into the run's MLflow / W&B runs (tracking.json) when they are on; never fails the eval."""
    if not (cfg.train.logging.mlflow or cfg.train.logging.wandb):
        return

    sinks = StepSinks(run_dir)
    try:
        sinks.log(metrics, step)
    finally:
        sinks.close()


# The last (base + adapter, tokenizer) the eval loaded on CPU, keyed by the base model config and the adapter's
# config. Ray reuses the eval task's worker process, so the next checkpoint's eval only swaps in the new
# LoRA weights instead of loading the base and the tokenizer again (most of an eval's time on a small model).
# GPU evals always load afresh: an idle worker must not hold GPU memory between evals.
_LOADED: dict[str, tuple[Any, Any]] = {}


def load_with_adapter(cfg: Config, adapter: str | os.PathLike):
    """The configured base (NF4 or plain) with the PEFT adapter at `adapter`, in eval mode, and its tokenizer."""
    import torch
    from peft import PeftModel

    device = "cuda" if cfg.train.eval_generate.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    key = json.dumps([cfg.model.model_dump(mode="json"), (Path(adapter) / "adapter_config.json").read_text()])
    if device == "cpu" and key in _LOADED:
        model, tokenizer = _LOADED[key]
        _swap_adapter(model, adapter)
        return model, tokenizer
    _LOADED.clear()
    model = PeftModel.from_pretrained(load_base_model(cfg.model, device), str(adapter))
    model.eval()
    tokenizer = load_tokenizer(cfg)
    if device == "cpu":
        _LOADED[key] = (model, tokenizer)
    return model, tokenizer


def _swap_adapter(model, adapter: str | os.PathLike) -> None:
    """Load the LoRA weights at `adapter` into `model` (a PeftModel of the same adapter config), in place."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_peft_weights(str(adapter), device="cpu"))
    if result.unexpected_keys:
        raise RuntimeError(f"the adapter at {adapter} holds weights the model lacks: {result.unexpected_keys[:3]}")


def generate(model, tokenizer, prompts: list[Prompt], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy replies to chat prompts, in left-padded batches (a KV cache is fine here: nothing is packed)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    replies: list[str] = []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                texts = [
                    tokenizer.apply_chat_template(p.messages, tools=p.tools, tokenize=False, add_generation_prompt=True)
                    for p in prompts[i : i + batch_size]
                ]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(model.device) for k, v in enc.items()}
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return replies


def generation_history(run_dir: str | os.PathLike) -> dict[int, dict[str, float]]:
    """{step: {gen_*: value}} from RUN/metrics.jsonl (what a sweep joins to its trials' Tune results)."""

    out: dict[int, dict[str, float]] = {}
    for m in jsonl.read(Path(run_dir) / METRICS_FILE):
        gen = {
            k: v
            for k, v in m.items()
            if k.startswith(GEN_PREFIX) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if gen and isinstance(m.get("step"), int):
            out.setdefault(m["step"], {}).update(gen)
    return out
