"""Process helpers for tests that start their own Ray heads or clusters in a new process session.

start_head: a local Ray head started with `ray start --head --block` in its own session and temp dir (so
/tmp/ray/ray_current_cluster and teammates' local clusters are untouched), on free ports, with token
authentication and a token of its own passed through RAY_AUTH_TOKEN (~/.ray/auth_token is neither read nor
written). Its `python` is this virtualenv's, so job entrypoints find `raysft`. Stopping never uses `ray stop`
(which kills every Ray process on the machine): SIGTERM to the head process, then SIGKILL to whatever is left in
the session it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """The live processes of session `sid`. Zombies are left out: they are dead already, and one whose parent
    is this test process (the session leader it started) stays a zombie until that parent waits for it."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and not _zombie(entry):
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _zombie(proc_dir: Path) -> bool:
    try:
        stat = (proc_dir / "stat").read_text()
    except OSError:
        return True  # gone
    return stat[stat.rfind(")") + 2 :].startswith(("Z", "X"))  # the state follows "(comm) "


def kill_session(sid: int) -> None:
    """SIGKILL what is left of a process session a test started (only processes that test started)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `mnt` for the block (root only); skips the test where mounting is not allowed."""
    import pytest

    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]
    if subprocess.run(mount, capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@dataclass
class LocalHead:
    url: str
    token: str
    temp_dir: Path
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)  # what the head runs with

    def client_env(self, token: bool = True, mode: str | None = None) -> dict[str, str]:
        """Environment for a client process: the token (or none) and RAY_AUTH_MODE as given."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
        }
        env["PATH"] = self.env["PATH"]
        env["HOME"] = str(self.temp_dir / "home")  # no ~/.ray/auth_token from other runs
        if token:
            env["RAY_AUTH_TOKEN"] = self.token
        if mode:
            env["RAY_AUTH_MODE"] = mode
        return env

    def stop(self) -> None:
        """Stop the head and its session's processes; a second call does nothing."""
        if not self.temp_dir.exists():
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        kill_session(self.proc.pid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int = 4, timeout_s: float = 120) -> LocalHead:
    temp_dir = Path(tempfile.mkdtemp(prefix="rsft_", dir="/tmp"))  # short: Ray's socket paths must stay short
    (temp_dir / "home").mkdir()
    token = uuid.uuid4().hex + uuid.uuid4().hex
    dashboard_port, gcs_port = free_port(), free_port()
    env = dict(os.environ)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    # RAY_ADDRESS names this head for Ray's own processes (e.g. Train's placement-group cleaner), which
    # otherwise scan the machine for "the" cluster and give up when teammates' clusters run too.
    env.update(
        RAY_ADDRESS=f"127.0.0.1:{gcs_port}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        HOME=str(temp_dir / "home"),
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs_port}",
        "--node-ip-address=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(temp_dir / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = LocalHead(url=f"http://127.0.0.1:{dashboard_port}", token=token, temp_dir=temp_dir, proc=proc, env=env)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = requests.get(head.url + "/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=2)
            if r.status_code == 200:
                return head
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            text = (temp_dir / "head.log").read_text(errors="replace")[-2000:]
            head.stop()
            raise RuntimeError(f"local Ray head did not come up:\n{text}")
        time.sleep(0.5)
