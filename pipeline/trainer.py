"""Build and fit the Ray Train TorchTrainer; `train(cfg)` is the Python API behind `raysft train`.

Bad input fails here, on the driver, in one sentence, before any worker starts: a missing model, a
tokenizer without a chat template, more workers than the cluster has CPUs/GPUs, an unwritable
storage path, fp16 with DeepSpeed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysft.pipeline import ray_runtime, storage
from raysft.pipeline.cluster_checks import check_shared_storage, check_workers_fit, worker_bundle
from raysft.pipeline.config import Config
from raysft.pipeline.data.schema import Prepared
from raysft.pipeline.errors import ConfigError, DataError, RaysftError, causes
from raysft.pipeline.models.load import ADAPTER_DIR
from raysft.pipeline.models.source import base_model_path
from raysft.pipeline.models.tokenizer import load_tokenizer
from raysft.pipeline.tracking import finish_tracking, start_tracking
from raysft.pipeline.training import generate_eval
from raysft.pipeline.training import identity as run_identity
from raysft.pipeline.training.ledger import LEDGER_FILE


@dataclass
class TrainResult:
    """What a finished run gives back: final metrics (incl. eval_loss), the run folder, the adapter."""

    metrics: dict[str, Any]
    run_dir: Path | str  # a URI string when run.storage_path is on an object store
    adapter_path: Path | str
    checkpoint_path: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "adapter_path": str(self.adapter_path),
            "checkpoint_path": self.checkpoint_path,
            "metrics": {k: v for k, v in self.metrics.items() if isinstance(v, (int, float, str, bool)) or v is None},
        }


def run_dir_of(cfg: Config) -> Path | str:
    """The run folder: a local Path, or a URI string when run.storage_path is on an object store."""
    if storage.is_remote(cfg.run.storage_path):
        return storage.join(cfg.run.storage_path, cfg.run.name)
    return Path(cfg.run.storage_path).expanduser().resolve() / cfg.run.name


def local_dir_of(cfg: Config) -> Path:
    """Where this machine keeps the run's console log: the run folder, or ~/.cache/raysft/runs/NAME for a run
    folder on an object store."""
    run_dir = run_dir_of(cfg)
    return run_dir if isinstance(run_dir, Path) else Path.home() / ".cache" / "raysft" / "runs" / cfg.run.name


def preflight(cfg: Config) -> Config:
    """Check what can be checked without a cluster; return the config with resolved absolute paths."""
    if cfg.scaling.min_workers < 1:
        raise ConfigError("scaling.num_workers must be at least 1 for training.")
    check_elastic_settings(cfg)
    if cfg.model.dtype == "float16" or (cfg.model.quantization == "nf4" and cfg.model.compute_dtype == "float16"):
        raise ConfigError(
            "model.dtype / model.compute_dtype float16 is not supported with DeepSpeed and a 4-bit base; use bfloat16."
        )
    check_gpu_settings(cfg)
    from raysft.pipeline.training.loop import resolve_attention

    updates_first = {"model.attn_implementation": resolve_attention(cfg)}
    source = base_model_path(cfg.model, cfg.source)  # a GGUF is converted once here; workers read the HF folder
    updates: dict[str, Any] = dict(updates_first)
    if os.path.isdir(source):
        updates["model.name_or_path"] = source
        updates["model.gguf_file"] = None
    local_model = cfg.model.model_copy(update={"name_or_path": source, "gguf_file": None})
    load_tokenizer(cfg.model_copy(update={"model": local_model}))
    if storage.is_remote(cfg.run.storage_path):  # s3:// / gs://: reachable, bucket exists, credentials found
        storage.check_location(cfg.run.storage_path, storage.StorageOptions.of(cfg))
    else:
        local = Path(cfg.run.storage_path).expanduser()  # outputs: relative to the working directory
        _check_writable(local, "run.storage_path")
        if (local / cfg.run.name).exists():  # a run to resume: its folder must take checkpoints too
            _check_writable(local / cfg.run.name, "The run folder (run.storage_path/run.name)")
        updates["run.storage_path"] = str(local.resolve())
    ds = cfg.train.deepspeed.config
    if ds is not None:
        path = Path(cfg.resolve_path(ds) or ds)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed.config {ds} does not exist.")
        check_precision(cfg, read_deepspeed_json(path))
        updates["train.deepspeed.config"] = str(path.resolve())
    updates.update(generate_eval.preflight(cfg))  # prompts readable, metric loadable; their paths made absolute
    out = cfg.with_overrides(updates)
    object.__setattr__(out, "source", cfg.source)
    return out


def read_deepspeed_json(path: str | os.PathLike) -> dict:
    """The user's DeepSpeed config (train.deepspeed.config): readable JSON holding an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"train.deepspeed.config {path} is not readable JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"train.deepspeed.config {path} holds a JSON {type(data).__name__}, not an object of DeepSpeed settings."
        )
    return data


def check_elastic_settings(cfg: Config) -> None:
    """Every worker count Ray Train may pick must split the fixed global batch into whole micro-batches, and the
    checkpoint must be re-partitionable to it (training/checkpoint.py); said in one sentence before anything starts."""
    from raysft.pipeline.training.reader import accumulation

    s, t = cfg.scaling, cfg.train
    rows = cfg.rows_per_step()
    bad = [w for w in range(s.min_workers, s.max_workers + 1) if rows % (w * t.micro_batch_size)]
    if bad:
        if not s.elastic:
            accumulation(rows, bad[0], t.micro_batch_size)  # raises the fixed-size sentence
        shown = ", ".join(str(w) for w in bad)
        raise ConfigError(
            f"scaling.num_workers {s.num_workers} lets the run go on at {shown} worker(s), where a step's "
            f"{rows} packed rows (train.global_batch_rows, or max workers x grad_accum x micro_batch_size) do not "
            f"split into whole micro-batches of train.micro_batch_size {t.micro_batch_size}; set "
            "train.global_batch_rows to a multiple of micro_batch_size x every worker count in the range."
        )
    if not s.elastic:
        return
    if t.deepspeed.stage == 3:
        raise ConfigError(
            "scaling.num_workers [min, max] needs train.deepspeed.stage 0, 1 or 2: raysft cannot yet re-partition "
            "ZeRO-3 optimizer state to another worker count."
        )
    if s.placement_strategy.startswith("STRICT_"):
        raise ConfigError(
            f"scaling.num_workers [min, max] cannot use scaling.placement_strategy {s.placement_strategy}: Ray Train's "
            "elastic sizing counts workers by resources alone, so a strict placement it cannot meet would never start."
        )


def check_precision(cfg: Config, user_json: dict | None) -> None:
    """fp32 gradient accumulation at every ZeRO stage: DeepSpeed's stage 0 accumulates in the model's dtype
    (a bf16 model with fp32 accumulation is refused by DeepSpeed there), so stage 0 with bf16 is refused here."""
    zero = (user_json or {}).get("zero_optimization") or {"stage": cfg.train.deepspeed.stage}
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else cfg.train.deepspeed.stage
    if stage == 0 and cfg.model.dtype == "bfloat16":
        where = "train.deepspeed.config's zero_optimization.stage" if user_json else "train.deepspeed.stage"
        raise ConfigError(
            f"{where} 0 with model.dtype bfloat16 would accumulate gradients in bf16 (DeepSpeed accumulates in "
            "fp32 only at ZeRO stages 1-3); use stage 1 or higher, or model.dtype float32."
        )


def check_gpu_settings(cfg: Config) -> None:
    """Settings that would silently break a GPU run: several GPUs per worker, and a 4-bit storage dtype
    DeepSpeed recasts."""
    s, m = cfg.scaling, cfg.model
    if s.use_gpu and s.gpus_per_worker != 1:
        raise ConfigError(
            f"scaling.gpus_per_worker must be 1 with scaling.use_gpu (got {s.gpus_per_worker:g}): each worker is one "
            "rank on one GPU; use more scaling.num_workers instead."
        )
    check_precision(cfg, None)
    if m.quantization == "nf4" and m.quant_storage not in (None, "uint8", m.dtype):
        raise ConfigError(
            f"model.quant_storage {m.quant_storage} must be uint8 or equal to model.dtype ({m.dtype}): DeepSpeed "
            "recasts the packed 4-bit weights to model.dtype, which corrupts them in any other float dtype."
        )


def _check_writable(path: Path, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".raysft-write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError:
        raise ConfigError(f"{key} {path} is not writable.") from None


def check_cluster(cfg: Config) -> None:
    """Workers the cluster can never hold would wait forever, and storage a worker node cannot see would
    fail at the first checkpoint: say so instead, before anything starts (cluster_checks.py)."""
    check_workers_fit(cfg.scaling)
    if not storage.is_remote(cfg.run.storage_path):  # an object store is shared by construction
        check_shared_storage(run_dir_of(cfg).parent, cfg.scaling)
    model_dir = Path(cfg.model.name_or_path)  # preflight made a local model (or a converted GGUF) a folder
    if model_dir.is_dir() and (model_dir / "config.json").is_file():
        check_shared_storage(
            model_dir, cfg.scaling, what="The model folder (model.name_or_path)", probe_file="config.json"
        )


def read_index(directory: str | os.PathLike | None, what: str, cfg: Config):
    """The shard index of a prepared split (None for absent eval data): the driver reads no rows.

    A missing or truncated shard fails here, naming it, before any worker starts.
    """
    from raysft.pipeline.data.shards import has_rows, load_index
    from raysft.pipeline.storage import StorageOptions

    options = StorageOptions.of(cfg)
    if directory is None or (what == "eval" and not has_rows(str(directory), options)):
        return None
    return load_index(str(directory), options, what=what)


def remote_identity(cfg: Config, data_key: str, steps_per_epoch: int):
    """run.json on an object store: the same identity rule as a local run folder (a rerun with other settings,
    or with run.resume never, is refused in one sentence), then run.json and config.yaml are written. Ray Train
    resumes from its own snapshot in the bucket; checkpoint completeness is checked by `load` after download."""
    from raysft.pipeline.errors import CheckpointError
    from raysft.pipeline.models.load import RESOLVED_CONFIG

    options = storage.StorageOptions.of(cfg)
    run_dir = run_dir_of(cfg)
    ident = run_identity.identity(cfg, data_key)
    record = {
        "fingerprint": run_identity.fingerprint(ident),
        "identity": ident,
        "max_steps": cfg.train.max_steps,
        "epochs": cfg.train.epochs,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": cfg.train.max_steps or cfg.train.epochs * steps_per_epoch,
    }
    path = storage.join(run_dir, run_identity.IDENTITY_FILE)
    exists = storage.exists(path, options)
    if exists and cfg.run.resume == "never":
        raise CheckpointError(
            f"{run_dir} already holds a run named {cfg.run.name} and run.resume is 'never'; "
            "choose a new run.name, or set run.resume to auto to continue it."
        )
    if not exists and cfg.run.resume == "must":
        raise CheckpointError(f"run.resume is 'must' but {run_dir} holds no run named {cfg.run.name} to resume.")
    if exists:
        try:
            old = json.loads(storage.read_bytes(path, options))["fingerprint"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path} is not readable JSON with a 'fingerprint'; choose a new run.name.") from None
        if old != record["fingerprint"]:
            raise CheckpointError(
                f"Run {cfg.run.name} in {run_dir} was started with other settings; rerun it with "
                "the same settings to resume, or choose a new run.name."
            )
    storage.write_bytes(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), options)
    storage.write_bytes(storage.join(run_dir, RESOLVED_CONFIG), cfg.dump_yaml().encode(), options)
    return run_identity.Decision(run_dir, "resume" if exists else "new", record)


def build_trainer(
    cfg: Config, prepared: Prepared, *, callbacks: list | None = None, tracking_parent: dict | None = None
):
    """A TorchTrainer for `cfg` on `prepared` (train_dir, eval_dir); the caller calls `.fit()`.

    The driver reads only the shard index; each worker streams its steps' rows from the shards
    (training/reader.py), in an order that depends on (seed, epoch, index) only.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raysft.pipeline.console import WorkerFailures
    from raysft.pipeline.training.loop import train_loop_per_worker
    from raysft.pipeline.training.reader import StepLayout

    check_cluster(cfg)
    if not storage.is_remote(str(prepared.train_dir)):  # every worker streams its rows from these shards
        check_shared_storage(Path(prepared.train_dir), cfg.scaling, what="The prepared data (data.cache_dir)")
    train_index = read_index(prepared.train_dir, "train", cfg)
    eval_index = read_index(getattr(prepared, "eval_dir", None), "eval", cfg)
    s, t = cfg.scaling, cfg.train
    layout = StepLayout(train_index.rows, cfg.rows_per_step(), t.max_steps, t.epochs).require_a_step(
        s.max_workers, t.grad_accum, t.micro_batch_size
    )
    # Identity check before anything is written or any worker starts; a refusal leaves the folder as it was.
    if storage.is_remote(cfg.run.storage_path):
        decision = remote_identity(cfg, prepared.key, layout.steps_per_epoch)
    else:
        decision = run_identity.decide(cfg, prepared.key, run_dir_of(cfg), steps_per_epoch=layout.steps_per_epoch)
    ds_json = read_deepspeed_json(t.deepspeed.config) if t.deepspeed.config else None
    if not storage.is_remote(cfg.run.storage_path):
        run_identity.apply(decision, cfg.dump_yaml())
    run_dir = decision.run_dir
    storage_path, storage_fs = storage.ray_storage(cfg.run.storage_path, storage.StorageOptions.of(cfg))
    # MLflow / W&B runs (rank 0 logs into them); a resumed run keeps its runs, a fresh start makes new ones.
    if storage.is_remote(run_dir) and (t.logging.mlflow or t.logging.wandb):
        raise ConfigError(
            "train.logging.mlflow / wandb keep their handles in the run folder, which must be local; "
            "turn them off or use a local run.storage_path."
        )
    start_tracking(cfg, run_dir, tracking_parent, fresh=decision.resume_from is None)
    loop_config = {
        "resume_from": decision.resume_from,
        "config": cfg.to_dict(),
        "train_index": train_index.to_dict(),
        "eval_index": eval_index.to_dict() if eval_index is not None and eval_index.rows else None,
        "run_dir": str(run_dir),
        "deepspeed_json": ds_json,
    }
    resources = worker_bundle(s)
    max_failures = cfg.run.max_failures
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            # [min, max]: Ray Train's elastic group (starts at min, resizes at its checks, restarts at what fits)
            num_workers=(s.min_workers, s.max_workers) if s.elastic else s.num_workers,
            elastic_resize_monitor_interval_s=s.resize_check_s,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        validation_config=generate_eval.validation_config(cfg, run_dir),  # train.eval_generate, off the workers
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,  # None for a folder; for s3:// / gs://, pyarrow's (no credentials in it)
            # A controller that cannot schedule workers fails after as many tries as a worker group may.
            failure_config=FailureConfig(
                max_failures=max_failures, controller_failure_limit=max_failures if max_failures >= 0 else -1
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            # recoveries, for the console (which follows the run folder, local or on an object store)
            callbacks=[*(callbacks or []), WorkerFailures(str(run_dir), storage.StorageOptions.of(cfg))],
        ),
    )


def publish_adapter(run_dir: Path, checkpoint_dir: Path) -> Path:
    """The final adapter and ledger of a checkpoint folder, copied into the run folder (Ray or torchrun run)."""
    adapter = run_dir / ADAPTER_DIR
    if adapter.exists():
        shutil.rmtree(adapter)
    shutil.copytree(checkpoint_dir / ADAPTER_DIR, adapter)
    if (checkpoint_dir / LEDGER_FILE).is_file():
        shutil.copyfile(checkpoint_dir / LEDGER_FILE, run_dir / LEDGER_FILE)
    return adapter


def finish_run(cfg: Config, result) -> TrainResult:
    """Copy the final adapter and ledger out of the last checkpoint into the run folder."""
    run_dir = run_dir_of(cfg)
    adapter = storage.join(run_dir, ADAPTER_DIR) if isinstance(run_dir, str) else run_dir / ADAPTER_DIR
    ckpt = result.checkpoint
    if ckpt is None:
        raise DataError(f"Run {run_dir} finished without a checkpoint.")
    if isinstance(run_dir, str):  # on an object store: copy store to store, nothing through a local folder
        import pyarrow.fs as pafs

        fs, path = storage.resolve(adapter, storage.StorageOptions.of(cfg))
        pafs.copy_files(
            f"{ckpt.path}/{ADAPTER_DIR}", path, source_filesystem=ckpt.filesystem, destination_filesystem=fs
        )
    else:
        with ckpt.as_directory() as d:
            publish_adapter(run_dir, Path(d))
    metrics = {k: v for k, v in (result.metrics or {}).items()}
    finish_tracking(run_dir, adapter)
    return TrainResult(metrics=metrics, run_dir=run_dir, adapter_path=adapter, checkpoint_path=ckpt.path)


def train(cfg: Config) -> TrainResult:
    """Prepare (or reuse the cache), then train with Ray Train; returns metrics, run dir and adapter path."""
    from raysft.pipeline.data.plan import ensure_prepared, resolve_inputs

    cfg = preflight(cfg)
    if not storage.is_remote(cfg.run.storage_path) and (run_dir_of(cfg).exists() or cfg.run.resume == "must"):
        run_identity.decide(cfg, resolve_inputs(cfg).key, run_dir_of(cfg))  # a rerun: refuse a mismatch before any work
    with ray_runtime.session(cfg.run.address, ray_runtime.TRAIN):
        check_cluster(cfg)
        prepared = ensure_prepared(cfg)
        trainer = build_trainer(cfg, prepared)
        try:
            result = fit(trainer, run_dir_of(cfg))
        except BaseException:
            finish_tracking(run_dir_of(cfg), None, status="FAILED")
            raise
        return finish_run(cfg, result)


def fit(trainer, run_dir: Path):
    """`trainer.fit()`, its failures said as a user can act on them instead of Ray's tracebacks: Ctrl-C as
    KeyboardInterrupt (the CLI: exit 130, "resume with the same command"), an error a worker raised for the
    user to fix (e.g. no space for a checkpoint) as that one sentence, and a checkpoint list naming a deleted
    checkpoint as one sentence.

    Ray Train answers SIGINT with its own handler (abort the run, then SystemExit or a Ray error from
    wherever the driver waited) and leaves that handler installed; a signal wake-up fd sees the SIGINT
    whichever Python handler ran, and the previous handler is put back.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _fit(trainer, run_dir)
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    handler, wakeup = signal.getsignal(signal.SIGINT), signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    try:
        return _fit(trainer, run_dir)
    except BaseException:
        try:
            seen = os.read(read, 4096)
        except BlockingIOError:
            seen = b""
        if signal.SIGINT in seen:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.set_wakeup_fd(wakeup)
        signal.signal(signal.SIGINT, handler)
        os.close(read)
        os.close(write)


def _fit(trainer, run_dir: Path):
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except Exception as exc:
        # Raised in the Train controller's constructor, it reaches the driver as text inside an ActorDiedError.
        if any("CheckpointManagerInitializationError" in f"{type(e).__name__}: {e}" for e in causes(exc)):
            raise DataError(
                f"The run folder {run_dir} lists a checkpoint that no longer exists (in "
                "checkpoint_manager_snapshot.json); restore it, or train under a new run.name."
            ) from None
        if not isinstance(exc, TrainingFailedError):
            raise
        for failure in (getattr(exc, "worker_failures", None) or {}).values():
            original = getattr(failure, "cause", None) or failure  # Ray wraps it in a RayTaskError
            if isinstance(original, RaysftError):
                kind = next(
                    c
                    for c in type(original).__mro__
                    if issubclass(c, RaysftError) and c.__module__.startswith("raysft.")
                )
                raise kind(str(original.args[0]) if original.args else str(original)) from None
        raise
