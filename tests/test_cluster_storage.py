"""A multi-node run whose run.storage_path a worker node cannot see is refused before it starts.

The local 2-node test cluster of test_cluster_multinode.py (a `ray.cluster_utils.Cluster` head plus a
second node on this machine), except that the second node runs in its own mount namespace with an
empty tmpfs over one folder: to it, that folder is local storage it does not share with the head,
as a head's disk is to the GPU nodes of the provided clusters. Another folder stays shared. Runs in a
child process (its own session and RAY_TMPDIR), like the multi-node tests.
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
import time
from pathlib import Path

from local_processes import free_port, kill_session


def _unshare_prefix() -> list[str]:
    """`unshare` for a private mount namespace (mapped to root in a user namespace when not root)."""
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]


def run_scenario(work: Path) -> dict:
    import ray
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    from raysft.pipeline.cluster_checks import check_shared_storage
    from raysft.pipeline.config import load_config
    from raysft.pipeline.errors import ClusterError
    from raysft.pipeline.trainer import check_cluster

    node_local, shared = work / "node-local", work / "shared"
    node_local.mkdir()
    shared.mkdir()
    gcs_port = free_port()
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{gcs_port}"
    cluster = Cluster(
        initialize_head=True,
        shutdown_at_exit=False,
        head_node_args=dict(num_cpus=2, gcs_server_port=gcs_port, include_dashboard=False, resources={"head_node": 1}),
    )
    ray_cli = str(Path(sys.executable).parent / "ray")
    script = (
        f"mount -t tmpfs tmpfs {node_local} && exec {ray_cli} start --address={cluster.address} "
        f"--num-cpus=2 --resources='{{\"node_b\": 1}}' --block"
    )
    node_b = subprocess.Popen(
        [*_unshare_prefix(), "sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    out: dict = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        scaling = load_config(None, overrides={"scaling.num_workers": 2}).scaling
        check_shared_storage(shared, scaling)  # both nodes see it: no error
        out["shared_ok"] = True
        cfg = load_config(None, overrides={"scaling.num_workers": 2, "run.storage_path": str(node_local)})
        try:
            check_cluster(cfg)  # what `raysft train` runs before anything starts
            out["refused"] = None
        except ClusterError as exc:
            out["refused"] = str(exc)
        # Issue 20 item 6: a model folder only the driver's node has (a local model, a converted GGUF).
        model_dir = node_local / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text('{"model_type": "llama"}')
        cfg = load_config(
            None,
            overrides={
                "scaling.num_workers": 2,
                "run.storage_path": str(shared),
                "model.name_or_path": str(model_dir),
            },
        )
        try:
            check_cluster(cfg)
            out["model_refused"] = None
        except ClusterError as exc:
            out["model_refused"] = str(exc)
        shutil.rmtree(model_dir)
        out["markers_left"] = sorted(p.name for p in node_local.iterdir()) + sorted(p.name for p in shared.iterdir())
    finally:
        ray.shutdown()
        node_b.send_signal(signal.SIGTERM)
        try:
            node_b.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node_b.kill()
        cluster.shutdown()
    return out


import pytest  # noqa: E402


@pytest.mark.ray
@pytest.mark.slow
def test_storage_a_worker_node_cannot_see_is_refused_before_start(tmp_path):
    if shutil.which("unshare") is None or subprocess.run([*_unshare_prefix(), "true"]).returncode != 0:
        pytest.skip("this machine cannot create a private mount namespace (unshare) for the second node")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rsfts_", dir="/tmp"))
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
    result_file = tmp_path / "result.json"
    proc = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path), str(result_file)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    finally:
        kill_session(proc.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0 or not result_file.is_file():
        pytest.fail(f"the storage scenario failed (exit {proc.returncode}):\n{log[-6000:]}")
    out = json.loads(result_file.read_text())
    assert out["nodes"] == 2 and out["shared_ok"]
    refused = out["refused"]
    assert refused is not None and refused.startswith(
        f"run.storage_path {tmp_path / 'node-local'} is not shared: 1 of the 2 nodes"
    )
    assert "\n" not in refused and out["markers_left"] == []  # one sentence; the probe cleans up after itself
    # The model folder is probed like the run folder (by reading its config.json; nothing written into it).
    assert (out["model_refused"] or "").startswith(
        f"The model folder (model.name_or_path) {tmp_path / 'node-local' / 'model'} is not shared: 1 of the 2 nodes"
    ), out["model_refused"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the storage scenario on a local 2-node cluster (run by the test)")
    parser.add_argument("work", type=Path)
    parser.add_argument("result", type=Path)
    a = parser.parse_args()
    a.result.write_text(json.dumps(run_scenario(a.work)))
