"""Multi-node training on one machine (`ray.cluster_utils.Cluster`): placement, and recovery from node loss.

The cluster is a head node plus one worker node, each with its own raylet and object store; 2
training workers with STRICT_SPREAD must land one per node. In the node-loss run, the worker node
is removed right after the first checkpoint and a fresh node joins (as an autoscaler would add
one): the worker group restarts from the last checkpoint and finishes, and the data ledger shows
every step once and every source row exactly once in the epoch.

Both runs happen one after the other on one cluster, in a child process that runs this file as a
script (its own session, its own RAY_TMPDIR), so the cluster never touches the test session's Ray
instance or /tmp/ray, and everything it started is killed at the end even if it hangs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from local_processes import free_port, kill_session

# One sample per packed row at max_seq_len 96, 2 rows per step, nothing left out of the epoch.
# The node-loss run has room after its first checkpoint (step 4 of 16) for the loss to land mid-run.
# Both runs use the same data (the second reuses the prepared-data cache).
N_SAMPLES = 32
SAVE_EVERY = {"spread": 1000, "node-loss": 4}  # spread: only the final checkpoint
T0 = time.monotonic()


# ---------------------------------------------------------------- the child process


def _write_data(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"what is {i} plus {i}?"},
                            {"role": "assistant", "content": f"the answer is {2 * i}."},
                        ]
                    }
                )
                + "\n"
            )


def _worker_nodes(address: str) -> list[tuple[str, str]]:
    """(actor id, node id) of every Ray Train worker actor so far, alive or dead."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=100, raise_on_missing_output=False)
    return sorted((a.actor_id, a.node_id) for a in actors)


def _committed_step(run_dir: Path) -> int:
    """Step of the latest checkpoint Ray Train has registered (its controller's snapshot), 0 if none.

    A checkpoint folder appears while the ranks still upload into it; only once registered is it
    the one a restarted worker group gets from `ray.train.get_checkpoint()`.
    """
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["checkpoint_dir_name"].split("_")[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 0


def _config(model_dir: str, data: Path, work: Path, scenario: str):
    from raysft.pipeline.config import load_config

    return load_config(
        None,
        overrides={
            "model.name_or_path": model_dir,
            "model.quantization": "nf4",
            "model.compute_dtype": "float32",
            "model.dtype": "float32",
            "model.gradient_checkpointing": False,
            "lora.r": 4,
            "lora.alpha": 8,
            "data.train": str(data),
            "data.max_seq_len": 96,
            "data.num_tokenizer_actors": 1,
            "data.cache_dir": str(work / "prepared"),
            "train.epochs": 1,
            "train.save_every": SAVE_EVERY[scenario],
            "train.eval_every": 1000,
            "train.deepspeed.stage": 2,
            "train.logging.tensorboard": False,
            "scaling.num_workers": 2,
            "scaling.cpus_per_worker": 1,
            "scaling.placement_strategy": "STRICT_SPREAD",
            "run.name": scenario,
            "run.storage_path": str(work / "runs"),
            "run.max_failures": 2,
        },
    )


def run_scenarios(model_dir: str, work: Path) -> dict:
    """On one head + one worker node: a clean 2-worker run, then a run that loses the worker node."""
    import ray
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    from raysft.pipeline.trainer import train

    gcs_port = free_port()
    # Ray processes (e.g. Train's placement-group cleaner) resolve "the" cluster by scanning the
    # machine; other test runs may have clusters here too, so name ours.
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{gcs_port}"
    # No exit hooks: they register signal handlers, which fails when a node is added from the watcher
    # thread; the finally below shuts the cluster down, and the test kills the child's session anyway.
    cluster = Cluster(
        initialize_head=True,
        shutdown_at_exit=False,
        head_node_args=dict(
            num_cpus=2,
            gcs_server_port=gcs_port,
            include_dashboard=True,
            dashboard_port=free_port(),
            dashboard_host="127.0.0.1",
            resources={"head_node": 1},
        ),
    )
    assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
    node_b = cluster.add_node(num_cpus=2, resources={"node_b": 1})
    nodes = {"head": cluster.head_node.node_id, "b": node_b.node_id}
    out: dict = {"nodes": nodes, "cluster_up_s": round(time.monotonic() - T0, 1)}
    data = work / "train.jsonl"
    _write_data(data, N_SAMPLES)
    try:
        ray.init(address=cluster.address, log_to_driver=True)
        seen: set = set()
        for scenario in ("spread", "node-loss"):
            run = out[scenario] = {}
            run_dir = work / "runs" / scenario
            killer = None
            if scenario == "node-loss":

                def lose_node_after_first_checkpoint(
                    run: dict = run, run_dir: Path = run_dir, seen: set = seen
                ) -> None:
                    deadline = time.monotonic() + 300
                    while _committed_step(run_dir) == 0 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    run["workers_before_loss"] = [w for w in _worker_nodes(cluster.address) if w[0] not in seen]
                    cluster.remove_node(node_b, allow_graceful=False)  # the node dies: raylet, workers, object store
                    run["removed_at_step"] = _committed_step(run_dir)
                    nodes["c"] = cluster.add_node(num_cpus=2, resources={"node_c": 1}).node_id  # "autoscaled" in

                killer = threading.Thread(target=lose_node_after_first_checkpoint, daemon=True)
                killer.start()
            start = time.monotonic()
            result = train(_config(model_dir, data, work, scenario))
            run["seconds"] = round(time.monotonic() - start, 1)
            if killer is not None:
                killer.join(timeout=60)
            run["summary"] = result.summary()
            run["workers"] = [w for w in _worker_nodes(cluster.address) if w[0] not in seen]
            seen |= {w[0] for w in run["workers"]}
            run["ledger"] = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
            run["adapter"] = (run_dir / "adapter" / "adapter_config.json").is_file()
    finally:
        ray.shutdown()
        cluster.shutdown()
    out["total_s"] = round(time.monotonic() - T0, 1)
    return out


# ---------------------------------------------------------------- the tests

import pytest  # noqa: E402


def _run_child(model_dir: Path, work: Path, timeout_s: float = 900, script: str = __file__) -> tuple[dict, str]:
    """Run `script`'s scenarios in a child process and session; kill whatever is left of that session afterwards."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rsftc_", dir="/tmp"))  # short: Ray's socket paths must stay short
    env.update(
        RAY_TMPDIR=str(ray_tmp),
        RAY_AUTH_MODE="disabled",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        RAY_DEDUP_LOGS="0",
    )
    result_file = work / "result.json"
    # cwd: not the repository, whose kernels/ folder would shadow PyPI's `kernels` on workers' paths
    proc = subprocess.Popen(
        [sys.executable, script, str(model_dir), str(work), str(result_file)],
        env=env,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log += f"\n[test] timed out after {timeout_s} s"
    finally:
        kill_session(proc.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0 or not result_file.is_file():
        pytest.fail(f"multi-node run failed (exit {proc.returncode}):\n{log[-6000:]}")
    return json.loads(result_file.read_text()), log


@pytest.fixture(scope="module")
def multinode(tmp_path_factory, tiny_model_dir) -> tuple[dict, str]:
    """Both runs, on one 2-node cluster (one cluster start for the two tests)."""
    return _run_child(tiny_model_dir, tmp_path_factory.mktemp("multinode"))


def _assert_exactly_once(ledger: list[dict]) -> None:
    steps = [e["step"] for e in ledger]
    assert steps == list(range(1, N_SAMPLES // 2 + 1)), steps  # every step once, in order
    ids = [s for e in ledger for s in e["source_ids"]]
    assert {e["epoch"] for e in ledger} == {0}
    assert sorted(ids) == list(range(N_SAMPLES))  # every source row exactly once in the epoch


@pytest.mark.ray
@pytest.mark.slow
def test_two_node_training_places_one_worker_per_node(multinode):
    out, _ = multinode
    run, nodes = out["spread"], out["nodes"]
    placed = [node for _, node in run["workers"]]
    assert len(placed) == 2 and set(placed) == {nodes["head"], nodes["b"]}, run["workers"]
    assert run["adapter"] and run["summary"]["metrics"]["step"] == N_SAMPLES // 2
    _assert_exactly_once(run["ledger"])


@pytest.mark.ray
@pytest.mark.slow
def test_node_loss_recovers_from_last_checkpoint_exactly_once(multinode):
    out, log = multinode
    run, nodes = out["node-loss"], out["nodes"]
    total = N_SAMPLES // 2
    # before the loss: one worker on each node; after: the group was rebuilt on the head and the new node
    before = {tuple(w) for w in run["workers_before_loss"]}
    assert {node for _, node in before} == {nodes["head"], nodes["b"]} and len(before) == 2, run
    later = {node for actor, node in run["workers"] if (actor, node) not in before}
    assert later == {nodes["head"], nodes["c"]}, run
    # the second worker group resumed from a checkpoint taken before the node was removed, not from scratch
    starts = [int(s) for s in re.findall(r"\[raysft\] training \d+ steps on 2 worker\(s\) from step (\d+)", log)]
    resumed = max(starts)
    assert 0 < resumed < total and resumed % SAVE_EVERY["node-loss"] == 0, starts
    assert resumed >= run["removed_at_step"] > 0, (starts, run["removed_at_step"])  # the last registered one
    assert run["adapter"] and run["summary"]["metrics"]["step"] == total
    _assert_exactly_once(run["ledger"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the multi-node scenarios on a local Cluster (run by the tests)")
    parser.add_argument("model_dir")
    parser.add_argument("work", type=Path)
    parser.add_argument("result", type=Path)
    a = parser.parse_args()
    a.result.write_text(json.dumps(run_scenarios(a.model_dir, a.work)))
