"""Multi-node training on one machine (`ray.cluster_utils.Cluster`): placement, recovery from node loss, and
elastic training.

The cluster starts as a head node alone. The elastic run (scaling.num_workers [1, 2], 2 CPUs per
worker, so each node holds one worker) starts at once with 1 worker; a second node joins and the
run grows to 2 workers at the next resize check; that node is removed after the first checkpoint
at 2 workers and the run goes on with 1, without a replacement; a third node joins and the run
grows back to 2. Its adapter must equal the uninterrupted 2-worker run's.

Then, on the head and the third node (each with its own raylet and object store), 2 training
workers with STRICT_SPREAD must land one per node (the uninterrupted reference run). In the
node-loss run (fixed size), the worker node is removed right after the first checkpoint and a fresh
node joins (as an autoscaler would add one): the worker group restarts from the last checkpoint and
finishes, and the data ledger shows every step once and every source row exactly once in the epoch.

All runs happen one after the other on one cluster, in a child process that runs this file as a
script (its own session, its own RAY_TMPDIR), so the cluster never touches the test session's Ray
instance or /tmp/ray, and everything it started is killed at the end even if it hangs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from local_processes import free_port, kill_session

from raysft.pipeline import ray_recovery

# One sample per packed row at max_seq_len 96, 2 rows per step, nothing left out of the epoch.
# The node-loss run has room after its first checkpoint (step 4 of 16) for the loss to land mid-run; the
# elastic run and its reference (spread) train 2 epochs, so that each of its 4 sizes gets steps.
# All runs use the same data (the later ones reuse the prepared-data cache).
N_SAMPLES = 32
SAVE_EVERY = {"elastic": 4, "spread": 1000, "node-loss": 4}  # spread: only the final checkpoint
EPOCHS = {"elastic": 2, "spread": 2, "node-loss": 1}
RESIZE_CHECK_S = 2.0
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


def _events(run_dir: Path, kind: str = "start") -> list[dict]:
    try:
        lines = (run_dir / "events.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [e for e in (json.loads(x) for x in lines if x.endswith("}")) if e["event"] == kind]


def _has_step(run_dir: Path, step: int) -> bool:
    try:
        return any(f'"step": {step},' in x for x in (run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return False


def _seconds_to_next_step(run_dir: Path, lost_at: float, starts_before: int) -> float:
    """From a node loss to the first step the restarted group trains (the step after the one it resumed at).
    A group rewinds metrics.jsonl to its checkpoint's step before it writes its start event, so once that
    event is there, a line for the next step is the new group's."""
    _wait(lambda: len(_events(run_dir)) > starts_before)
    after = _events(run_dir)[-1]["step"] + 1
    _wait(lambda: _has_step(run_dir, after))
    return round(time.time() - lost_at, 1)


def _recovery_breakdown(run_dir: Path, lost_at: float) -> dict:
    """When, after the loss, the controller saw the failure (failures.jsonl) and the new group started training
    (its start event, after processes, model and checkpoint load): where a slow recovery's seconds went."""
    seen = [json.loads(x)["time"] for x in _read_lines(run_dir / "failures.jsonl")]
    started = [e["time"] for e in _events(run_dir) if e["time"] > lost_at]
    return {
        "failure_seen_after_s": round(min(seen) - lost_at, 1) if seen else None,
        "group_started_after_s": round(min(started) - lost_at, 1) if started else None,
    }


def _read_lines(path: Path) -> list[str]:
    try:
        return [x for x in path.read_text().splitlines() if x.endswith("}")]
    except OSError:
        return []


def _wait(what, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        if time.monotonic() > deadline:
            raise TimeoutError("the elastic scenario waited too long")
        time.sleep(0.05)


def _config(model_dir: str, data: Path, work: Path, scenario: str):
    from raysft.pipeline.config import load_config

    elastic = scenario == "elastic"
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
            "lora.dropout": 0.0,  # dropout masks are drawn per rank: the elastic run is compared with spread
            "data.train": str(data),
            "data.max_seq_len": 96,
            "data.num_tokenizer_actors": 1,
            "data.cache_dir": str(work / "prepared"),
            "train.epochs": EPOCHS[scenario],
            "train.save_every": SAVE_EVERY[scenario],
            "train.eval_every": 1000,
            "train.deepspeed.stage": 2,
            "train.logging.tensorboard": False,
            "scaling.num_workers": [1, 2] if elastic else 2,
            "scaling.cpus_per_worker": 2 if elastic else 1,  # elastic: a node holds one worker
            "scaling.placement_strategy": "PACK" if elastic else "STRICT_SPREAD",
            "scaling.resize_check_s": RESIZE_CHECK_S,
            "run.name": scenario,
            "run.storage_path": str(work / "runs"),
            "run.max_failures": 2,
        },
    )


def _resize_the_cluster(cluster, run: dict, run_dir: Path, nodes: dict) -> None:
    """The elastic scenario's cluster, driven by what the run has done (started, checkpointed, trained a step)."""
    _wait(lambda: len(_events(run_dir)) >= 1)  # started on the head node alone
    nodes["b"] = cluster.add_node(num_cpus=2, resources={"node_b": 1})
    run["b_added_at"] = time.time()
    _wait(lambda: len(_events(run_dir)) >= 2)  # grown to 2 workers
    resumed = _events(run_dir)[-1]["step"]
    _wait(lambda: _committed_step(run_dir) > resumed)  # a checkpoint written by 2 workers
    run["removed_at_step"] = _committed_step(run_dir)
    cluster.remove_node(nodes["b"], allow_graceful=False)  # the node dies; no replacement comes
    run["lost_at"] = time.time()
    run["next_step_after_loss_s"] = _seconds_to_next_step(run_dir, run["lost_at"], 2)  # going on with 1 worker
    run.update(_recovery_breakdown(run_dir, run["lost_at"]))
    nodes["c"] = cluster.add_node(num_cpus=2, resources={"node_c": 1})  # resources come back
    run["added_at"] = time.time()


def start_cluster(**head_args):
    """A local `Cluster` head (2 CPUs, dashboard, `head_args` added) named in RAY_ADDRESS: Ray processes (e.g.
    Train's placement-group cleaner) resolve "the" cluster by scanning the machine, and other test runs may
    have clusters here too. No exit hooks: they register signal handlers, which fails when a node is added
    from a watcher thread; callers shut the cluster down, and the test kills the child's session anyway."""
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    gcs_port = free_port()
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{gcs_port}"
    return Cluster(
        initialize_head=True,
        shutdown_at_exit=False,
        head_node_args=dict(
            num_cpus=2,
            gcs_server_port=gcs_port,
            include_dashboard=True,
            dashboard_port=free_port(),
            dashboard_host="127.0.0.1",
            **head_args,
        ),
    )


def run_scenarios(model_dir: str, work: Path) -> dict:
    """On a head node alone, then with a second node: the elastic run, a clean 2-worker run, a node loss."""
    import ray

    from raysft.pipeline.trainer import train

    cluster = start_cluster(resources={"head_node": 1})
    assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
    out: dict = {"cluster_up_s": round(time.monotonic() - T0, 1), "work": str(work)}
    elastic_nodes: dict = {}
    data = work / "train.jsonl"
    _write_data(data, N_SAMPLES)
    try:
        ray.init(address=cluster.address, log_to_driver=True)  # raysft applies its recovery settings on this
        seen: set = set()
        for scenario in ("elastic", "spread", "node-loss"):
            run = out[scenario] = {}
            run_dir = work / "runs" / scenario
            killer = None
            if scenario == "elastic":
                killer = threading.Thread(
                    target=_resize_the_cluster, args=(cluster, run, run_dir, elastic_nodes), daemon=True
                )
                killer.start()
            if scenario == "spread":
                node_b = elastic_nodes["c"]  # the head and the elastic run's last node
                nodes = out["nodes"] = {"head": cluster.head_node.node_id, "b": node_b.node_id}
            if scenario == "node-loss":

                def lose_node_after_first_checkpoint(
                    run: dict = run, run_dir: Path = run_dir, seen: set = seen, node_b=node_b, nodes: dict = nodes
                ) -> None:
                    deadline = time.monotonic() + 300
                    while _committed_step(run_dir) == 0 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    run["workers_before_loss"] = [w for w in _worker_nodes(cluster.address) if w[0] not in seen]
                    cluster.remove_node(node_b, allow_graceful=False)  # the node dies: raylet, workers, object store
                    run["lost_at"] = time.time()
                    run["removed_at_step"] = _committed_step(run_dir)
                    nodes["c"] = cluster.add_node(num_cpus=2, resources={"node_c": 1}).node_id  # "autoscaled" in
                    run["next_step_after_loss_s"] = _seconds_to_next_step(run_dir, run["lost_at"], 1)
                    run.update(_recovery_breakdown(run_dir, run["lost_at"]))

                killer = threading.Thread(target=lose_node_after_first_checkpoint, daemon=True)
                killer.start()
            start, run["called_at"] = time.monotonic(), time.time()
            result = train(_config(model_dir, data, work, scenario))
            run["seconds"] = round(time.monotonic() - start, 1)
            if killer is not None:
                killer.join(timeout=60)
            run["summary"] = result.summary()
            run["starts"] = _events(run_dir)
            # a clean group start on this machine now (the data is prepared): what a restart costs at the least
            run["first_group_started_after_s"] = round(run["starts"][0]["time"] - run["called_at"], 1)
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
    for name in ray_recovery.TRAIN_ENV:  # raysft's own recovery settings, not the suite's
        env.pop(name, None)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rsftc_", dir="/tmp"))  # short: Ray's socket paths must stay short
    env.update(
        RAY_TMPDIR=str(ray_tmp),
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        RAY_DEDUP_LOGS="0",
        # the head's settings from the cluster recipes (docs/recovery.md): a killed node is marked dead in ~5 s
        **ray_recovery.CLUSTER_HEAD_ENV,
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
    (work / "child.log").write_text(log)  # Ray Train's controller lines: where a slow recovery's seconds went
    if proc.returncode != 0 or not result_file.is_file():
        pytest.fail(f"multi-node run failed (exit {proc.returncode}):\n{log[-6000:]}")
    return json.loads(result_file.read_text()), log


@pytest.fixture(scope="module")
def multinode(tmp_path_factory, tiny_model_dir) -> tuple[dict, str]:
    """Both runs, on one 2-node cluster (one cluster start for the two tests)."""
    return _run_child(tiny_model_dir, tmp_path_factory.mktemp("multinode"))


def _assert_exactly_once(ledger: list[dict], epochs: int = 1) -> None:
    steps = [e["step"] for e in ledger]
    assert steps == list(range(1, epochs * N_SAMPLES // 2 + 1)), steps  # every step once, in order
    assert {e["epoch"] for e in ledger} == set(range(epochs))
    for epoch in range(epochs):  # every source row exactly once in each epoch
        assert sorted(s for e in ledger if e["epoch"] == epoch for s in e["source_ids"]) == list(range(N_SAMPLES))


@pytest.mark.ray
@pytest.mark.slow
def test_two_node_training_places_one_worker_per_node(multinode):
    out, _ = multinode
    run, nodes = out["spread"], out["nodes"]
    placed = [node for _, node in run["workers"]]
    assert len(placed) == 2 and set(placed) == {nodes["head"], nodes["b"]}, run["workers"]
    assert run["adapter"] and run["summary"]["metrics"]["step"] == EPOCHS["spread"] * N_SAMPLES // 2
    _assert_exactly_once(run["ledger"], EPOCHS["spread"])


@pytest.mark.ray
@pytest.mark.slow
def test_node_loss_recovers_from_last_checkpoint_exactly_once(multinode, record_property):
    out, log = multinode
    run, nodes = out["node-loss"], out["nodes"]
    _record_seconds(run, record_property)
    total = N_SAMPLES // 2
    # before the loss: one worker on each node; after: the group was rebuilt on the head and the new node
    before = {tuple(w) for w in run["workers_before_loss"]}
    assert {node for _, node in before} == {nodes["head"], nodes["b"]} and len(before) == 2, run
    later = {node for actor, node in run["workers"] if (actor, node) not in before}
    assert later == {nodes["head"], nodes["c"]}, run
    # the second worker group resumed from a checkpoint taken before the node was removed, not from scratch
    # (this run's own events.jsonl: the child's log also holds the other scenarios' start lines)
    starts = [(s["step"], s["world_size"]) for s in run["starts"]]
    assert len(starts) == 2 and starts[0] == (0, 2) and starts[1][1] == 2, starts
    resumed = starts[1][0]
    assert 0 < resumed < total and resumed % SAVE_EVERY["node-loss"] == 0, starts
    assert resumed >= run["removed_at_step"] > 0, (starts, run["removed_at_step"])  # the last registered one
    assert run["adapter"] and run["summary"]["metrics"]["step"] == total
    _assert_exactly_once(run["ledger"])
    # with raysft's own recovery settings (ray_recovery.py); on a loaded machine the group start alone
    # (first_group_started_after_s: processes, model load) can take longer than that
    assert run["next_step_after_loss_s"] < NEXT_STEP_BOUND_S, {k: v for k, v in run.items() if k.endswith("_s")}


# Issue 22's target is 30 s from a node loss to the next step; on a quiet 2-core machine it was 32-38 s, on a loaded
# one 46-81 s (BENCHMARKS.md, docs/recovery.md): the new group's start dominates. This bound catches a return to Ray's
# defaults (a 60 s start timeout on a stale view: ~90 s) without failing CI on a slow machine.
NEXT_STEP_BOUND_S = 60


def _record_seconds(run: dict, record_property) -> None:
    """The recovery's seconds (next step, failure seen, group started) as JUnit properties: the suite's own
    measurement of issue 22's target on every CI run (`--junitxml`)."""
    for key, value in run.items():
        if key.endswith("_s"):
            record_property(key, value)


def _adapter(work: str, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(work) / "runs" / name / "adapter" / "adapter_model.safetensors"))


@pytest.mark.ray
@pytest.mark.slow
def test_elastic_run_starts_with_the_workers_that_fit(multinode):
    """Start small: on a cluster with resources for 1 worker (the head node alone), a [1, 2] run starts at once
    with 1 worker instead of waiting for a second."""
    run = multinode[0]["elastic"]
    first = run["starts"][0]
    assert (first["world_size"], first["step"], first["grad_accum"]) == (1, 0, 2), first
    assert first["time"] < run["b_added_at"], run  # it trained before any second node existed


@pytest.mark.ray
@pytest.mark.slow
def test_elastic_run_shrinks_and_grows_back_with_the_same_result(multinode, record_property):
    """Shrink and grow: 1 -> 2 when a node joins, 2 -> 1 when it is lost (no replacement), 1 -> 2 when another
    joins, each at a resize check or restart from the last checkpoint; the same rows per step at every size, so
    the adapter equals the uninterrupted 2-worker run's (1e-4) and the ledger is exactly-once over both epochs."""
    out, _ = multinode
    run = out["elastic"]
    _record_seconds(run, record_property)
    sizes = [(s["world_size"], s["grad_accum"]) for s in run["starts"]]
    assert sizes == [(1, 2), (2, 1), (1, 2), (2, 1)], run["starts"]
    steps = [s["step"] for s in run["starts"]]
    assert steps == sorted(steps) and steps[2] >= run["removed_at_step"] > 0, (steps, run)  # the last registered one
    # training went on at 1 worker soon after the loss, with raysft's own recovery settings
    assert run["next_step_after_loss_s"] < NEXT_STEP_BOUND_S, {k: v for k, v in run.items() if k.endswith("_s")}
    # grown back once the resources were there: a resize check (every RESIZE_CHECK_S) plus the restart
    assert run["starts"][3]["time"] - run["added_at"] < 60, run
    total = EPOCHS["elastic"] * N_SAMPLES // 2
    assert run["adapter"] and run["summary"]["metrics"]["step"] == total
    _assert_exactly_once(run["ledger"], EPOCHS["elastic"])
    assert run["ledger"] == out["spread"]["ledger"]  # the same rows in every step as the fixed-size run
    elastic, fixed = _adapter(out["work"], "elastic"), _adapter(out["work"], "spread")
    assert elastic.keys() == fixed.keys() and elastic
    worst = max(float((elastic[k].float() - fixed[k].float()).abs().max()) for k in elastic)
    assert worst < 1e-4, worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the multi-node scenarios on a local Cluster (run by the tests)")
    parser.add_argument("model_dir")
    parser.add_argument("work", type=Path)
    parser.add_argument("result", type=Path)
    a = parser.parse_args()
    result = run_scenarios(a.model_dir, a.work)
    a.result.write_text(json.dumps(result))
    for name in ("elastic", "spread", "node-loss"):  # for the log a failing test shows
        run = result[name]
        lost = run.get("lost_at", 0)
        starts = [(s["world_size"], s["step"], round(s["time"] - lost, 1) if lost else 0) for s in run["starts"]]
        print(
            f"[result] {name}: {run['seconds']} s, next step {run.get('next_step_after_loss_s')} s after the loss, "
            f"starts (world size, step, s after the loss) {starts}"
        )
