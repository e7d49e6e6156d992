"""The same per-worker loop without Ray: plain torch.distributed, launched by torchrun (or any launcher
that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT).

    torchrun --nproc-per-node 2 -m raysft.pipeline.training.torchrun_entry CONFIG --prepared DIR [--set k=v ...]
    python -m raysft.pipeline.training.torchrun_entry CONFIG --prepared DIR     # one process, world size 1

DIR is what `raysft prepare --output DIR` writes (train/, eval/, stats.json). The run folder is
run.storage_path/run.name, laid out as a Ray run's: checkpoint_NNNNNN/ (every rank's part),
metrics.jsonl, samples.jsonl, adapter/. A second start with the same run folder resumes from its
latest complete checkpoint. Backend: nccl with scaling.use_gpu, else gloo. No Ray import anywhere.

On an object store (s3:// or gs:// run.storage_path) rank 0 writes its files into a staging copy
(run_folder.RunFolder, as a Ray run's rank 0 does) published at each checkpoint; every rank uploads its
part of a checkpoint, rank 0 prunes the old ones, and a resume downloads the newest complete one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from raysft.pipeline import storage
from raysft.pipeline.cli import add_config_args
from raysft.pipeline.config import load_config
from raysft.pipeline.data.shards import has_rows, load_index
from raysft.pipeline.errors import RaysftError
from raysft.pipeline.run_folder import ADAPTER_DIR, LEDGER_FILE, RunFolder, run_dir_of
from raysft.pipeline.storage import StorageOptions
from raysft.pipeline.trainer import preflight, publish_adapter
from raysft.pipeline.training import collectives
from raysft.pipeline.training.checkpoint import problem
from raysft.pipeline.training.engine import read_deepspeed_json
from raysft.pipeline.training.loop import run_worker
from raysft.pipeline.training.reader import StepLayout
from raysft.pipeline.training.run_files import SyncedContext


class TorchrunContext:
    """WorkerContext over torch.distributed: checkpoints land in run_dir/checkpoint_NNNNNN (a folder or a URI)."""

    def __init__(
        self, run_dir: Path | str, device: torch.device, keep: int = 2, options: StorageOptions | None = None
    ) -> None:
        self.rank, self.world_size = collectives.rank(), collectives.world_size()
        self.device = device
        self.run_dir = run_dir
        self.keep = keep
        self.options = options or StorageOptions()

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: Path | None = None,
        step: int = 0,
        validation: bool = False,
        durable: bool = True,
    ) -> None:
        """`validation` is ignored: the generation eval is Ray Train's checkpoint validation (no Ray here).
        Checkpoints are always copied in place before this returns (`durable`)."""
        if checkpoint_dir is None:
            return  # metrics.jsonl (rank 0) is the record; nothing to synchronise
        name = f"checkpoint_{step:06d}"
        if isinstance(self.run_dir, Path):
            shutil.copytree(checkpoint_dir, self.run_dir / name, dirs_exist_ok=True)
        else:
            storage.upload(checkpoint_dir, storage.join(self.run_dir, name), self.options)  # this rank's part
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        collectives.barrier()  # every rank's part (sealed by its manifest) is in place
        if self.rank == 0:
            if isinstance(self.run_dir, Path):
                for old in complete_checkpoints(self.run_dir)[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                for old in checkpoint_names(self.run_dir, self.options)[: -self.keep]:
                    storage.remove_tree(storage.join(self.run_dir, old), self.options)
        collectives.barrier()

    def report_would_wait(self) -> bool:
        return False  # metrics reports go nowhere (see report)

    def progress(self) -> None:
        pass

    def drain_notice(self) -> None:
        """No runtime announces drains here; SIGTERM (training/preemption.py) is the notice."""
        return None

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        if isinstance(self.run_dir, Path):
            found = complete_checkpoints(self.run_dir)
            yield found[-1] if found else None
            return
        with tempfile.TemporaryDirectory(prefix="raysft-resume-") as tmp:
            yield latest_remote_checkpoint(self.run_dir, Path(tmp), self.options)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders whose every rank's manifest verifies (checkpoint.problem), oldest first."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and problem(p) is None)


def checkpoint_names(run_uri: str, options: StorageOptions) -> list[str]:
    """The checkpoint_NNNNNN folders of a run folder on an object store, oldest first."""
    base = run_uri.rstrip("/") + "/"
    names = {uri[len(base) :].split("/", 1)[0] for uri, _ in storage.list_files(run_uri, "", options)}
    return sorted(n for n in names if n.startswith("checkpoint_"))


def latest_remote_checkpoint(run_uri: str, into: Path, options: StorageOptions) -> Path | None:
    """The newest checkpoint of an object-store run folder that verifies, downloaded into `into`; None if none."""
    for name in reversed(checkpoint_names(run_uri, options)):
        local = into / name
        storage.download(storage.join(run_uri, name), local, options)
        if problem(local) is None:
            return local
        shutil.rmtree(local, ignore_errors=True)
    return None


def publish_remote_adapter(run_uri: str, options: StorageOptions) -> str:
    """The final adapter (and ledger) of the newest checkpoint, copied store to store into the run folder."""
    name = checkpoint_names(run_uri, options)[-1]
    adapter = storage.join(run_uri, ADAPTER_DIR)
    storage.remove_tree(adapter, options)  # objects are replaced, not merged with a stale adapter's
    storage.copy_tree(storage.join(run_uri, name, ADAPTER_DIR), adapter, options)
    ledger = storage.join(run_uri, name, LEDGER_FILE)
    if storage.exists(ledger, options):
        storage.copy_tree(ledger, storage.join(run_uri, LEDGER_FILE), options)
    return adapter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m raysft.pipeline.training.torchrun_entry", description=__doc__.split("\n\n")[0]
    )
    add_config_args(p)  # CONFIG and --set, as `raysft train` takes them
    p.add_argument("--prepared", required=True, help="a folder written by `raysft prepare --output` (train/, eval/)")
    return p.parse_args(argv)


def run(config: str, prepared: str, overrides: list[str]) -> Path | str:
    """Initialise the process group, run the worker loop, publish the adapter (rank 0); returns the run folder."""
    cfg = load_config(config, overrides)
    cfg = preflight(cfg)  # an object store: reachable, its bucket there, credentials found
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    if cfg.scaling.use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        collectives.init("nccl", device)
    else:
        device = torch.device("cpu")
        collectives.init("gloo")
    folder: RunFolder | None = None
    try:
        # Only the shard indexes here; each rank streams its own steps' rows from the shards (training/reader.py).
        options = StorageOptions.of(cfg)
        train_index = load_index(str(Path(prepared) / "train"), options)
        eval_dir = str(Path(prepared) / "eval")
        eval_index = load_index(eval_dir, options, what="eval") if has_rows(eval_dir, options) else None
        t, world = cfg.train, collectives.world_size()
        # torchrun fixes the world size: the global batch is train.global_batch_rows, or this world's
        rows = cfg.rows_per_step(cfg.scaling.max_workers if cfg.scaling.elastic else world)
        StepLayout(train_index.rows, rows, t.max_steps, t.epochs).require_a_step(
            world, t.grad_accum, t.micro_batch_size
        )
        run_dir = run_dir_of(cfg)
        ctx = TorchrunContext(run_dir, device, keep=cfg.train.keep_checkpoints, options=options)
        ds_json = read_deepspeed_json(cfg.train.deepspeed.config) if cfg.train.deepspeed.config else None
        if isinstance(run_dir, Path):
            run_dir.mkdir(parents=True, exist_ok=True)
            run_worker(cfg, ctx, train_index, eval_index, run_dir, ds_json, rows_per_step=rows)
        else:  # rank 0 stages its files, published at each checkpoint and at the end; other ranks write none
            folder = RunFolder(run_dir, options) if ctx.rank == 0 else None
            staged = folder.local if folder is not None else Path(tempfile.mkdtemp(prefix="raysft-rank-"))
            run_worker(cfg, SyncedContext(ctx, folder), train_index, eval_index, staged, ds_json, rows_per_step=rows)
        collectives.barrier()
        if ctx.rank == 0:
            if isinstance(run_dir, Path):
                publish_adapter(run_dir, complete_checkpoints(run_dir)[-1])
            else:
                publish_remote_adapter(run_dir, options)
        return run_dir
    finally:
        if folder is not None:
            folder.close()
        collectives.destroy()


def main(argv: list[str] | None = None) -> int:

    args = parse_args(argv)
    try:
        run_dir = run(args.config, args.prepared, args.overrides)
    except RaysftError as exc:
        print(f"raysft: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[raysft] run folder {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
