"""The one way raysft starts or joins Ray; what every caller needs from it is stated here.

Where Ray runs (`run.address`):
    unset, local   raysft's own new local instance (`address="local"`), shut down when the command
                   ends; never a cluster another process started, whatever /tmp/ray/ray_current_cluster
                   or $RAY_ADDRESS say. Inside a Ray Job (the job supervisor sets
                   RAY_JOB_CONFIG_JSON_ENV_VAR for the driver) it is the job's own cluster: that is
                   where the user sent the job.
    auto           the cluster `ray start` made on this machine, on purpose: $RAY_ADDRESS when it is a
                   GCS address, else the address `ray start` recorded in ray_current_cluster.
    HOST:PORT      that cluster (`ray://HOST:PORT`: through Ray Client).
A join first checks that something answers at the address (5 s) and caps Ray's own GCS connect
window at 20 s, so an unreachable or stale address is one sentence within 30 s, not a hang.

Environment of Ray's processes: one choice for every caller. A local instance inherits the driver's
environment, so WORKER_ENV is set in os.environ just before it starts (values the user already
set win). No job-level runtime_env is passed for it: one would leave the raylet's prestarted workers
(started without it) unusable, and every actor and task of the data plan would wait for fresh
workers. A joined cluster's processes do not inherit the driver's environment; there WORKER_ENV
travels as the job's runtime_env env_vars, the only way to reach them.

Processes of an instance raysft starts end with raysft, SIGKILL included (see ray_orphans.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raysft.pipeline import import_guard, ray_orphans
from raysft.pipeline.errors import ClusterError

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",  # one tokenizer per actor; no rayon threads competing for its CPU
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # Ray Train's print patch echoes every worker line twice
}
# Ray Data records usage stats from its executor thread after the last batch; if that races with
# ray.shutdown(), the core worker quick-exits the process with an error status (seen under load).
DRIVER_ENV = {"RAY_DATA_USAGE_DISABLED": "1"}
PROBE_TIMEOUT_S = 5.0
GCS_CONNECT_WINDOW_S = "20"  # Ray's RAY_gcs_server_port_wait_time_s: about one connect try per second
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's driver
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"  # ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR


@dataclass(frozen=True)
class Needs:
    """What a caller needs from its Ray instance."""

    dashboard: bool  # the State API, which Ray Train's placement-group cleaner polls (else it may remove live workers)
    log_to_driver: bool  # stream worker output to this terminal
    train: bool = False  # Ray Train will run: start its autoscaling coordinator early (`_warm_train`)


PREPARE = Needs(dashboard=False, log_to_driver=False)  # the data plan prints its own progress; no Train
TRAIN = Needs(dashboard=True, log_to_driver=True, train=True)  # train, tune and the demo


@contextlib.contextmanager
def session(
    address: str | None, needs: Needs, *, num_cpus: int | None = None, env: dict[str, str] | None = None
) -> Iterator[bool]:
    """Ray for the duration of the block (see `start`); shuts down what it started. Yields `start`'s answer."""
    started = start(address, needs, num_cpus=num_cpus, env=env)
    try:
        yield started
    finally:
        if started:
            stop()


def start(address: str | None, needs: Needs, *, num_cpus: int | None = None, env: dict[str, str] | None = None) -> bool:
    """Start or join Ray as `address` (run.address) says, unless Ray is already up in this process.

    True when this call started or joined it (the caller then calls `stop()`); False when the caller's
    own `ray.init` came first (a Python API user choosing resources, the test session), which is used as is.
    `num_cpus` sets a local instance's logical CPUs (a joined cluster has its own); `env` adds variables
    for Ray's processes.
    """
    import ray

    if ray.is_initialized():
        return False
    for name, value in DRIVER_ENV.items():
        os.environ.setdefault(name, value)
    wanted = {**WORKER_ENV, **(env or {})}
    if address in (None, "", "local") and JOB_CONFIG_ENV not in os.environ:
        where = "a local Ray instance"
        kwargs, scoped = _local(needs, num_cpus, wanted)
    else:
        target, where = _join_target(address)
        kwargs = dict(address=target, runtime_env=_job_env(wanted))
        scoped = (
            {}
            if "RAY_gcs_server_port_wait_time_s" in os.environ
            else {"RAY_gcs_server_port_wait_time_s": GCS_CONNECT_WINDOW_S}
        )
    try:
        with _environ(scoped):
            ray.init(log_to_driver=needs.log_to_driver, **kwargs)
    except Exception as exc:  # a head that cannot be reached, or a local node that failed to start
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ClusterError(f"Could not start or reach {where}: {first}") from None
    if needs.train:
        _warm_train()
    return True


def _warm_train() -> None:
    """Ask for Ray Train's autoscaling coordinator (a detached actor, one per cluster) now, without waiting.

    Every TorchTrainer's controller first sends it a resource request and waits up to 5 s for the reply; on a
    fresh instance that wait is the actor's process start (2-5 s on a small machine, and past 5 s a logged
    GetTimeoutError). Started here, the actor comes up while the driver checks the cluster and prepares the data.
    Ray Train creates it itself when this cannot (the function is internal to Ray), so a failure is ignored.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:  # noqa: BLE001 - an optimisation only
        pass


def stop() -> None:
    """Shut down (or leave) the Ray instance `start` started (or joined)."""
    import ray

    ray.shutdown()


def _local(needs: Needs, num_cpus: int | None, wanted: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """(ray.init arguments, variables set while it starts) for raysft's own instance. Its processes keep
    the variables; the driver's environment is restored. Kills what a SIGKILLed raysft run left first."""
    ray_orphans.kill_marked()
    _ensure_watchdog()
    kwargs: dict = dict(address="local", num_cpus=num_cpus, include_dashboard=needs.dashboard)
    scoped = {k: os.environ.get(k, v) for k, v in wanted.items()}
    scoped[ray_orphans.MARKER] = ray_orphans.owner_token()
    # Every worker runs the import guard first (Ray's worker_process_setup_hook, by the variable Ray reads;
    # as a runtime_env field it would leave the prestarted workers unusable, see the module docstring).
    scoped.setdefault(SETUP_HOOK_ENV, os.environ.get(SETUP_HOOK_ENV, import_guard.HOOK))
    if needs.dashboard:
        # Ray Train's placement-group cleaner finds the State API by scanning for clusters (and reads
        # ray_current_cluster, which may name another one): tell it where this instance's is.
        kwargs["dashboard_port"] = _free_port()
        scoped["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{kwargs['dashboard_port']}"
    return kwargs, scoped


def _job_env(wanted: dict[str, str]) -> dict:
    """WORKER_ENV as a job-level runtime_env, minus names a Ray Job already sets (Ray refuses a clash), and the
    import guard as the workers' setup hook unless the job has a hook of its own."""
    job_env: dict = {}
    if JOB_CONFIG_ENV in os.environ:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            job_env = json.loads(os.environ[JOB_CONFIG_ENV]).get("runtime_env") or {}
    taken = set(job_env.get("env_vars") or {})
    runtime_env: dict = {"env_vars": {k: os.environ.get(k, v) for k, v in wanted.items() if k not in taken}}
    if not job_env.get("worker_process_setup_hook") and SETUP_HOOK_ENV not in taken:
        runtime_env["worker_process_setup_hook"] = import_guard.HOOK
    return runtime_env


def _join_target(address: str | None) -> tuple[str | None, str]:
    """(what to pass to ray.init, how to name it in a message) for a cluster to join; probes it first."""
    if address in (None, "", "local"):  # inside a Ray Job: the supervisor set RAY_ADDRESS to its cluster
        return None, "the Ray Job's cluster"
    where = f"the Ray cluster at {address} (run.address)"
    if address == "auto":
        address, source = _auto_address()
        where = f"the Ray cluster at {address} (run.address: auto, from {source})"
    _probe(address, where)
    return address, where


def _auto_address() -> tuple[str, str]:
    """The cluster `ray start` made: $RAY_ADDRESS when it names a GCS, else ray_current_cluster."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env not in ("auto", "local") and not env.startswith(("http://", "https://")):
        return env, "$RAY_ADDRESS"
    path = ray_temp_root() / "ray" / "ray_current_cluster"
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    if not text:
        raise ClusterError(
            f"run.address is auto, but no cluster started with `ray start` is recorded on this machine "
            f"({path} is missing); start one, or leave run.address unset for raysft's own."
        )
    return text, str(path)


def ray_temp_root() -> Path:
    """Where Ray keeps its temp folder (`ray/`): $RAY_TMPDIR, else $TMPDIR on Linux, else /tmp (as Ray does)."""
    if "RAY_TMPDIR" in os.environ:
        return Path(os.environ["RAY_TMPDIR"])
    if sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        return Path(os.environ["TMPDIR"])
    return Path("/tmp")


def _probe(address: str, where: str) -> None:
    """One sentence when nothing accepts a connection at the address's host:port."""
    host, _, port = address.split("://")[-1].rstrip("/").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except ValueError:
        raise ClusterError(f"Could not reach {where}: it is not a HOST:PORT address.") from None
    except OSError as exc:
        raise ClusterError(
            f"Could not reach {where}: nothing answers there ({exc.strerror or exc}); is the cluster "
            "running (a head stopped without `ray stop` leaves a stale address)?"
        ) from None


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_watchdog: subprocess.Popen | None = None


def _ensure_watchdog() -> None:
    """One watchdog per raysft process: it kills this process's Ray processes once this process is gone."""
    global _watchdog
    if _watchdog is not None and _watchdog.poll() is None:
        return
    env = {k: v for k, v in os.environ.items() if k != ray_orphans.MARKER}
    _watchdog = subprocess.Popen(
        [sys.executable, "-I", ray_orphans.__file__, ray_orphans.owner_token()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # outside the terminal's process group: a Ctrl-C or a group kill leaves it running
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
