"""Ray processes of a raysft-owned local instance end with the raysft process, SIGKILL included.

Ray ties its head processes (GCS, raylet, dashboard) to the driver with the kernel's parent-death
signal, but the raylet's agents (DashboardAgent, RuntimeEnvAgent) outlive a SIGKILLed driver. So a
local instance raysft starts carries a marker in its environment, `RAYSFT_RAY_OWNER=PID:STARTTIME`
of the raysft process (every Ray process inherits it from the driver), and:

- a watchdog process (this file run as a script; stdlib only) waits for that raysft process to
  end and then kills the processes that carry its marker;
- every later local start kills processes whose marker names a raysft process that is gone
  (should the watchdog itself have been killed).

Processes are identified by the marker alone, read from /proc/PID/environ, which the kernel lets a
user read only for their own processes: nothing raysft did not start is ever signalled. Linux only
(elsewhere these functions find nothing).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

MARKER = "RAYSFT_RAY_OWNER"
PROC = Path("/proc")


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None when it is gone
    or has ended and waits to be reaped (a zombie)."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def owner_token(pid: int | None = None) -> str:
    """The marker value naming process `pid` (default: this one); PID reuse cannot fake it."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_time(pid)}"


def is_alive(token: str) -> bool:
    pid, _, started = token.partition(":")
    return pid.isdigit() and start_time(int(pid)) == started


def marked_processes() -> dict[int, str]:
    """pid -> marker value of every readable process that carries the marker (never this one)."""
    found, needle = {}, (MARKER + "=").encode()
    if not PROC.is_dir():
        return found
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # another user's process, or gone
            continue
        for item in environ.split(b"\0"):
            if item.startswith(needle):
                found[int(entry.name)] = item[len(needle) :].decode(errors="replace")
                break
    return found


def orphans() -> dict[int, str]:
    """pid -> marker of the marked processes whose raysft process is gone."""
    return {pid: token for pid, token in marked_processes().items() if not is_alive(token)}


def kill_marked(tokens: set[str] | None = None) -> list[int]:
    """SIGKILL the processes carrying one of `tokens` (None: every orphan); returns their pids."""
    killed = []
    found = orphans() if tokens is None else {p: t for p, t in marked_processes().items() if t in tokens}
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            pass
    return killed


def watch(token: str, poll_s: float = 0.5, settle_s: float = 3.0) -> None:
    """Wait until the process named by `token` ends, then kill what carries its marker (until none is left)."""
    while is_alive(token):
        time.sleep(poll_s)
    settled, give_up = time.monotonic() + settle_s, time.monotonic() + settle_s + 30
    while time.monotonic() < give_up:
        if not kill_marked({token}) and time.monotonic() > settled:
            break
        time.sleep(0.2)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for raysft must not stop the cleanup
    watch(sys.argv[1])
