"""Preemption notices: a node drain announced by Ray, or SIGTERM, turns the next optimizer-step boundary
into a checkpoint (all ranks agree), and every later boundary too while the notice stands.

Each rank reads its own notice without blocking (an attribute Ray's preemption watcher sets, a flag the
SIGTERM handler sets); the loop ORs it into the all-reduce it already runs at the end of every step, so
all ranks take the same decision at the same step and no collective is added. See ARCHITECTURE.md
("Preemption") for what Ray 2.60 exposes and what it does not.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Notice:
    """Why this rank expects to lose its node, and when (UNIX seconds; None when nobody said)."""

    reason: str
    deadline_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        left = None if self.deadline_s is None else round(self.deadline_s - time.time(), 1)
        return {"reason": self.reason, "deadline_s": self.deadline_s, "seconds_left": left}


NoticeSource = Callable[[], "Notice | None"]


class PreemptionWatch:
    """This rank's pending notice: the context's drain notice (Ray) or a SIGTERM this process received.

    The SIGTERM handler is installed only from the main thread (Python allows nothing else): under
    torchrun or a plain process. The first SIGTERM is a notice; a second one gets the handler that
    was there before (by default the process ends). `close()` puts that handler back.
    """

    def __init__(self, drain: NoticeSource | None = None) -> None:
        self.drain = drain
        self.sigterm = threading.Event()
        self._previous: Any = None
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.sigterm.is_set():  # asked twice: do what the process did before we were here
            self.close()
            os.kill(os.getpid(), signum)
            return
        self.sigterm.set()

    def pending(self) -> Notice | None:
        """Non-blocking: the notice this rank holds now, or None."""
        if self.sigterm.is_set():
            return Notice("SIGTERM")
        return self.drain() if self.drain is not None else None

    def close(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self.installed = False
