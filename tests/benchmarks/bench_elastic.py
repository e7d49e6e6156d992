"""Wall-clock time lost per node loss: fixed size against elastic, on a local 2-node Ray cluster.

    flock /tmp/raysft-ray.lock python tests/benchmarks/bench_elastic.py MODEL_DIR [--readd-after 30] [--epochs 2]

MODEL_DIR: a tiny Hugging Face model folder with a chat template (the tests build one with
`tests/tiny.py`: `python -c "import sys; sys.path.insert(0, 'tests'); import tiny; tiny.save_tiny_model(...)"`).
Three runs of the same model and data (`tests/test_cluster_multinode.py`'s, 2 rows per step) on a
head node and one worker node, 2 CPUs each and 2 CPUs per training worker, so each node holds one
worker:
  baseline   scaling.num_workers 2, nothing lost
  fixed      scaling.num_workers 2, run.max_failures 2: the worker node dies after the first checkpoint
             and a fresh node joins --readd-after seconds later (as an autoscaler would add one)
  elastic    scaling.num_workers [1, 2], the same loss and the same re-add
time lost = the run's wall time - the baseline's. Ray's autoscaling coordinator keeps its default
20 s view refresh unless --fast-tick (the tests' 1 s). Prints one JSON line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _first_step_after(run_dir: Path, since: float, starts_before: int, mn) -> float | None:
    """Seconds from `since` to the first optimizer step of the group that started after the loss."""
    mn._wait(lambda: len(mn._events(run_dir)) > starts_before, timeout_s=600)
    nxt = mn._events(run_dir)[-1]["step"] + 1
    mn._wait(lambda: mn._has_step(run_dir, nxt), timeout_s=600)
    return round(time.time() - since, 1)


def _lose_and_readd(cluster, node, run: dict, run_dir: Path, readd_after: float, mn) -> None:
    mn._wait(lambda: mn._committed_step(run_dir) > 0, timeout_s=600)
    starts = len(mn._events(run_dir))
    cluster.remove_node(node, allow_graceful=False)
    run["lost_at"] = time.time()

    def readd() -> None:
        run["new_node"] = cluster.add_node(num_cpus=2)
        run["readded_after_s"] = round(time.time() - run["lost_at"], 1)

    threading.Timer(readd_after, readd).start()
    run["next_step_after_loss_s"] = _first_step_after(run_dir, run["lost_at"], starts, mn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--readd-after", type=float, default=30.0, help="seconds until a fresh node joins")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the 32-sample data (16 steps each)")
    parser.add_argument("--fast-tick", action="store_true", help="the coordinator's 1 s tick instead of 20 s")
    parser.add_argument("--runs", default="baseline,fixed,elastic")
    a = parser.parse_args()
    ray_tmp = tempfile.mkdtemp(prefix="rsftb_", dir="/tmp")  # short: Ray's socket paths must stay short
    os.environ.update(
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="disabled",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    os.environ.pop("RAY_ADDRESS", None)
    sys.path.insert(0, str(TESTS))
    import ray
    import test_cluster_multinode as mn
    from local_processes import free_port
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    from raysft.pipeline.trainer import train

    work = Path(tempfile.mkdtemp(prefix="bench_elastic_"))
    data = work / "train.jsonl"
    mn._write_data(data, mn.N_SAMPLES)
    gcs_port = free_port()
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{gcs_port}"
    cluster = Cluster(
        initialize_head=True,
        shutdown_at_exit=False,
        head_node_args=dict(num_cpus=2, gcs_server_port=gcs_port, include_dashboard=False),
    )
    node = cluster.add_node(num_cpus=2)
    results: dict[str, dict] = {}
    try:
        ray.init(address=cluster.address)
        if a.fast_tick:
            mn._fast_autoscaling_coordinator(cluster.head_node.node_id)
        for name in a.runs.split(","):
            cfg = mn._config(a.model_dir, data, work, "elastic" if name == "elastic" else "spread")
            cfg = cfg.with_overrides(
                {
                    "run.name": name,
                    "scaling.cpus_per_worker": 2,
                    "scaling.placement_strategy": "PACK",
                    "train.epochs": a.epochs,
                    "train.save_every": 4,
                }
            )
            run: dict = {"run": name}
            watcher = None
            if name != "baseline":
                run_dir = Path(cfg.run.storage_path) / name
                watcher = threading.Thread(
                    target=_lose_and_readd, args=(cluster, node, run, run_dir, a.readd_after, mn), daemon=True
                )
                watcher.start()
            start = time.monotonic()
            train(cfg)
            run["seconds"] = round(time.monotonic() - start, 1)
            if watcher is not None:
                watcher.join(timeout=60)
                node = run.pop("new_node")  # the re-added node is the next run's worker node
                run["starts"] = [(e["world_size"], e["step"]) for e in mn._events(run_dir)]
            results[name] = run
            print(json.dumps(run), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    base = results.get("baseline", {}).get("seconds")
    for name, run in results.items():
        if name != "baseline" and base is not None:
            print(
                f"{name}: {run['seconds']} s, lost {run['seconds'] - base:.1f} s to one node loss "
                f"(node back after {a.readd_after:g} s; next step {run.get('next_step_after_loss_s')} s after the "
                f"loss; starts (world size, step) {run.get('starts')})"
            )
    print(f"baseline: {base} s")


if __name__ == "__main__":
    main()
