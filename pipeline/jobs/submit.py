"""`raysft submit / status / logs / stop`: run `raysft train` or `raysft tune` as a Ray Job on a running cluster.

Talks to the cluster's dashboard (Ray Jobs REST API, `JobSubmissionClient`). Works with clusters
that require Ray's token authentication (token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token, read here in Ray's order; no private Ray API) and with those that do not. Each
command returns its exit code: 0 success, 1 the job failed or was stopped, 2 (a `ClusterError`/
`ConfigError`) the request itself failed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlparse

from raysft.pipeline import lease, storage
from raysft.pipeline.errors import ClusterError, RunInUseError

T = TypeVar("T")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# ---------------------------------------------------------------- connecting


def dashboard_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, as an http(s) URL of the dashboard."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        raise ClusterError(
            "No cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS to the dashboard URL."
        )
    if address.startswith("ray://"):
        raise ClusterError(
            f"Address {address} is a Ray Client address; raysft submits through the dashboard, e.g. http://HEAD:8265."
        )
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def _check_reachable(url: str, timeout_s: float = 10.0) -> None:
    """Fail fast with one sentence instead of hanging on an address nobody answers."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(
            f"Cannot reach the Ray dashboard at {url} ({reason}); is the cluster running and its dashboard port open?"
        ) from None


def local_token() -> str | None:
    """The cluster token the way Ray looks it up: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token (whatever RAY_AUTH_MODE says); None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        return open(path).read().strip() or None
    except OSError:
        return None


def _local_token_header() -> dict[str, str]:
    token = local_token()
    return {"authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None):
    """A JobSubmissionClient for the cluster, sending a token only when the cluster asks for one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    _check_reachable(url)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError:
        # Ray adds the token itself only when RAY_AUTH_MODE=token; retry with the local token otherwise.
        headers = {} if os.environ.get("RAY_AUTH_MODE") == "token" else _local_token_header()
        if headers:
            try:
                return JobSubmissionClient(url, headers=headers)
            except AuthenticationError:
                pass
        raise ClusterError(
            f"The Ray cluster at {url} requires token authentication and no valid token was found: "
            "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or write ~/.ray/auth_token) "
            "to the cluster's token."
        ) from None
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"Cannot talk to the Ray Jobs API at {url}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".") + "."


def _call(what: str, job_id: str, url: str, fn: Callable[[], T]) -> T:
    """Run one Jobs API call, turning a missing job or a failed request into one sentence."""
    import requests

    try:
        return fn()
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise ClusterError(f"No job {job_id} on the Ray cluster at {url}.") from None
        raise ClusterError(f"Could not {what} job {job_id} at {url}: {_first_line(exc)}") from None
    except (ConnectionError, requests.RequestException):
        raise ClusterError(
            f"Lost the connection to the Ray cluster at {url} while trying to {what} job {job_id}."
        ) from None


# ---------------------------------------------------------------- submitting


def job_command(cfg, requested: str | None) -> str:
    """train or tune: the flag when given, else tune exactly when the config has a search space."""
    return requested or ("tune" if cfg.tune.search_space else "train")


def entrypoint(command: str, config_name: str) -> str:
    """The job's shell command; `python` is the cluster's interpreter, raysft is imported from the job's directory."""
    return f"python -m raysft.pipeline.cli {command} {shlex.quote(config_name)}"


def new_job_id(run_name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")[:40] or "run"
    return f"raysft-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def submit(
    config: str,
    overrides: Sequence[str] = (),
    *,
    address: str | None = None,
    wait: bool = False,
    job_command_name: str | None = None,
    env: Sequence[str] = (),
    working_dir: str | None = None,
    includes: Sequence[str] = (),
    excludes: Sequence[str] = (),
    dry_run: bool = False,
) -> int:
    """Validate the config here, ship its job package to the cluster and start the job; with `wait`, follow it.

    With `dry_run`, print the exact files and total size that would be uploaded, and contact no cluster.
    """
    # pydantic: status, logs and stop need no config
    from raysft.pipeline.config import load_config
    from raysft.pipeline.jobs.package import JOB_CONFIG_NAME, build_job_package

    cfg = load_config(config, overrides=list(overrides))  # a bad config fails here, before any upload
    command = job_command(cfg, job_command_name)
    if not dry_run:
        refuse_a_running_run(cfg)
    client = url = None
    if not dry_run:
        client = connect(address)
        url = client.get_address()
    with tempfile.TemporaryDirectory(prefix="raysft-job-") as staging:
        package = build_job_package(
            cfg,
            staging,
            working_dir=working_dir,
            includes=includes,
            env_names=env,
            extra_excludes=excludes,
        )
        for note in package.notes:
            print(f"raysft: note: {note}", file=sys.stderr)
        if dry_run:
            sizes = package.sizes()
            for rel, size in sizes:
                print(f"{size:>12}  {rel}")
            total = sum(size for _, size in sizes)
            print(f"{len(sizes)} files, {total} bytes ({total / 2**20:.2f} MiB) would be uploaded for `{command}`.")
            return 0
        job_id = new_job_id(cfg.run.name)
        # The upload happens inside submit_job, while the staging folder still exists.
        _call(
            "submit",
            job_id,
            url,
            lambda: client.submit_job(
                entrypoint=entrypoint(command, JOB_CONFIG_NAME),
                submission_id=job_id,
                runtime_env=package.runtime_env,
                metadata={
                    "raysft_command": command,
                    "raysft_config": os.path.basename(str(config)),
                },
            ),
        )
    print(f"Submitted job {job_id} ({command}, {len(package.files)} files) to {url}")
    print(f"Dashboard: {url}/#/jobs/{job_id}")
    if not wait:
        print(f"Follow it with: raysft logs {job_id} --follow --address {url}")
        return 0
    return _follow(client, job_id, url)


def refuse_a_running_run(cfg) -> None:
    """A run (or sweep) folder whose lease a live raysft holds is not submitted again (pipeline/lease.py); the job's
    own `raysft train` takes the lease on the cluster, which also covers a folder this machine cannot see."""
    options = storage.StorageOptions.of(cfg)
    folder = storage.join(cfg.run.storage_path, cfg.run.name)
    if not storage.is_remote(folder):
        folder = storage.local_path(folder)
    holder = lease.live_holder(lease.in_folder(folder), options)
    if holder is not None:
        raise RunInUseError(
            f"The run folder {folder} is in use by {holder.describe()}; wait for it to finish or stop it, "
            "then submit again."
        )


def _follow(client, job_id: str, url: str) -> int:
    """Stream the job's logs until it ends; 0 when it succeeded, 1 when it failed or was stopped."""

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    import aiohttp

    try:
        try:
            asyncio.run(stream())
        except (
            RuntimeError,
            aiohttp.ClientError,
            OSError,
        ) as exc:  # the log socket dropped: poll the status
            print(
                f"raysft: note: log stream ended early ({_first_line(exc).rstrip('.')}); "
                "waiting for the job to finish.",
                file=sys.stderr,
            )
        info = _wait_terminal(client, job_id, url)
    except KeyboardInterrupt:
        print(
            f"\nraysft: stopped following; the job keeps running (raysft stop {job_id} --address {url}).",
            file=sys.stderr,
        )
        raise
    return _report_end(job_id, info)


def _wait_terminal(client, job_id: str, url: str, poll_s: float = 1.0):
    while True:
        info = _call("query", job_id, url, lambda: client.get_job_info(job_id))
        if str(info.status) in TERMINAL:
            return info
        time.sleep(poll_s)


def _report_end(job_id: str, info: Any) -> int:
    status = str(info.status)
    if status == "SUCCEEDED":
        print(f"Job {job_id} succeeded.")
        return 0
    print(
        f"raysft: error: job {job_id} {status.lower()}{_why(info.message)}",
        file=sys.stderr,
    )
    return 1


def _why(message: str | None) -> str:
    """Ray's failure message is a header plus the log tail: keep the exit code and the last log line."""
    lines = [ln.strip() for ln in (message or "").strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    code = re.search(r"exit code (-?\d+)", lines[0])
    head = f" (exit code {code.group(1)})" if code else ""
    last = lines[-1] if len(lines) > 1 else ("" if code else lines[0])
    return f"{head}: {last}" if last else head


# ---------------------------------------------------------------- status, logs, stop


def status(job: str, address: str | None = None) -> int:
    """Print the job's status (and message); exit 0 when the cluster answered."""
    client = connect(address)
    url = client.get_address()
    info = _call("query", job, url, lambda: client.get_job_info(job))
    detail = _why(info.message) if str(info.status) == "FAILED" else ""
    print(f"{job}: {info.status}{detail}")
    return 0


def logs(job: str, address: str | None = None, follow: bool = False) -> int:
    """Print the job's logs so far; with `follow`, stream them and exit with the job's outcome."""
    client = connect(address)
    url = client.get_address()
    if follow:
        _call("query", job, url, lambda: client.get_job_info(job))
        return _follow(client, job, url)
    text = _call("read the logs of", job, url, lambda: client.get_job_logs(job))
    sys.stdout.write(text)
    return 0


def stop(job: str, address: str | None = None) -> int:
    """Ask the cluster to stop the job; waits briefly so the printed status is the final one."""
    client = connect(address)
    url = client.get_address()
    stopped = _call("stop", job, url, lambda: client.stop_job(job))
    if not stopped:
        info = _call("query", job, url, lambda: client.get_job_info(job))
        print(f"Job {job} had already ended: {info.status}.")
        return 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = _call("query", job, url, lambda: client.get_job_info(job))
        if str(info.status) in TERMINAL:
            print(f"Job {job} stopped: {info.status}.")
            return 0
        time.sleep(0.5)
    print(f"Job {job}: stop requested, still {info.status}.")
    return 0
