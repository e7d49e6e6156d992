"""Preemption notices without Ray: SIGTERM on one rank of a 2-process torch.distributed run makes both ranks
checkpoint at the next optimizer-step boundary and at every later one, and the run still finishes; the private
Ray path the drain notice reads is still where training/ray_context.py expects it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from audit import check_exactly_once
from train_fixtures import make_prepared

from raysft.pipeline.config import load_config
from raysft.pipeline.training.preemption import PreemptionWatch

TOTAL = 8  # 48 samples, 3 per row -> 16 rows; 2 ranks x 1 row per step -> 8 steps


def test_first_sigterm_is_a_notice_the_second_goes_to_the_previous_handler():
    got: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        watch = PreemptionWatch()
        assert watch.installed and watch.pending() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.pending() is not None and watch.pending().reason == "SIGTERM" and got == []
        os.kill(os.getpid(), signal.SIGTERM)  # asked again: the handler from before runs, ours is gone
        assert got == [signal.SIGTERM] and not watch.installed
        assert signal.getsignal(signal.SIGTERM) is not watch._on_sigterm
    finally:
        signal.signal(signal.SIGTERM, before)


def test_ray_private_preemption_path_still_exists():
    """training/ray_context.ray_preemption_info reads Ray Train's per-worker copy of the PreemptionInfo."""
    import dataclasses
    import inspect

    from ray.train.v2._internal.execution import context
    from ray.train.v2._internal.execution.preemption import PreemptionContext
    from ray.train.v2._internal.execution.train_fn_utils import DistributedTrainFnUtils
    from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker

    assert callable(context.get_train_context)
    assert "preemption_context" in {f.name for f in dataclasses.fields(context.TrainContext)}
    # ray_context.wait_until_taken: a worker's reports wait in a queue of one that the controller's poll empties
    assert "get_result_queue().put(" in inspect.getsource(context.TrainContext) and callable(
        context.TrainContext.get_result_queue
    )
    assert "result_queue.get_nowait()" in inspect.getsource(RayTrainWorker.poll_status)
    assert "queue.Queue(maxsize=1)" in inspect.getsource(RayTrainWorker)
    assert PreemptionContext().preemption_info is None
    # The public API broadcasts exactly that value, and the watcher's mark_preempt writes it.
    assert "preemption_context.preemption_info" in inspect.getsource(DistributedTrainFnUtils.get_preemption_info)
    assert "preemption_context.preemption_info = info" in inspect.getsource(RayTrainWorker.mark_preempt)
    from ray.train import PreemptionInfo

    assert {f.name for f in dataclasses.fields(PreemptionInfo)} == {"deadline_ms", "preempted_node_to_ranks"}


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


def _steps_logged(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


@pytest.mark.slow
def test_sigterm_on_one_rank_checkpoints_both_at_the_next_step_boundary(tiny_model_dir, tmp_path):
    from local_processes import free_port, kill_session

    prepared = make_prepared(tmp_path / "packed", n_train=48, n_eval=0, per_row=3, rows_per_shard=4)
    cfg = load_config(
        None,
        overrides={
            "model.name_or_path": str(tiny_model_dir),
            "model.quantization": "none",
            "model.dtype": "float32",
            "lora.r": 4,
            "lora.alpha": 8,
            "lora.dropout": 0.0,
            "train.max_steps": TOTAL,
            "train.save_every": 1000,  # only the final checkpoint, unless a notice comes
            "train.keep_checkpoints": TOTAL,
            "train.logging.tensorboard": False,
            "scaling.num_workers": 2,
            "run.storage_path": str(tmp_path / "runs"),
            "run.name": "sigterm",
        },
    )
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    run_dir = tmp_path / "runs" / "sigterm"
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "raysft.pipeline.training.torchrun_entry", str(config)]
        procs.append(
            subprocess.Popen(
                [*cmd, "--prepared", str(prepared.train_dir.parent)],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    try:
        deadline = time.monotonic() + 240
        while _steps_logged(run_dir) < 2 and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.01)
        before = _steps_logged(run_dir)
        procs[1].send_signal(signal.SIGTERM)  # the second worker only
        after = _steps_logged(run_dir)
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            kill_session(p.pid)
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert 2 <= before < TOTAL, (before, logs[0][-2000:])
    events = _events(run_dir)
    (notice,) = [e for e in events if e["event"] == "preemption"]
    # the step in flight when the signal came (or the next, if it ended in between) is the checkpoint
    assert before + 1 <= notice["step"] <= after + 1, (before, after, notice)
    assert notice["ranks_notified"] == 1 and notice["reason"] == "another rank's notice"  # rank 0 got none itself
    saved = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert saved == list(range(notice["step"], TOTAL + 1)), saved  # then every boundary
    from raysft.pipeline.training.checkpoint import problem

    assert problem(run_dir / f"checkpoint_{notice['step']:06d}") is None  # both ranks' parts, sealed
    ledger = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ledger] == list(range(1, TOTAL + 1))
    check_exactly_once(ledger)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
