"""The same per-worker loop without Ray: plain torch.distributed, launched by torchrun (or any launcher
that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT).

    torchrun --nproc-per-node 2 -m raysft.pipeline.training.torchrun_entry CONFIG --prepared DIR [--set k=v ...]
    python -m raysft.pipeline.training.torchrun_entry CONFIG --prepared DIR     # one process, world size 1

DIR is what `raysft prepare --output DIR` writes (train/, eval/, stats.json). The run folder is
run.storage_path/run.name, laid out as a Ray run's: checkpoint_NNNNNN/ (every rank's part),
metrics.jsonl, samples.jsonl, adapter/. A second start with the same run folder resumes from its
latest complete checkpoint. Backend: nccl with scaling.use_gpu, else gloo. No Ray import anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from raysft.pipeline import storage
from raysft.pipeline.cli import add_config_args
from raysft.pipeline.config import load_config
from raysft.pipeline.data.shards import has_rows, load_index
from raysft.pipeline.errors import ConfigError, RaysftError
from raysft.pipeline.run_folder import run_dir_of
from raysft.pipeline.storage import StorageOptions
from raysft.pipeline.trainer import preflight, publish_adapter
from raysft.pipeline.training import collectives
from raysft.pipeline.training.checkpoint import problem
from raysft.pipeline.training.engine import read_deepspeed_json
from raysft.pipeline.training.loop import run_worker
from raysft.pipeline.training.reader import StepLayout


class TorchrunContext:
    """WorkerContext over torch.distributed: checkpoints land in run_dir/checkpoint_NNNNNN."""

    def __init__(self, run_dir: Path, device: torch.device, keep: int = 2):
        self.rank, self.world_size = collectives.rank(), collectives.world_size()
        self.device = device
        self.run_dir = run_dir
        self.keep = keep

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
        dest = self.run_dir / f"checkpoint_{step:06d}"
        shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        collectives.barrier()  # every rank's part (sealed by its manifest) is in place
        if self.rank == 0:
            for old in complete_checkpoints(self.run_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        collectives.barrier()

    def drain_notice(self) -> None:
        """No runtime announces drains here; SIGTERM (training/preemption.py) is the notice."""
        return None

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = complete_checkpoints(self.run_dir)
        yield found[-1] if found else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders whose every rank's manifest verifies (checkpoint.problem), oldest first."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and problem(p) is None)


def check_local_storage(storage_path: str) -> None:
    """This entry writes its run folder with local file operations; an object store is refused in one sentence
    (rather than a `mkdir` on an s3:// string): run such a run through Ray (`raysft train`), which stages it."""
    if storage.is_remote(storage_path):
        raise ConfigError(
            f"run.storage_path {storage_path} is an object store, which the torchrun entry cannot write yet; "
            "use a local or shared folder here, or `raysft train` for s3:// / gs:// storage."
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m raysft.pipeline.training.torchrun_entry", description=__doc__.split("\n\n")[0]
    )
    add_config_args(p)  # CONFIG and --set, as `raysft train` takes them
    p.add_argument("--prepared", required=True, help="a folder written by `raysft prepare --output` (train/, eval/)")
    return p.parse_args(argv)


def run(config: str, prepared: str, overrides: list[str]) -> Path:
    """Initialise the process group, run the worker loop, publish the adapter (rank 0); returns the run folder."""
    cfg = load_config(config, overrides)
    check_local_storage(cfg.run.storage_path)
    cfg = preflight(cfg)
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
        run_dir.mkdir(parents=True, exist_ok=True)
        ctx = TorchrunContext(run_dir, device, keep=cfg.train.keep_checkpoints)
        ds_json = read_deepspeed_json(cfg.train.deepspeed.config) if cfg.train.deepspeed.config else None
        run_worker(cfg, ctx, train_index, eval_index, run_dir, ds_json, rows_per_step=rows)
        collectives.barrier()
        if ctx.rank == 0:
            publish_adapter(run_dir, complete_checkpoints(run_dir)[-1])
        return run_dir
    finally:
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
