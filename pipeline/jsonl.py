"""JSON lines files (metrics, the data ledger, events, attempts): append one record, read all, rewind.

Appends are one `write` of one line; a rewind rewrites the file through a temporary sibling and an
atomic rename, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from raysft.pipeline.atomic import write_atomic


def append(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append `record` as one line (values that JSON cannot hold are written as their str())."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of the file, in order; [] when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Replace the file with `records` (temporary sibling + atomic rename)."""
    write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in records))


def rewind(path: str | os.PathLike, step: int, source: str | os.PathLike | None = None, key: str = "step") -> None:
    """Keep only records with record[key] <= step (a missing key counts as 0), read from `source` when given.

    A restart from the checkpoint of `step` repeats the steps after it; rewinding first keeps each once.
    """
    src = Path(source) if source is not None else Path(path)
    if source is None and not src.is_file():
        return
    write(path, [r for r in read(src) if r.get(key, 0) <= step])
