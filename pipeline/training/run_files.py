"""The files rank 0 keeps in the run folder (metrics.jsonl, events.jsonl, samples.jsonl, TensorBoard
events), wherever the run folder is.

A local run folder is written in place. For a run folder on an object store (`run.storage_path` as
s3:// or gs://) rank 0 writes a local staging copy, filled from the store when the worker group
(re)starts and uploaded after every checkpoint and at the end, so a restarted group on any node
continues the same files and no node reads another node's disk. Checkpoints go through Ray Train.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from raysft.pipeline import storage
from raysft.pipeline.storage import StorageOptions

SYNCED = ("metrics.jsonl", "events.jsonl", "samples.jsonl", "tensorboard")


class RunFolder:
    """Rank 0's view of the run folder: `local` is where it writes; `push()` publishes a remote run's files."""

    def __init__(self, run_dir: str, options: StorageOptions | None = None) -> None:
        self.uri, self.options = str(run_dir), options or StorageOptions()
        self.remote = storage.is_remote(self.uri)
        if not self.remote:
            self.local = Path(self.uri)
            return
        self.local = Path(tempfile.mkdtemp(prefix="raysft-run-"))
        for name in SYNCED:
            storage.download(storage.join(self.uri, name), self.local / name, self.options)

    def push(self) -> None:
        if not self.remote:
            return
        for name in SYNCED:
            if (self.local / name).exists():
                storage.upload(self.local / name, storage.join(self.uri, name), self.options)

    def close(self) -> None:
        self.push()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


class SyncedContext:
    """A WorkerContext whose checkpoint reports first publish rank 0's staged run files (`RunFolder.push`),
    so the files a restarted group downloads are never older than the checkpoint it resumes from."""

    def __init__(self, ctx, folder: RunFolder | None) -> None:
        self.ctx, self.folder = ctx, folder
        self.rank, self.world_size, self.device = ctx.rank, ctx.world_size, ctx.device

    def report(
        self,
        metrics: dict,
        checkpoint_dir: Path | None = None,
        step: int = 0,
        validation: bool = False,
        durable: bool = False,
    ) -> None:
        if checkpoint_dir is not None and self.folder is not None:
            self.folder.push()
        self.ctx.report(metrics, checkpoint_dir=checkpoint_dir, step=step, validation=validation, durable=durable)

    def drain_notice(self):
        return self.ctx.drain_notice()

    def latest_checkpoint(self):
        return self.ctx.latest_checkpoint()
