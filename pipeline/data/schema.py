"""The processed-dataset contract: the packed-row columns, the ignore index, and a prepared dataset.

One home for what the data plan writes and the training loop reads (docs: "Processed dataset"):
one row per packed sequence, `labels` aligned with `input_ids` and IGNORE_INDEX where no loss is
taken, `position_ids` restarting at 0 for every packed sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

IGNORE_INDEX = -100  # label of a token that carries no loss (the value torch's cross_entropy skips)

PACKED_ROW_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("seq_lengths", pa.list_(pa.int32())),
        ("source_ids", pa.list_(pa.int64())),
    ]
)
PACKED_COLUMNS: list[str] = PACKED_ROW_SCHEMA.names
# What training reads of a row (seq_lengths follows from position_ids).
REQUIRED_COLUMNS: list[str] = ["input_ids", "labels", "position_ids", "source_ids"]


@dataclass
class Prepared:
    """A prepared dataset on disk: Parquet folders of packed rows and the stats.json content."""

    train_dir: Path
    eval_dir: Path | None
    stats: dict
    key: str = ""
