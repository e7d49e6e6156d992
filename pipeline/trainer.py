"""Build and fit the Ray Train TorchTrainer; `train(cfg)` is the Python API behind `raysft train`.

Bad input fails here, on the driver, in one sentence, before any worker starts: a missing model, a
tokenizer without a chat template, more workers than the cluster has CPUs/GPUs, an unwritable
storage path, fp16 with DeepSpeed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysft.pipeline import lease, ray_recovery, ray_runtime, storage
from raysft.pipeline.cluster_checks import check_shared_storage, check_workers_fit, worker_bundle
from raysft.pipeline.config import Config
from raysft.pipeline.data.plan import ensure_prepared, resolve_inputs
from raysft.pipeline.data.schema import Prepared
from raysft.pipeline.data.shards import has_rows, load_index
from raysft.pipeline.data.spec_cache import load_tokenizer_spec
from raysft.pipeline.errors import ConfigError, DataError, RaysftError, WorkerError, causes
from raysft.pipeline.models import precision
from raysft.pipeline.models.source import base_model_path
from raysft.pipeline.run_folder import ADAPTER_DIR, LEDGER_FILE, LOG_FILE, local_dir_of, run_dir_of
from raysft.pipeline.storage import StorageOptions
from raysft.pipeline.tracking import finish_tracking, start_tracking
from raysft.pipeline.training import generate_eval
from raysft.pipeline.training import identity as run_identity
from raysft.pipeline.training.engine import check_precision, read_deepspeed_json
from raysft.pipeline.training.loop import resolve_attention, train_loop_per_worker
from raysft.pipeline.training.reader import StepLayout


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


def hold_run_folder(
    cfg: Config, run_dir: Path | str | None = None, wait_elsewhere: bool = False
) -> contextlib.AbstractContextManager:
    """The run folder's lease (pipeline/lease.py) for as long as this process writes it: a second train, tune trial
    or submit of the run is refused in one sentence naming this process."""
    run_dir = run_dir if run_dir is not None else run_dir_of(cfg)
    options = storage.StorageOptions.of(cfg)
    return lease.hold(lease.in_folder(run_dir), f"The run folder {run_dir}", options, wait_elsewhere=wait_elsewhere)


def preflight(cfg: Config) -> Config:
    """Check what can be checked without a cluster; return the config with resolved absolute paths."""
    if cfg.scaling.min_workers < 1:
        raise ConfigError("scaling.num_workers must be at least 1 for training.")
    # dtype auto: decided here, once, from the hardware (logged; the console says it). The rules between fields
    # (dtypes, GPUs, how the global batch splits over every worker count) are Config's: refused at load time, and
    # checked again on the resolved dtypes (resolve goes through with_overrides; config.py, _rules_between_fields).
    cfg = precision.resolve(cfg)
    check_precision(cfg, None)  # on the resolved dtype: ZeRO stage 0 would accumulate bf16 gradients in bf16
    # attention auto: flash_attention_2 on GPUs with flash-attn importable, else sdpa; an explicit flash without it
    # is refused here (training/loop.resolve_attention)
    updates_first = {"model.attn_implementation": resolve_attention(cfg)}
    source = base_model_path(cfg.model, cfg.source)  # a GGUF is converted once here; workers read the HF folder
    updates: dict[str, Any] = dict(updates_first)
    if os.path.isdir(source):
        updates["model.name_or_path"] = source
        updates["model.gguf_file"] = None
    local_model = cfg.model.model_copy(update={"name_or_path": source, "gguf_file": None})
    # The tokenizer's checks (found, fast, a chat template where the format needs one) through the cached spec:
    # on an unchanged tokenizer folder the driver never imports transformers (~3 s of CPU; data/spec_cache.py).
    load_tokenizer_spec(cfg.model_copy(update={"model": local_model}))
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
    options = StorageOptions.of(cfg)
    if directory is None or (what == "eval" and not has_rows(str(directory), options)):
        return None
    return load_index(str(directory), options, what=what)


def build_trainer(
    cfg: Config, prepared: Prepared, *, callbacks: list | None = None, tracking_parent: dict | None = None
):
    """A TorchTrainer for `cfg` on `prepared` (train_dir, eval_dir); the caller calls `.fit()`.

    The driver reads only the shard index; each worker streams its steps' rows from the shards
    (training/reader.py), in an order that depends on (seed, epoch, index) only.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train's callback class: the console imports ray.train
    from raysft.pipeline.console import WorkerFailures

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
    options = storage.StorageOptions.of(cfg)
    decision = run_identity.decide(cfg, prepared.key, run_dir_of(cfg), layout.steps_per_epoch, options)
    ds_json = read_deepspeed_json(t.deepspeed.config) if t.deepspeed.config else None
    run_identity.apply(decision, cfg.dump_yaml(), options)
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
            # A controller that cannot schedule workers fails after as long a wait as with Ray's defaults,
            # in shorter tries (ray_recovery.py).
            failure_config=FailureConfig(
                max_failures=max_failures, controller_failure_limit=ray_recovery.controller_failure_limit(max_failures)
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
    cfg = preflight(cfg)
    if not storage.is_remote(cfg.run.storage_path) and (run_dir_of(cfg).exists() or cfg.run.resume == "must"):
        run_identity.decide(cfg, resolve_inputs(cfg).key, run_dir_of(cfg))  # a rerun: refuse a mismatch before any work
    with hold_run_folder(cfg), ray_runtime.session(cfg.run.address, ray_runtime.TRAIN):
        check_cluster(cfg)
        prepared = ensure_prepared(cfg)
        trainer = build_trainer(cfg, prepared)
        try:
            result = fit(trainer, run_dir_of(cfg), log_file=local_dir_of(cfg) / LOG_FILE)
        except BaseException:
            finish_tracking(run_dir_of(cfg), None, status="FAILED")
            raise
        return finish_run(cfg, result)


def fit(trainer, run_dir: Path, log_file: Path | None = None):
    """`trainer.fit()`, its failures said as a user can act on them instead of Ray's tracebacks: Ctrl-C as
    KeyboardInterrupt (the CLI: exit 130, "resume with the same command"), an error a worker raised for the
    user to fix (e.g. no space for a checkpoint) as that one sentence, a checkpoint list naming a deleted
    checkpoint as one sentence, and any other worker failure (model load, import, out of memory) as a
    `WorkerError` naming the cause and `log_file`, where the full traceback is written.

    Ray Train answers SIGINT with its own handler (abort the run, then SystemExit or a Ray error from
    wherever the driver waited) and leaves that handler installed; a signal wake-up fd sees the SIGINT
    whichever Python handler ran, and the previous handler is put back.
    """
    if threading.current_thread() is not threading.main_thread():
        return _fit(trainer, run_dir, log_file)
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    handler, wakeup = signal.getsignal(signal.SIGINT), signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    try:
        return _fit(trainer, run_dir, log_file)
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


def _fit(trainer, run_dir: Path, log_file: Path | None):
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
        raise worker_error(exc, log_file) from None


def worker_error(exc: BaseException, log_file: Path | None) -> WorkerError:
    """One sentence for a failed run: which worker, the cause's type and first line, where the traceback is.

    The whole traceback (the worker's, as Ray carried it) is written to stderr first: under the CLI that is
    the run's raysft.log, for the Python API the terminal."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        rank, failure = min(failures.items())
        original, who = getattr(failure, "cause", None) or failure, f"Training worker rank {rank}"
        print(f"raysft: training worker rank {rank} failed:\n{failure}", file=sys.stderr, flush=True)
    else:
        inner = [e for e in causes(exc) if e is not exc]
        original, who = (inner[-1] if inner else exc), "Training"
        print(f"raysft: training failed:\n{exc}", file=sys.stderr, flush=True)
    first = (str(original).strip().splitlines() or [""])[0][:300]
    where = f"the traceback is in {log_file}" if log_file is not None and log_file.exists() else "traceback above"
    return WorkerError(f"{who} failed: {type(original).__name__}: {first} ({where}).")
