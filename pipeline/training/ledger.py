"""samples.jsonl, the data ledger: one line per optimizer step with every source id it trained (all ranks).

Saved with every checkpoint and rewound to the checkpoint's step on resume, so after any number of
restarts each step appears once and no source id appears twice within an epoch (pipeline/ARCHITECTURE.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from raysft.pipeline import jsonl

LEDGER_FILE = "samples.jsonl"


class Ledger:
    """Append-only JSON lines file, written by rank 0 only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, step: int, epoch: int, source_ids: Iterable[int]) -> None:
        jsonl.append(self.path, {"step": int(step), "epoch": int(epoch), "source_ids": [int(s) for s in source_ids]})

    def entries(self) -> list[dict]:
        return jsonl.read(self.path)

    def rewind(self, step: int, source: str | os.PathLike | None = None) -> None:
        """Keep only steps <= `step`; take them from `source` (a checkpoint's copy) when given."""
        jsonl.rewind(self.path, step, source=source if source is not None else self.path)


def check_exactly_once(entries: list[dict], kept_per_epoch: dict[int, set[int]] | None = None) -> None:
    """Raise AssertionError unless each step appears once and no source id repeats within an epoch."""
    steps = [e["step"] for e in entries]
    assert len(steps) == len(set(steps)), "a step appears more than once"
    seen: dict[int, set[int]] = {}
    for e in entries:
        ids = seen.setdefault(e["epoch"], set())
        for s in e["source_ids"]:
            assert s not in ids, f"source id {s} twice in epoch {e['epoch']}"
            ids.add(s)
    for epoch, kept in (kept_per_epoch or {}).items():
        assert seen.get(epoch, set()) == kept, f"epoch {epoch} does not list every kept row"
