"""The global data order over a sharded artifact, and a streaming reader with a bounded window.

Order (a pure function of seed, epoch, the shard index and `window`, never of the worker count):
  1. the shards are permuted per epoch: rng(seed, epoch);
  2. consecutive groups of `window` shards form windows; the rows of window w are shuffled with
     rng(seed, epoch, w);
  3. the epoch's order is window 0's rows, then window 1's, ...; step i of the epoch takes positions
     [i*R, (i+1)*R) with R = rows per optimizer step; rows that cannot fill a last step are left
     out of that epoch (counted), as before.
So step s trains the same rows at 1x4, 2x2 or 4x1 (workers x grad_accum): only the split of a
step's R rows into [grad_accum, workers, micro] differs. Shuffle quality vs memory: a row can only
meet rows of the same window in a step, so a larger window mixes more, and costs `window` shards of
memory (twice that while the next window is prefetched).

`ShardReader` serves a step's rows, holding at most two windows: the current one and the next (loaded
in a background thread while the current one trains), or the two a step straddles. It starts at any
step by computing the window that holds the step's first position: nothing before it is read, so the
time to the first step does not depend on where in the epoch a resumed run starts. Its counters
(`reads`, `bytes_read`) say exactly which shards were read.
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raysft.pipeline.data.shards import ShardIndex, read_shard
from raysft.pipeline.errors import DataError

DEFAULT_WINDOW = 2


@dataclass(frozen=True)
class ShardOrder:
    """Where each position of an epoch's order comes from; holds O(shards) numbers, never O(rows)."""

    shard_rows: tuple[int, ...]
    seed: int
    window: int = DEFAULT_WINDOW

    @property
    def n_rows(self) -> int:
        return sum(self.shard_rows)

    # B019: a run holds one or two small frozen (hashable) orders for its whole life; the cache keeping
    # them alive costs nothing
    @functools.lru_cache(maxsize=4)  # noqa: B019
    def shard_perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_rows))

    def n_windows(self) -> int:
        return -(-len(self.shard_rows) // self.window)

    def window_shards(self, epoch: int, w: int) -> list[int]:
        return self.shard_perm(epoch)[w * self.window : (w + 1) * self.window].tolist()

    @functools.lru_cache(maxsize=4)  # noqa: B019 (see shard_perm)
    def window_starts(self, epoch: int) -> np.ndarray:
        """Epoch position where each window starts, plus the end: [n_windows + 1]."""
        sizes = [sum(self.shard_rows[s] for s in self.window_shards(epoch, w)) for w in range(self.n_windows())]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def window_perm(self, epoch: int, w: int) -> np.ndarray:
        n = sum(self.shard_rows[s] for s in self.window_shards(epoch, w))
        return np.random.default_rng([self.seed, epoch, w]).permutation(n)

    def locate(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(window, offset in the window's shuffled order) of epoch positions."""
        starts = self.window_starts(epoch)
        w = np.searchsorted(starts, positions, side="right") - 1
        return w, positions - starts[w]


@dataclass(frozen=True)
class StepLayout:
    """How many rows an optimizer step takes and how many steps run; derived from the index only."""

    n_rows: int
    rows_per_step: int
    max_steps: int | None = None
    epochs: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.rows_per_step

    @property
    def left_out_per_epoch(self) -> int:
        return self.n_rows - self.steps_per_epoch * self.rows_per_step

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def require_a_step(self, world_size: int, grad_accum: int, micro: int) -> StepLayout:
        if self.steps_per_epoch == 0:
            raise DataError(
                f"Prepared train data has {self.n_rows} packed rows, fewer than one optimizer step needs "
                f"({self.rows_per_step}: train.global_batch_rows, or scaling.num_workers (its max) x train.grad_accum "
                f"x train.micro_batch_size = {world_size} x {grad_accum} x {micro})."
            )
        return self

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, first epoch position) of 0-based global step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return epoch, i * self.rows_per_step


@dataclass
class ReaderCounters:
    """What a reader read: (epoch, window, shard) per shard read, bytes and rows."""

    reads: list[tuple[int, int, int]] = field(default_factory=list)
    bytes_read: int = 0
    rows_served: int = 0
    waits_s: float = 0.0  # time steps waited for a window that was not prefetched yet

    def to_dict(self) -> dict:
        return {
            "reads": [list(r) for r in self.reads],
            "bytes_read": self.bytes_read,
            "rows_served": self.rows_served,
            "waits_s": round(self.waits_s, 4),
        }


class ShardReader:
    """A step's rows from the shards; at most the current and the next window in memory."""

    def __init__(
        self,
        index: ShardIndex,
        order: ShardOrder,
        layout: StepLayout,
        *,
        columns: list[str] | None = None,
        prefetch: bool = True,
    ) -> None:
        if tuple(s.rows for s in index.shards) != order.shard_rows:
            raise ValueError("the order was built for another index")
        self.index, self.order, self.layout, self.columns = index, order, layout, columns
        self.counters = ReaderCounters()
        self._windows: dict[tuple[int, int], Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="raysft-shards") if prefetch else None
        self._lock = threading.Lock()

    # -- loading ------------------------------------------------------------------------------------------
    def _load(self, epoch: int, w: int) -> tuple[pa.Table, np.ndarray]:
        """Window (epoch, w): its shards concatenated in window order, and its row permutation."""
        tables = []
        for s in self.order.window_shards(epoch, w):
            t = read_shard(self.index, s, self.columns)
            with self._lock:
                self.counters.reads.append((epoch, w, s))
                self.counters.bytes_read += self.index.shards[s].bytes
            tables.append(t)
        return pa.concat_tables(tables).combine_chunks(), self.order.window_perm(epoch, w)

    def _future(self, epoch: int, w: int) -> Future:
        key = (epoch, w)
        if key not in self._windows:
            if self._pool is not None:
                self._windows[key] = self._pool.submit(self._load, epoch, w)
            else:
                f: Future = Future()
                try:
                    f.set_result(self._load(epoch, w))
                except BaseException as exc:  # surfaced by .result(), as with the thread
                    f.set_exception(exc)
                self._windows[key] = f
        return self._windows[key]

    def _next_window(self, epoch: int, w: int) -> tuple[int, int] | None:
        if w + 1 < self.order.n_windows():
            return epoch, w + 1
        if (epoch + 1) * self.layout.steps_per_epoch < self.layout.total_steps:
            return epoch + 1, 0
        return None

    def _window(self, epoch: int, w: int) -> tuple[pa.Table, np.ndarray]:
        fut = self._future(epoch, w)
        start = time.perf_counter()
        loaded = fut.result()
        self.counters.waits_s += time.perf_counter() - start
        return loaded

    # -- serving ------------------------------------------------------------------------------------------
    def step(self, step: int) -> tuple[int, pa.Table]:
        """(epoch, the step's rows_per_step rows in step order). Earlier windows are released."""
        epoch, first = self.layout.position(step)
        positions = np.arange(first, first + self.layout.rows_per_step, dtype=np.int64)
        windows, within = self.order.locate(epoch, positions)
        needed = [(epoch, int(w)) for w in np.unique(windows)]
        for key in list(self._windows):  # release what this and later steps no longer need
            if key < needed[0]:
                self._windows.pop(key).cancel()
        parts = []
        for w in np.unique(windows):
            table, perm = self._window(epoch, int(w))
            parts.append(table.take(pa.array(perm[within[windows == w]])))
        nxt = self._next_window(*needed[-1])
        if nxt is not None and len(needed) == 1:
            self._future(*nxt)  # background prefetch of the next window (not while a step straddles two)
        out = pa.concat_tables(parts).combine_chunks() if len(parts) > 1 else parts[0]
        self.counters.rows_served += out.num_rows
        return epoch, out

    def close(self) -> None:
        for f in self._windows.values():
            f.cancel()
        self._windows.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reader_for(
    index: ShardIndex,
    *,
    seed: int,
    window: int,
    rows_per_step: int,
    max_steps: int | None,
    epochs: int,
    columns: list[str] | None = None,
    prefetch: bool = True,
) -> ShardReader:
    """A reader over `index` for a run of this shape."""
    order = ShardOrder(tuple(s.rows for s in index.shards), seed, window)
    layout = StepLayout(index.rows, rows_per_step, max_steps, epochs)
    return ShardReader(index, order, layout, columns=columns, prefetch=prefetch)
