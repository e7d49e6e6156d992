"""The Ray settings that make a lost node cost seconds, not minutes (ARCHITECTURE.md "Elastic training").

With Ray's defaults a node loss on a 2-node elastic run took 99 s to the next step: Ray Train restarts the
group on a view of the cluster that still counts the dead node (the AutoscalingCoordinator looks every
20 s, the GCS marks a node dead after ~15 s of failed health checks), asks for a placement that cannot be
met, and waits `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (60 s) before it asks again at the size that fits.

raysft sets the Ray Train values below for every run (a value the user set in the environment wins):
`ray_runtime` puts them in the driver's environment, from where Ray Train hands them to its controller and
workers on any cluster, and `raysft submit` also ships them in the job's runtime_env. It starts the
coordinator with a 1 s tick when it is the first to ask for it. The GCS health check belongs to the
cluster's head, set when the head starts: the cluster recipes (cluster/README.md, docs/recovery.md) set
CLUSTER_HEAD_ENV.
"""

from __future__ import annotations

import math
import os

START_TIMEOUT_S = 10.0  # Ray's default: 60 s
TRAIN_ENV = {
    # How long a worker group waits for its placement before Train decides the size again (a controller
    # failure): the wait a restart on a stale view costs. `controller_failure_limit` keeps the total wait.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{START_TIMEOUT_S:g}",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",  # the controller's poll of its workers (default 2 s)
}
COORDINATOR_TICK_S = 1  # the AutoscalingCoordinator's refresh of the cluster's nodes (Ray's class constant: 20 s)
CLUSTER_HEAD_ENV = {  # in the head's environment before `ray start --head`: a dead node is marked dead in ~5 s
    "RAY_health_check_period_ms": "1000",  # default 3000
    "RAY_health_check_failure_threshold": "5",  # default 5: 5 missed checks in a row
}
RAY_DEFAULT_PLACEMENT_WAIT_S = 60.0  # Ray Train's default RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S


def train_env() -> dict[str, str]:
    """TRAIN_ENV with the values the user already set in this environment."""
    return {name: os.environ.get(name, value) for name, value in TRAIN_ENV.items()}


def apply_train_env() -> None:
    """Put TRAIN_ENV into this process's environment, where Ray Train's driver side reads what to propagate."""
    for name, value in TRAIN_ENV.items():
        os.environ.setdefault(name, value)


def controller_failure_limit(max_failures: int, start_timeout_s: float | None = None) -> int:
    """Ray Train's `controller_failure_limit` for `run.max_failures`: a placement that times out counts as one
    controller failure, so with a shorter start timeout more retries are allowed, as many as keep the total wait
    for a placement (an autoscaler adding a node) what Ray's defaults give: (max_failures + 1) tries of 60 s.
    -1 (retry forever) stays -1. `start_timeout_s`: the one in effect (this environment's, else
    START_TIMEOUT_S) when None.

    >>> controller_failure_limit(2, start_timeout_s=10), controller_failure_limit(2, 60), controller_failure_limit(-1)
    (17, 2, -1)
    >>> controller_failure_limit(0, start_timeout_s=10)  # six 10 s tries: one 60 s wait, as with Ray's defaults
    5
    """
    if max_failures < 0:
        return -1
    if start_timeout_s is None:
        start_timeout_s = float(train_env()["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"])
    tries_per_wait = max(1, math.ceil(RAY_DEFAULT_PLACEMENT_WAIT_S / max(start_timeout_s, 1e-3)))
    return (max_failures + 1) * tries_per_wait - 1
