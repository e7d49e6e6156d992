"""Drain acceptance on a local 2-node cluster (`ray.cluster_utils.Cluster`, the pattern and helpers of
test_cluster_multinode.py): an elastic fp32 run, `scaling.num_workers: [1, 2]`, one worker per node; mid-run
the second node is drained with a deadline (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, the
autoscaler's preemption API). Ray Train's preemption watcher tells the workers; the run checkpoints at the
next optimizer-step boundary and at every one after; the node is then taken away and no replacement comes;
the group goes on with 1 worker with at most one optimizer step of work lost, and the ledger shows every step
once and every source row exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from audit import check_exactly_once
from test_cluster_multinode import (
    N_SAMPLES,
    _committed_step,
    _config,
    _run_child,
    _write_data,
    start_cluster,
)

DEADLINE_S = 25  # what the drain announces; Ray Train restarts the group when it passes
EPOCHS = 5  # tiny-model steps take 0.1-0.2 s: room for the drain command (~2 s) and the notice mid-run
TOTAL = N_SAMPLES // 2 * EPOCHS


def _steps_logged(run_dir: Path) -> int:
    try:
        return max((json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()), default=0)
    except (OSError, ValueError, KeyError):
        return 0


def _starts(run_dir: Path) -> list[dict]:
    return [e for e in _events(run_dir) if e.get("event") == "start"]


def _events(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return []


def run_drain(model_dir: str, work: Path) -> dict:
    import ray

    from raysft.pipeline.config import Config
    from raysft.pipeline.trainer import train

    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.2"  # Ray Train's drain watcher (5 s by default)
    cluster = start_cluster()
    node_b = cluster.add_node(num_cpus=2)
    out: dict = {"nodes": {"head": cluster.head_node.node_id, "b": node_b.node_id}}
    data = work / "train.jsonl"
    _write_data(data, N_SAMPLES)
    d = _config(model_dir, data, work, "elastic").to_dict()  # [1, 2] workers, 2 CPUs each: one per node
    d["model"]["quantization"] = "none"  # fp32 throughout
    d["train"]["save_every"] = 10**6  # no checkpoint but the preemption's (and the final one)
    d["train"]["epochs"] = EPOCHS
    d["run"]["name"] = "drain"
    cfg = Config.from_dict(d)
    run_dir = work / "runs" / "drain"

    def drain_then_remove() -> None:
        deadline = time.monotonic() + 300
        # a group of 2 workers (the run may start with 1 before Ray sees node b, then grow) that has trained
        while time.monotonic() < deadline and not (
            _starts(run_dir) and _starts(run_dir)[-1]["world_size"] == 2 and _steps_logged(run_dir) >= 3
        ):
            time.sleep(0.02)
        out["starts_before_drain"] = len(_starts(run_dir))
        out["steps_before_drain"] = _steps_logged(run_dir)
        ray_cli = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_cli, "drain-node", "--address", cluster.address, "--node-id", node_b.node_id]
        cmd += ["--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)"]
        drained = subprocess.run([*cmd, "--deadline-remaining-seconds", str(DEADLINE_S)], capture_output=True)
        out["drain_at"], out["drain_rc"] = time.time(), drained.returncode
        out["steps_after_drain"] = _steps_logged(run_dir)  # the drain took effect while the command ran
        out["drain_err"] = drained.stderr.decode()[-2000:]
        while _committed_step(run_dir) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        out["first_committed"] = _committed_step(run_dir)
        while _committed_step(run_dir) <= out["first_committed"] and time.monotonic() < deadline:
            time.sleep(0.02)  # training went on after the notice's checkpoint, checkpointing each step
        out["steps_at_removal"] = _steps_logged(run_dir)
        cluster.remove_node(node_b, allow_graceful=False)  # the node is taken away; no replacement comes
        out["removed_at"], out["committed_at_removal"] = time.time(), _committed_step(run_dir)
        # the most steps the drained group finished (metrics.jsonl is rewound when the next group starts)
        done = out["steps_at_removal"]
        while len(_starts(run_dir)) <= out["starts_before_drain"] and time.monotonic() < deadline:
            done = max(done, _steps_logged(run_dir))
            time.sleep(0.05)
        out["done_before_restart"] = done

    try:
        ray.init(address=cluster.address, log_to_driver=True)  # raysft's recovery settings apply on it
        watcher = threading.Thread(target=drain_then_remove, daemon=True)
        watcher.start()
        start = time.monotonic()
        result = train(cfg)
        out["seconds"] = round(time.monotonic() - start, 1)
        watcher.join(timeout=60)
        out["summary"] = result.summary()
        out["ledger"] = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
        out["events"] = _events(run_dir)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_drain_checkpoints_at_the_next_step_and_goes_on_with_one_worker_losing_at_most_one_step(
    tiny_model_dir, tmp_path
):
    out, log = _run_child(tiny_model_dir, tmp_path, script=__file__, timeout_s=600)
    assert out["drain_rc"] == 0, out["drain_err"]
    events = out["events"]
    (notice,) = [e for e in events if e["event"] == "preemption"]
    # the workers heard of the drain within Ray's poll interval (0.2 s) and a step, well before its deadline,
    # and checkpointed at that step's boundary
    assert out["steps_before_drain"] < notice["step"] < TOTAL and notice["time"] - out["drain_at"] < 3, (out, notice)
    assert notice["deadline_s"] and 0 < notice["seconds_left"] <= DEADLINE_S and "node drain" in notice["reason"]
    saved = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert saved[0] == notice["step"] and out["first_committed"] == notice["step"], (saved, out)
    # training went on; then the group restarted from the last checkpoint with the 1 worker that fits
    starts = [e for e in events if e["event"] == "start"]
    before = out["starts_before_drain"]
    assert starts[before - 1]["world_size"] == 2 and len(starts) == before + 1, (before, starts)
    assert starts[-1]["world_size"] == 1, starts
    resumed = starts[-1]["step"]
    assert resumed >= out["committed_at_removal"] > notice["step"], (resumed, out)
    assert out["done_before_restart"] - resumed <= 1, (out, resumed)  # at most the step in flight is lost
    assert "preemption notice (node drain" in log
    assert out["summary"]["metrics"]["step"] == TOTAL
    assert [e["step"] for e in out["ledger"]] == list(range(1, TOTAL + 1))
    check_exactly_once(out["ledger"], {e: set(range(N_SAMPLES)) for e in range(EPOCHS)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the drain scenario on a local Cluster (run by the test)")
    parser.add_argument("model_dir")
    parser.add_argument("work", type=Path)
    parser.add_argument("result", type=Path)
    a = parser.parse_args()
    a.result.write_text(json.dumps(run_drain(a.model_dir, a.work)))
