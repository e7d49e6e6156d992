"""Packed Parquet rows in the processed-dataset schema (pipeline/ARCHITECTURE.md), written without the data plan.

Training tests use them so they exercise only the training side; samples have a learnable pattern
(responses draw on a few tokens) and unequal trained-token counts.
"""

from __future__ import annotations

import random
from pathlib import Path

from raysft.pipeline.data.schema import IGNORE_INDEX as IGNORE
from raysft.pipeline.data.schema import PACKED_ROW_SCHEMA, Prepared

ROW_SCHEMA = PACKED_ROW_SCHEMA
ANSWER_TOKENS = [11, 12, 13, 14, 15, 16, 17, 18]  # responses use few tokens: a tiny model learns that fast


def make_sample(rng: random.Random, sid: int, vocab: int = 400) -> dict:
    n_prompt, n_resp = rng.randint(3, 10), rng.randint(2, 9)
    prompt = [rng.randrange(10, vocab) for _ in range(n_prompt)]
    response = [ANSWER_TOKENS[(prompt[0] + i) % len(ANSWER_TOKENS)] for i in range(n_resp)]
    ids = prompt + response
    return {"ids": ids, "labels": [IGNORE] * n_prompt + response, "sid": sid}


def pack_rows(samples: list[dict], per_row: int) -> list[dict]:
    rows = []
    for i in range(0, len(samples), per_row):
        group = samples[i : i + per_row]
        row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": [], "source_ids": []}
        for s in group:
            labels = list(s["labels"])
            labels[0] = IGNORE
            row["input_ids"] += s["ids"]
            row["labels"] += labels
            row["position_ids"] += list(range(len(s["ids"])))
            row["seq_lengths"].append(len(s["ids"]))
            row["source_ids"].append(s["sid"])
        rows.append(row)
    return rows


def write_rows(directory: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PACKED_ROW_SCHEMA), directory / "part-00000.parquet")
    return directory


def write_shards(directory: Path | str, rows: list[dict], rows_per_shard: int) -> str:
    """The rows as a sharded artifact (data/shards.py) with `rows_per_shard` rows per shard."""
    import pyarrow as pa

    from raysft.pipeline.data.shards import ShardWriter

    writer = ShardWriter(str(directory), shard_mb=1024, cache_key="test", max_rows=rows_per_shard)
    writer.write(pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    writer.close()
    return str(directory)


def make_prepared(
    root: Path, n_train: int = 48, n_eval: int = 8, per_row: int = 3, seed: int = 0, rows_per_shard: int | None = None
) -> Prepared:
    """`n_train` samples packed `per_row` to a row (source ids 0..n_train-1) and an eval split; with
    `rows_per_shard`, the train rows are a sharded artifact, else one plain Parquet file."""
    rng = random.Random(seed)
    train = [make_sample(rng, i) for i in range(n_train)]
    evals = [make_sample(rng, 10_000 + i) for i in range(n_eval)]
    if rows_per_shard:
        train_dir = Path(write_shards(root / "train", pack_rows(train, per_row), rows_per_shard))
    else:
        train_dir = write_rows(root / "train", pack_rows(train, per_row))
    eval_dir = write_rows(root / "eval", pack_rows(evals, per_row)) if n_eval else None
    return Prepared(train_dir, eval_dir, {"rows_used": n_train, "packed_rows": -(-n_train // per_row)}, "test")
