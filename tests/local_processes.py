"""Process helpers for tests that start their own Ray heads or clusters in a new process session."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


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
