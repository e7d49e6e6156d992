"""Lease scenarios shared by the local and the S3 lease tests (pipeline/lease.py): a holder in another process,
a killed holder, a holder elsewhere that stopped renewing, and many takers at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from raysft.pipeline import lease
from raysft.pipeline.errors import RunInUseError
from raysft.pipeline.storage import StorageOptions

HOLD = """
import sys, time
from raysft.pipeline import lease
from raysft.pipeline.storage import StorageOptions
held = lease.acquire(sys.argv[1], "The run folder", StorageOptions(endpoint_url=sys.argv[2] or None))
print("held", flush=True)
time.sleep(600)
"""


def holder_process(where: str, endpoint: str | None) -> subprocess.Popen:
    """Another process that takes the lease and keeps it until it is killed; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, where, endpoint or ""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.communicate(timeout=30)
    return proc


def refused_by_and_taken_over_from_a_killed_process(where: str, options: StorageOptions, capfd) -> None:
    proc = holder_process(where, options.endpoint_url)
    try:
        with pytest.raises(RunInUseError) as err:
            lease.acquire(where, "The run folder /r/x", options)
        since = r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
        pattern = (
            rf"The run folder /r/x is in use by raysft on host {socket.gethostname()} \(pid {proc.pid}, {since}\); "
            r"wait for it to finish or stop it, then run this again\."
        )
        assert __import__("re").fullmatch(pattern, str(err.value)), str(err.value)
        assert lease.live_holder(where, options).pid == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # The holder is gone (SIGKILL: no release): its lease is taken over at once on its own machine.
    assert lease.live_holder(where, options) is None
    capfd.readouterr()
    taken = lease.acquire(where, "The run folder /r/x", options)
    assert f"taking over The run folder /r/x from raysft on host {socket.gethostname()} (pid {proc.pid}" in (
        capfd.readouterr().err
    )
    assert lease.live_holder(where, options).pid == os.getpid()
    taken.release()
    assert lease.live_holder(where, options) is None


def holder_elsewhere(ttl_s: float) -> lease.Holder:
    """A lease record as a process on another machine writes it (its pid means nothing here)."""
    now = time.time()
    return lease.Holder("other-host", 4242, now, "other-host:1", now, ttl_s=ttl_s, renewed=now)


def elsewhere_refused_while_renewed_then_taken_over(where: str, options: StorageOptions, expire) -> None:
    store = lease.store_for(where, options)
    assert store.swap(None, holder_elsewhere(ttl_s=2.0)) is not None
    with pytest.raises(RunInUseError, match=r"in use by raysft on host other-host \(pid 4242, since "):
        lease.acquire(where, "The run folder", options)
    expire()  # no renewal for longer than its ttl_s
    taken = lease.acquire(where, "The run folder", options)
    assert lease.live_holder(where, options).pid == os.getpid()
    taken.release()


def one_of_many_takers_wins(where: str, options: StorageOptions, takers: int = 8) -> None:
    """Takers at once (threads: each its own swap, as processes would): exactly one holds the lease."""
    won, refused = [], []
    start = threading.Barrier(takers)

    def take() -> None:
        start.wait()
        try:
            won.append(lease.acquire(where, "The run folder", options))
        except RunInUseError:
            refused.append(1)

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(refused)) == (1, takers - 1)
    won[0].release()


def renewal_keeps_a_short_lease(where: str, options: StorageOptions) -> None:
    """A holder renews every ttl_s / 4: after several ttl_s it still holds, and a taker elsewhere is refused.
    (ttl_s 2: at 1 s, a renewal thread starved for a second on a loaded 2-core machine failed the age check.)"""
    held = lease.acquire(where, "The run folder", options, ttl_s=2.0)
    try:
        time.sleep(5.0)
        current = lease.store_for(where, options).read()
        assert current is not None and current[0].token == held.holder.token and current[1] < 2.0
        assert not held.lost
    finally:
        held.release()
