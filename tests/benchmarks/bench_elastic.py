"""Wall-clock time lost per node loss: fixed size against elastic, on a local 2-node Ray cluster.

    flock /tmp/raysft-ray.lock python tests/benchmarks/bench_elastic.py MODEL_DIR [--readd-after 30] [--epochs 2] \
        [--settings raysft|ray-defaults]

MODEL_DIR: a tiny Hugging Face model folder with a chat template (the tests build one with
`tests/tiny.py`: `python -c "import sys; sys.path.insert(0, 'tests'); import tiny; tiny.save_tiny_model(...)"`).
Three runs of the same model and data (`tests/test_cluster_multinode.py`'s, 2 rows per step) on a
head node and one worker node, 2 CPUs each and 2 CPUs per training worker, so each node holds one
worker:
  baseline   scaling.num_workers 2, nothing lost
  fixed      scaling.num_workers 2, run.max_failures 2: the worker node dies after the first checkpoint
             and a fresh node joins --readd-after seconds later (as an autoscaler would add one)
  elastic    scaling.num_workers [1, 2], the same loss and the same re-add
time lost = the run's wall time - the baseline's. --settings raysft (the default): what raysft applies
(pipeline/ray_recovery.py: its Train settings and 1 s coordinator tick, and the head's health-check settings
from the cluster recipes); ray-defaults: Ray 2.60's (60 s start timeout, 2 s controller poll, Ray's own
coordinator with its 20 s tick, the GCS's default health check). Prints one JSON line per run and a summary.
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


def _lose_and_readd(cluster, node, run: dict, run_dir: Path, readd_after: float, mn) -> None:
    mn._wait(lambda: mn._committed_step(run_dir) > 0, timeout_s=600)
    starts = len(mn._events(run_dir))
    cluster.remove_node(node, allow_graceful=False)
    run["lost_at"] = time.time()

    def readd() -> None:
        run["new_node"] = cluster.add_node(num_cpus=2)
        run["readded_after_s"] = round(time.time() - run["lost_at"], 1)

    threading.Timer(readd_after, readd).start()
    run["next_step_after_loss_s"] = mn._seconds_to_next_step(run_dir, run["lost_at"], starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--readd-after", type=float, default=30.0, help="seconds until a fresh node joins")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the 32-sample data (16 steps each)")
    parser.add_argument("--settings", choices=["raysft", "ray-defaults"], default="raysft")
    parser.add_argument("--runs", default="baseline,fixed,elastic")
    a = parser.parse_args()
    ray_tmp = tempfile.mkdtemp(prefix="rsftb_", dir="/tmp")  # short: Ray's socket paths must stay short
    os.environ.update(
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    os.environ.pop("RAY_ADDRESS", None)
    from raysft.pipeline import ray_recovery

    if a.settings == "raysft":
        os.environ.update(ray_recovery.CLUSTER_HEAD_ENV)  # the recipes' head settings; the rest raysft sets itself
    else:  # Ray's defaults, set by hand so that raysft's (which never override a user's value) stay out
        os.environ.update(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="60", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="2")
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
        if a.settings == "ray-defaults":  # Ray's own coordinator first (20 s tick): raysft then leaves it as is
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                get_or_create_autoscaling_coordinator,
            )

            ray.get(get_or_create_autoscaling_coordinator().get_reserved_resources.remote("warm-up"))
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
    print(f"baseline: {base} s ({a.settings} settings)")


if __name__ == "__main__":
    main()
