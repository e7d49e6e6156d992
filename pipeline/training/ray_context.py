"""The Ray Train implementation of `WorkerContext` (training/context.py)."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from raysft.pipeline.training.checkpoint import resume_checkpoint
from raysft.pipeline.training.preemption import Notice


class RayTrainContext:
    """Rank and device from `ray.train`; `ray.train.report` (a barrier) carries metrics and checkpoints."""

    def __init__(self, resume_from: str | None = None, upload: str = "async") -> None:
        import ray.train
        import ray.train.torch

        self.resume_from = resume_from  # the driver's verified checkpoint, used when Ray registered none newer
        self.upload = upload  # train.checkpoint_upload: "async" (Ray uploads in a thread) or "sync"
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: Path | None = None,
        step: int = 0,
        validation: bool = False,
        durable: bool = False,
    ) -> None:
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        if checkpoint_dir is None:
            ray.train.report(metrics)  # SYNC: waits for an upload still running (reports are processed in order)
            return
        # ASYNC: Ray's upload thread copies the folder and then deletes it (delete_local_checkpoint_after_upload);
        # the folder must stay untouched until then. The next report waits for it, so the upload overlaps one
        # step and at most one is in flight. Ray registers the checkpoint once every rank's copy is done, so a
        # group stopped mid-upload resumes from the previous one (identity.py sets the partial folder aside).
        # `durable` (a preemption notice stands): SYNC, the checkpoint is in storage before the step goes on.
        sync = durable or self.upload == "sync"
        mode = CheckpointUploadMode.SYNC if sync else CheckpointUploadMode.ASYNC
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(str(checkpoint_dir)),
            checkpoint_dir_name=f"checkpoint_{step:06d}",
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
            validation=validation,
        )
        if mode == CheckpointUploadMode.SYNC:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # Ray deleted it already; nothing else holds it
        if durable:  # the next step starts once Ray has this checkpoint: a restart then loses at most that step
            wait_until_taken(REGISTRATION_WAIT_S)

    def report_would_wait(self) -> bool:
        """Ray Train's queue of one still holds this worker's last report."""
        return not _result_queue().empty()

    def progress(self) -> None:
        pass

    def drain_notice(self) -> Notice | None:
        """The node drain Ray Train's preemption watcher announced to this worker, or None (no RPC)."""
        info = ray_preemption_info()
        if info is None:
            return None
        deadline = info.deadline_ms / 1000.0 if info.deadline_ms else None
        ranks = ",".join(str(r) for r in info.preempted_ranks)
        return Notice(f"node drain (ranks {ranks})", deadline)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        resume = resume_checkpoint(ray.train.get_checkpoint(), self.resume_from, self.rank)
        if resume is None:
            yield None
            return
        with resume.as_directory() as d:
            yield Path(d)


REGISTRATION_WAIT_S = 30.0  # the controller takes a report at its next poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 1 s)


def wait_until_taken(timeout_s: float) -> bool:
    """Wait until Ray Train's controller has taken this worker's last report (False after `timeout_s`).

    PRIVATE Ray API, isolated here: a worker's reports wait in a queue of one (`result_queue`) until the
    controller's next poll takes them; it registers a checkpoint once it has every rank's report. The queue holds
    one report, so without this wait a worker runs a step ahead of its last report: after a drain notice, a
    node lost then can cost the step in flight and the one whose checkpoint was durable but not yet taken
    (tests/test_cluster_drain.py). tests/test_preemption.py::test_ray_private_preemption_path_still_exists
    fails if Ray moves the queue.
    """
    queue = _result_queue()
    deadline = time.monotonic() + timeout_s
    while not queue.empty():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _result_queue():
    """This worker's queue of one for its reports, which Ray Train's controller empties at each poll (PRIVATE Ray
    API: tests/test_preemption.py::test_ray_private_preemption_path_still_exists fails if Ray moves it)."""
    from ray.train.v2._internal.execution.context import get_train_context

    return get_train_context().get_result_queue()


def ray_preemption_info():
    """This worker's copy of Ray Train's `PreemptionInfo` (None until a drain of one of the group's nodes).

    PRIVATE Ray API, isolated here: Ray Train's PreemptionWatcher actor polls the GCS's draining nodes
    (every RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S, 5 s by default) and calls `mark_preempt` on every worker,
    which stores the info in the worker's train context. The public `ray.train.get_preemption_info()`
    returns the same value but is a barrier through Ray Train's synchronization actor on every call;
    reading the local copy costs nothing, and the loop's own per-step all-reduce makes the ranks agree.
    tests/test_preemption.py::test_ray_private_preemption_path_still_exists fails if Ray moves it.
    """
    from ray.train.v2._internal.execution.context import get_train_context

    return get_train_context().preemption_context.preemption_info
