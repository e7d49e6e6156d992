"""Checks and readers only the tests need (they were in the package with no caller there): the ledger's
exactly-once check, a ShardOrder's rows as global indices, a prepared split read whole, a batch of raw
rows normalised, and the demo's report.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raysft.pipeline.data.formats import parse_and_normalise
from raysft.pipeline.data.schema import REQUIRED_COLUMNS
from raysft.pipeline.errors import DataError

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
NORMALISED_SCHEMA = pa.schema(
    [
        ("source_id", pa.int64()),
        ("split", pa.int8()),
        ("messages", MESSAGE_TYPE),
        ("text", pa.string()),
        ("drop_reason", pa.string()),
    ]
)


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


def global_rows(order, epoch: int, positions: np.ndarray) -> np.ndarray:
    """A training.reader.ShardOrder's rows as indices into the shards concatenated in index order."""
    offsets = np.concatenate([[0], np.cumsum(order.shard_rows)]).astype(np.int64)
    windows, within = order.locate(epoch, np.asarray(positions, dtype=np.int64))
    out = np.empty(len(windows), dtype=np.int64)
    for w in np.unique(windows):
        shards = order.window_shards(epoch, int(w))
        rows = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shards])
        sel = windows == w
        out[sel] = rows[order.window_perm(epoch, int(w))[within[sel]]]
    return out


def read_split(directory: str | os.PathLike | None, what: str) -> pa.Table | None:
    """All Parquet files of a prepared split, in file-name order, as one pyarrow Table (None: no eval data)."""
    import pyarrow.parquet as pq

    if directory is None:
        return None
    files = sorted(Path(directory).rglob("*.parquet"))
    if not files:
        if what == "eval":
            return None
        raise DataError(f"Prepared train data in {directory} has no Parquet files.")
    table = pa.concat_tables([pq.read_table(f) for f in files]).combine_chunks()
    missing = set(REQUIRED_COLUMNS) - set(table.column_names)
    if missing:
        raise DataError(f"Prepared {what} data in {directory} lacks column(s) {sorted(missing)}.")
    return table


def normalise_batch(table: pa.Table, fmt: str = "auto", system_prompt: str | None = None) -> pa.Table:
    """Read table (source_id, split, row, read_reason) -> NORMALISED_SCHEMA table, row by row."""
    rows = table.column("row").to_pylist()
    reasons = table.column("read_reason").to_pylist()
    out = [parse_and_normalise(r, fmt, system_prompt, why) for r, why in zip(rows, reasons)]
    return pa.table(
        {
            "source_id": table.column("source_id"),
            "split": table.column("split"),
            "messages": pa.array(
                [
                    None if n.messages is None else [{"role": m["role"], "content": m["content"]} for m in n.messages]
                    for n in out
                ],
                MESSAGE_TYPE,
            ),
            "text": pa.array([n.text for n in out], pa.string()),
            "drop_reason": pa.array([n.drop_reason for n in out], pa.string()),
        },
        schema=NORMALISED_SCHEMA,
    )


def report_of(output: str | os.PathLike) -> dict[str, Any]:
    """The report.json a finished demo wrote into `output`."""
    return json.loads((Path(output) / "report.json").read_text())
