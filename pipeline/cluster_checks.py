"""Pre-start checks against the Ray cluster: do the workers fit, and can they all reach run.storage_path.

One home for the worker resource arithmetic (`raysft train` and every sweep trial use it). A cluster
with an autoscaler is judged by the most it can grow to, not by the nodes that happen to be up; a
multi-node run whose storage path some worker node cannot see is refused before anything starts
(Ray itself would fail only at the first checkpoint, and every retry would repeat the work).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

from raysft.pipeline.errors import ClusterError
from raysft.pipeline.training.generate_eval import enabled

log = logging.getLogger("raysft.cluster")
EPS = 1e-9
TRIAL_DRIVER_CPUS = 1.0  # a Tune trial's driver; its Train controller takes none (RAY_NOTES)


def worker_bundle(scaling) -> dict[str, float]:
    """What one training worker reserves (scaling.cpus_per_worker, and scaling.gpus_per_worker with GPUs)."""
    bundle = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        bundle["GPU"] = float(scaling.gpus_per_worker)
    return bundle


def workers_need(scaling) -> dict[str, float]:
    """What the worker group needs to start: num_workers bundles (min of a [min, max] range: an elastic run starts
    as soon as min workers fit and grows when more resources appear)."""
    return {k: v * scaling.min_workers for k, v in worker_bundle(scaling).items()}


def eval_task_need(cfg) -> dict[str, float]:
    """What a run's generation-eval task (train.eval_generate) holds beside its workers while it runs: Ray Train
    runs at most one at a time per run, outside the run's placement group; nothing when the eval is off."""
    if not enabled(cfg):
        return {}
    g = cfg.train.eval_generate
    return {"CPU": float(g.num_cpus), "GPU": float(g.num_gpus)}


def trial_need(scaling, eval_need: dict[str, float] | None = None) -> dict[str, float]:
    """Everything one sweep trial holds while it trains: its driver, its workers and its eval task (eval_task_need)."""
    need, extra = workers_need(scaling), eval_need or {}
    return {
        "CPU": TRIAL_DRIVER_CPUS + need["CPU"] + extra.get("CPU", 0.0),
        "GPU": need.get("GPU", 0.0) + extra.get("GPU", 0.0),
    }


@dataclass
class NodeGroup:
    """One autoscaler node type: the resources of one node and how many such nodes there may be (-1: no limit)."""

    resources: dict[str, float]
    max_count: int


@dataclass
class Capacity:
    """What the cluster has now and, with an autoscaler, the most it may grow to (None: no autoscaler known)."""

    now: dict[str, float]
    most: dict[str, float] | None = None
    autoscaling: bool = False  # an autoscaler runs (true whenever `most` is known)

    def __post_init__(self) -> None:
        self.autoscaling = self.autoscaling or self.most is not None

    def limit(self, key: str) -> float:
        """The amount of `key` a job may count on: the autoscaler's maximum, else what is up now."""
        up = self.now.get(key, 0.0)
        return up if self.most is None else max(up, self.most.get(key, 0.0))


def autoscaler_maximum(
    groups: list[NodeGroup], head: dict[str, float] | None = None, limits: dict[str, float] | None = None
) -> dict[str, float]:
    """The most of each resource a cluster of these node groups (plus its head) can hold, capped by `limits`.

    >>> autoscaler_maximum([NodeGroup({"CPU": 8, "GPU": 1}, 4)], head={"CPU": 4})
    {'CPU': 36.0, 'GPU': 4.0}
    """
    total: dict[str, float] = {k: float(v) for k, v in (head or {}).items()}
    for g in groups:
        for k, v in g.resources.items():
            add = math.inf if g.max_count < 0 else float(v) * g.max_count
            total[k] = total.get(k, 0.0) + add
    for k, cap in (limits or {}).items():
        if k in total:
            total[k] = min(total[k], float(cap))
    return total


def read_capacity() -> Capacity:
    """The connected cluster's resources now and, when its autoscaler reported a config, its maximum."""
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    most = _autoscaler_groups_max()
    return Capacity(now, most, autoscaling=most is not None or _autoscaler_reports_status())


def _autoscaler_reports_status() -> bool:
    """Whether an autoscaler runs that did not report its node groups (the cluster launcher's and KubeRay's
    v1 monitor): it writes the status `ray status` prints into the GCS key-value store."""
    try:
        import ray.experimental.internal_kv as kv

        raw = kv._internal_kv_initialized() and kv._internal_kv_get("__autoscaling_status")
        return bool(raw) and autoscaler_has_node_types(json.loads(raw))
    except Exception as exc:  # noqa: BLE001 - unknown means no autoscaler known: judge by the nodes up
        log.debug("no autoscaler status: %s", exc)
        return False


def autoscaler_has_node_types(status: dict) -> bool:
    """Whether the monitor's status names configured node types (a launcher or KubeRay cluster that can add
    nodes). A plain `ray start` or local instance runs the monitor too, but maps each node to `node_<id>` only."""
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(name != f"node_{node_id}" for node_id, name in mapping.items())


def _autoscaler_groups_max() -> dict[str, float] | None:
    """Max resources from the cluster config the autoscaler reports to the GCS (None when there is none).

    Ray exposes this only through its state accessor (the same call Ray Train V2's worker group makes
    for the same purpose); a cluster without an autoscaler, or one too old to report, gives None.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown", which the caller handles
        log.debug("no autoscaler config: %s", exc)
        return None
    if config is None or not config.node_group_configs:
        return None
    groups = [
        NodeGroup({k: float(v) for k, v in g.resources.items()}, int(g.max_count)) for g in config.node_group_configs
    ]
    return autoscaler_maximum(groups, limits={k: float(v) for k, v in config.max_resources.items()})


def check_fits(need: dict[str, float], capacity: Capacity, what: str, knobs: str) -> None:
    """Refuse, in one sentence, a need the cluster can never meet; warn when it must first scale up."""
    for key, amount in need.items():
        if amount <= EPS:
            continue
        limit = capacity.limit(key)
        if capacity.autoscaling and capacity.most is None and amount > limit + EPS:
            log.warning(
                "%s needs %g %ss; the cluster has %g now and an autoscaler whose maximum is unknown: "
                "the run waits until it has added the nodes (or forever, if it cannot)",
                what,
                amount,
                key,
                limit,
            )
            continue
        if amount > limit + EPS:
            where = "can grow to" if capacity.most is not None else "has"
            raise ClusterError(f"{what} needs {amount:g} {key}s ({knobs}) but the Ray cluster {where} {limit:g}.")
        if amount > capacity.now.get(key, 0.0) + EPS:
            log.warning(
                "%s needs %g %ss; the cluster has %g now and its autoscaler may add up to %g: "
                "the run waits for the new nodes",
                what,
                amount,
                key,
                capacity.now.get(key, 0.0),
                limit,
            )


def check_workers_fit(scaling, capacity: Capacity | None = None) -> None:
    """The worker group of `scaling` fits the cluster (now, or once its autoscaler has scaled up)."""
    s = scaling
    workers = f"{s.min_workers} (the min of {s.num_workers})" if s.elastic else s.num_workers
    knobs = f"scaling.num_workers={workers} x scaling.cpus_per_worker={s.cpus_per_worker:g}"
    if s.use_gpu:
        knobs += f", x scaling.gpus_per_worker={s.gpus_per_worker:g}"
    check_fits(workers_need(s), capacity or read_capacity(), "The training", knobs)


def trials_that_fit(scaling, capacity: Capacity, eval_need: dict[str, float] | None = None) -> int:
    """How many sweep trials (driver + workers + eval task each) the cluster can hold at once (at least 1, or
    ClusterError)."""
    need = trial_need(scaling, eval_need)
    fits = min(math.floor(capacity.limit(k) / v + EPS) for k, v in need.items() if v > 0)
    if fits < 1:
        s = scaling
        extra = ""
        if eval_need:
            extra = (
                f" plus the generation eval's {eval_need['CPU']:g} CPUs and {eval_need['GPU']:g} GPUs "
                "(train.eval_generate.num_cpus / num_gpus)"
            )
        raise ClusterError(
            f"One trial needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs (1 CPU for the trial driver plus "
            f"{s.min_workers} workers x scaling.cpus_per_worker {s.cpus_per_worker:g}{extra}) but the cluster has "
            f"{capacity.limit('CPU'):g} CPUs and {capacity.limit('GPU'):g} GPUs; lower scaling.num_workers or the "
            "per-worker resources."
        )
    return fits


# --- storage that every worker node can reach ---------------------------------------------------


def _worker_nodes(scaling) -> list[dict]:
    """Alive nodes that can host at least one training worker (a GPU run skips CPU-only heads)."""
    import ray

    bundle = worker_bundle(scaling)
    return [
        n
        for n in ray.nodes()
        if n.get("Alive") and all(n.get("Resources", {}).get(k, 0.0) + EPS >= v for k, v in bundle.items())
    ]


def _sees(path: str, token: str) -> bool:
    """On a node: does `path` hold `token` (the marker the driver wrote)?"""
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def check_shared_storage(
    storage_path: str | Path,
    scaling,
    timeout_s: float = 120.0,
    what: str = "run.storage_path",
    probe_file: str | None = None,
) -> None:
    """Every node that can host a worker must see the driver's run.storage_path (a GPU node, not only the head).

    The driver writes a marker file there; a zero-CPU task pinned to every node that can host a
    worker reads it back. A node that cannot is named in the error. `probe_file`: a file already in
    the folder that every node must read the same (a model folder's config.json: nothing is written).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _worker_nodes(scaling)
    if not nodes:
        return  # none up yet (an autoscaler adds them): Ray checks at the first checkpoint
    if probe_file is not None:
        marker = Path(storage_path) / probe_file
        token = marker.read_text()
    else:
        marker = Path(storage_path) / f".raysft-shared-{uuid.uuid4().hex}"
        token = uuid.uuid4().hex
        marker.write_text(token)
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
        refs = [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(marker), token
            )
            for n in nodes
        ]
        seen = ray.get(refs, timeout=timeout_s)
    finally:
        if probe_file is None:
            marker.unlink(missing_ok=True)
    blind = [n for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ClusterError(
            f"{what} {storage_path} is not shared: {len(blind)} of the {len(nodes)} nodes that can run "
            f"training workers (e.g. {blind[0].get('NodeManagerAddress')}, node {blind[0]['NodeID'][:12]}) cannot "
            "see it; use an s3:// / gs:// URI or a folder every node mounts at the same path (see cluster/README.md)."
        )
