"""The sharded prepared artifact and the streaming reader, without Ray: bounded shards, the index, an
order that depends only on (seed, epoch, index), resume at any step without reading earlier shards,
and one sentence for a missing or truncated shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit import global_rows
from train_fixtures import make_sample, pack_rows, write_rows

from raysft.pipeline.data.shards import INDEX_FILE, ShardWriter, load_index, read_all, read_shard, row_bytes
from raysft.pipeline.storage import StorageError
from raysft.pipeline.training.reader import ShardOrder, reader_for


def packed_table(n_samples: int, per_row: int = 3, seed: int = 0) -> pa.Table:
    import random

    rng = random.Random(seed)
    rows = pack_rows([make_sample(rng, i) for i in range(n_samples)], per_row)
    schema = pa.schema(
        [
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("position_ids", pa.list_(pa.int32())),
            ("seq_lengths", pa.list_(pa.int32())),
            ("source_ids", pa.list_(pa.int64())),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def write_sharded(root: Path, table: pa.Table, shard_mb: float, batch: int = 7) -> None:
    w = ShardWriter(str(root), shard_mb=shard_mb, cache_key="k1")
    for i in range(0, table.num_rows, batch):
        w.write(table.slice(i, batch))
    w.close()


@pytest.fixture
def sharded(tmp_path) -> tuple[Path, pa.Table, float]:
    table = packed_table(300)  # 100 packed rows
    limit_mb = table.nbytes * 12 / table.num_rows / (1 << 20)  # about 12 rows per shard
    write_sharded(tmp_path / "train", table, limit_mb)
    return tmp_path / "train", table, limit_mb


def test_shards_are_bounded_and_the_index_counts_rows_and_tokens(sharded):
    root, table, limit_mb = sharded
    index = load_index(str(root))
    assert len(index.shards) >= 7 and index.rows == table.num_rows and index.cache_key == "k1"
    assert index.tokens == sum(len(x) for x in table.column("input_ids").to_pylist())
    limit = int(limit_mb * (1 << 20))
    for i, s in enumerate(index.shards):
        t = read_shard(index, i)
        assert t.num_rows == s.rows and row_bytes(t).sum() <= limit and t.nbytes <= 1.2 * limit, (i, t.nbytes)
    assert read_all(index).to_pylist() == table.to_pylist()  # shards keep the prepared order
    data = json.loads((root / INDEX_FILE).read_text())
    assert data["schema_version"] == 1 and data["rows"] == table.num_rows and data["shards"][0]["bytes"] > 0


def test_folder_without_index_is_read_through_its_footers(tmp_path):
    import random

    rng = random.Random(1)
    write_rows(tmp_path / "legacy", pack_rows([make_sample(rng, i) for i in range(30)], 3))
    index = load_index(str(tmp_path / "legacy"))
    assert [s.rows for s in index.shards] == [10] and read_shard(index, 0).num_rows == 10


def test_order_depends_only_on_seed_epoch_and_index():
    order = ShardOrder((5, 7, 3, 6, 4), seed=3, window=2)
    n = order.n_rows
    e0 = global_rows(order, 0, np.arange(n))
    assert sorted(e0.tolist()) == list(range(n))  # each epoch is a permutation of every row
    assert not np.array_equal(e0, global_rows(order, 1, np.arange(n)))
    assert np.array_equal(e0, global_rows(ShardOrder((5, 7, 3, 6, 4), seed=3, window=2), 0, np.arange(n)))
    assert not np.array_equal(e0, global_rows(ShardOrder((5, 7, 3, 6, 4), seed=4, window=2), 0, np.arange(n)))
    # A window's rows are contiguous in the epoch order: rows of the first window come from its shards only.
    offsets = np.cumsum((0, 5, 7, 3, 6, 4))
    first = order.window_shards(0, 0)
    in_first = {r for s in first for r in range(offsets[s], offsets[s + 1])}
    assert set(e0[: sum((5, 7, 3, 6, 4)[s] for s in first)].tolist()) == in_first


@pytest.mark.parametrize("window", [1, 2, 3])
def test_reader_serves_the_order_and_any_split_of_a_step_trains_the_same_rows(sharded, window):
    root, table, _ = sharded
    index = load_index(str(root))
    sids = table.column("source_ids").to_pylist()
    rps = 8
    with reader_for(index, seed=5, window=window, rows_per_step=rps, max_steps=None, epochs=2) as reader:
        steps = reader.layout.total_steps
        assert steps == 2 * (table.num_rows // rps)
        served = [reader.step(s) for s in range(steps)]
    for s, (epoch, t) in enumerate(served):
        pos = np.arange((s % (steps // 2)) * rps, (s % (steps // 2) + 1) * rps)
        want = global_rows(reader.order, epoch, pos)
        assert t.column("source_ids").to_pylist() == [sids[r] for r in want]
    # 1x4, 2x2 and 4x1 (workers x grad_accum) cut the same step rows: the union is the step, whatever the split.
    step_rows = served[3][1].column("source_ids").to_pylist()
    for world, accum in ((1, 8), (2, 4), (4, 2), (8, 1)):
        split = np.arange(rps).reshape(accum, world, 1)
        union = sorted(x for r in range(world) for k in range(accum) for x in step_rows[split[k, r, 0]])
        assert union == sorted(x for row in step_rows for x in row)
    epoch0 = [x for e, t in served if e == 0 for row in t.column("source_ids").to_pylist() for x in row]
    assert len(epoch0) == len(set(epoch0))  # exactly once within an epoch


def test_resume_at_a_step_reads_no_earlier_window_and_serves_the_same_rows(sharded):
    root, _, _ = sharded
    index = load_index(str(root))
    kw = dict(seed=0, window=2, rows_per_step=8, max_steps=None, epochs=1)
    with reader_for(index, **kw) as full:
        want = [full.step(s)[1] for s in range(full.layout.total_steps)]
    start = 7
    with reader_for(index, **kw) as resumed:
        got = [resumed.step(s)[1] for s in range(start, resumed.layout.total_steps)]
        first_window = int(resumed.order.locate(0, np.array([start * 8]))[0][0])
        reads = resumed.counters.reads
    assert [t.to_pylist() for t in got] == [t.to_pylist() for t in want[start:]]
    assert first_window > 0 and reads and min(w for _, w, _ in reads) == first_window
    earlier = {s for w in range(first_window) for s in resumed.order.window_shards(0, w)}
    assert not earlier & {s for _, _, s in reads}


def test_reader_holds_at_most_two_windows(sharded):
    root, _, _ = sharded
    index = load_index(str(root))
    with reader_for(index, seed=0, window=2, rows_per_step=4, max_steps=None, epochs=2) as reader:
        for s in range(reader.layout.total_steps):
            epoch, first = reader.layout.position(s)
            straddles = len(set(reader.order.locate(epoch, np.arange(first, first + 4))[0].tolist()))
            reader.step(s)
            assert len(reader._windows) <= 2 and straddles <= 2
        n_shards = len(index.shards)
        assert len(reader.counters.reads) == 2 * n_shards  # every shard once per epoch


def test_missing_or_truncated_shard_is_one_sentence_naming_it(sharded):
    root, _, _ = sharded
    shard = root / "shard-00002.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StorageError, match=r"shard .*shard-00002\.parquet is truncated"):
        load_index(str(root))
    # Truncated after the driver's check: the worker's read fails with the same kind of sentence.
    index = load_index(str(root), check=False)
    with pytest.raises(StorageError, match=r"shard-00002\.parquet is truncated or corrupt"):
        read_shard(index, 2)
    with reader_for(index, seed=0, window=len(index.shards), rows_per_step=4, max_steps=None, epochs=1) as reader:
        with pytest.raises(StorageError, match=r"shard-00002\.parquet"):
            reader.step(0)  # the background read's error reaches the step; no row is skipped
    shard.unlink()
    with pytest.raises(StorageError, match=r"shard .*shard-00002\.parquet listed in .*_index.json is missing"):
        load_index(str(root))


def test_parquet_files_are_valid_for_other_readers(sharded):
    root, table, _ = sharded
    assert pq.read_table(root).num_rows == table.num_rows  # the folder is a plain Parquet data set
