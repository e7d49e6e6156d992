"""samples.jsonl, the data ledger: one line per optimizer step with every source id it trained (all ranks).

Saved with every checkpoint and rewound to the checkpoint's step on resume, so after any number of
restarts each step appears once and no source id appears twice within an epoch (pipeline/ARCHITECTURE.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from raysft.pipeline import jsonl


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
