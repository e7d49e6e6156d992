"""A WorkerContext whose reports keep rank 0's staged run files (`run_folder.RunFolder`) published: at every
checkpoint, and every few seconds for the progress files the driver's console follows."""

from __future__ import annotations

from pathlib import Path

from raysft.pipeline.run_folder import RunFolder


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

    def report_would_wait(self) -> bool:
        return self.ctx.report_would_wait()

    def progress(self) -> None:
        if self.folder is not None:
            self.folder.push_progress()
        self.ctx.progress()

    def drain_notice(self):
        return self.ctx.drain_notice()

    def latest_checkpoint(self):
        return self.ctx.latest_checkpoint()
