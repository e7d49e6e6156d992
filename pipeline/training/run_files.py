"""The files rank 0 keeps in the run folder (metrics.jsonl, events.jsonl, samples.jsonl, TensorBoard
events), wherever the run folder is.

A local run folder is written in place. For a run folder on an object store (`run.storage_path` as
s3:// or gs://) rank 0 writes a local staging copy, filled from the store when the worker group
(re)starts and uploaded after every checkpoint and at the end, so a restarted group on any node
continues the same files and no node reads another node's disk. Between checkpoints the small progress
files (metrics.jsonl, events.jsonl) are also published at most every PROGRESS_PUSH_S seconds, for the
driver's console (console.RunFollower) to follow; a restarted group rewinds metrics.jsonl to its checkpoint.
Checkpoints go through Ray Train.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from raysft.pipeline import storage
from raysft.pipeline.storage import StorageOptions

SYNCED = ("metrics.jsonl", "events.jsonl", "samples.jsonl", "tensorboard")
PROGRESS = ("metrics.jsonl", "events.jsonl")  # what the console follows between checkpoints
PROGRESS_PUSH_S = 5.0  # at most one small upload per file this often (the first report pushes at once)


class RunFolder:
    """Rank 0's view of the run folder (or the sweep driver's of its sweep folder): `local` is where it writes;
    `push()` publishes the `names` of a remote folder."""

    def __init__(self, run_dir: str, options: StorageOptions | None = None, names: tuple[str, ...] = SYNCED) -> None:
        self.uri, self.options, self.names = str(run_dir), options or StorageOptions(), names
        self.remote = storage.is_remote(self.uri)
        self._pushed_at = 0.0
        if not self.remote:
            self.local = Path(self.uri)
            return
        self.local = Path(tempfile.mkdtemp(prefix="raysft-run-"))
        for name in names:
            storage.download(storage.join(self.uri, name), self.local / name, self.options)

    def push(self, names: tuple[str, ...] | None = None) -> None:
        if not self.remote:
            return
        for name in names or self.names:
            if (self.local / name).exists():
                storage.upload(self.local / name, storage.join(self.uri, name), self.options)
        self._pushed_at = time.monotonic()

    def push_progress(self, every_s: float = PROGRESS_PUSH_S) -> None:
        """Publish metrics.jsonl and events.jsonl when the last push is `every_s` old (cheap: two small PUTs)."""
        if self.remote and time.monotonic() - self._pushed_at >= every_s:
            self.push(PROGRESS)

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
        if self.folder is not None and checkpoint_dir is not None:
            self.folder.push()
        elif self.folder is not None:
            self.folder.push_progress()
        self.ctx.report(metrics, checkpoint_dir=checkpoint_dir, step=step, validation=validation, durable=durable)

    def drain_notice(self):
        return self.ctx.drain_notice()

    def latest_checkpoint(self):
        return self.ctx.latest_checkpoint()
