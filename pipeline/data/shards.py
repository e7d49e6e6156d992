"""The sharded prepared artifact: packed rows as Parquet shards of bounded size, plus an index.

A split folder (local or an object-store URI) holds `shard-NNNNN.parquet` files and `_index.json`:

    {"schema_version": 1, "cache_key": "...", "rows": R, "tokens": T,
     "shards": [{"file": "shard-00000.parquet", "rows": r, "tokens": t, "bytes": b, "crc32": c}, ...]}

`bytes` is the file's size, so a missing or truncated shard is found from one listing, before any
worker starts; `crc32` is the CRC-32 of the file's bytes (`verify_bytes` reads them back: ~2 GB/s of one
core, so the driver checks a local cache entry's bytes before training and an object store's only by size).
Each data page also carries Parquet's own CRC, checked wherever a shard is read (`read_shard`), so a change
that keeps the size fails the read instead of feeding other tokens. A shard is written in memory and stored
in one write (at most about `shard_mb` of file bytes held), which is how its CRC comes for free. A shard
closes once its rows reach `shard_mb` MiB in memory (Arrow's size, which is what a reader holds), so memory
per shard is a knob, not a property of the data set. The index is written last: a folder without it is
incomplete. Folders written before shards existed (any `*.parquet` files, no index) are read through an
index built from the Parquet footers.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysft.pipeline import storage
from raysft.pipeline.data.schema import PACKED_COLUMNS, REQUIRED_COLUMNS
from raysft.pipeline.storage import StorageError, StorageOptions

SCHEMA_VERSION = 1
INDEX_FILE = "_index.json"  # "_": Parquet data-set readers skip it, so the folder stays a plain data set
DEFAULT_SHARD_MB = 64


@dataclass(frozen=True)
class Shard:
    file: str  # relative to the split folder
    rows: int
    tokens: int
    bytes: int
    crc32: int | None = None  # None: written before checksums; its size is still checked


@dataclass
class ShardIndex:
    """What the driver reads instead of the rows: rows and tokens per shard."""

    root: str  # the split folder (path or URI)
    shards: list[Shard]
    cache_key: str = ""
    schema_version: int = SCHEMA_VERSION
    options: StorageOptions = field(default_factory=StorageOptions, compare=False)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def uri(self, i: int) -> str:
        return storage.join(self.root, self.shards[i].file)

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "cache_key": self.cache_key,
            "rows": self.rows,
            "tokens": self.tokens,
            "shards": [asdict(s) for s in self.shards],
        }

    def to_dict(self) -> dict:
        """What travels to workers (plain JSON)."""
        return {"root": self.root, **self.to_json(), "options": asdict(self.options)}

    @classmethod
    def from_dict(cls, d: dict) -> ShardIndex:
        return cls(
            d["root"],
            [Shard(**s) for s in d["shards"]],
            d.get("cache_key", ""),
            d.get("schema_version", SCHEMA_VERSION),
            StorageOptions(**(d.get("options") or {})),
        )


def row_bytes(table: pa.Table) -> np.ndarray:
    """Arrow bytes of each row (list values + offsets): what a shard of these rows holds in memory."""
    out = np.zeros(table.num_rows, dtype=np.int64)
    for col in table.columns:
        if pa.types.is_list(col.type):
            width = col.type.value_type.bit_width // 8
            out += pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64) * width + 4
        else:
            out += col.type.bit_width // 8
    return out


class ShardWriter:
    """Streams packed rows into shards of about `shard_mb` MiB under a split folder; `close()` writes the index."""

    def __init__(
        self,
        root: str,
        shard_mb: float = DEFAULT_SHARD_MB,
        cache_key: str = "",
        options: StorageOptions | None = None,
        max_rows: int | None = None,
    ) -> None:
        self.root, self.limit, self.cache_key = str(root), int(shard_mb * (1 << 20)), cache_key
        self.max_rows = max_rows  # a second bound, rows per shard (tests use it for exact layouts)
        self.options = options or StorageOptions()
        self.fs, self.path = storage.resolve(self.root, self.options)
        self.shards: list[Shard] = []
        self.writer: pq.ParquetWriter | None = None
        self.sink: pa.BufferOutputStream | None = None
        self.rows = self.tokens = self.nbytes = 0

    def _file(self) -> str:
        return f"shard-{len(self.shards):05d}.parquet"

    def write(self, table: pa.Table) -> None:
        table = table.select(PACKED_COLUMNS)
        while table.num_rows:
            if self.writer is None:
                # No dictionary encoding: token-id lists gain little from it (files ~25% larger) and it made
                # every shard ~4x slower to read back in the training reader (BENCHMARKS.md).
                self.sink = pa.BufferOutputStream()
                self.writer = pq.ParquetWriter(self.sink, table.schema, use_dictionary=False, write_page_checksum=True)
            cum = np.cumsum(row_bytes(table))
            take = int(np.searchsorted(cum, self.limit - self.nbytes, side="right"))
            if take == 0 and self.rows:  # the next row does not fit: start a new shard
                self._close_shard()
                continue
            take = max(take, 1)  # a single row larger than the limit gets a shard of its own
            if self.max_rows is not None:
                take = min(take, self.max_rows - self.rows)
            part = table.slice(0, take)
            self.writer.write_table(part)
            self.rows += part.num_rows
            self.tokens += int(pc.sum(pc.list_value_length(part.column("input_ids"))).as_py() or 0)
            self.nbytes += int(cum[take - 1])
            table = table.slice(take)
            if self.nbytes >= self.limit or (self.max_rows is not None and self.rows >= self.max_rows):
                self._close_shard()

    def _close_shard(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        data = self.sink.getvalue()
        name = self._file()
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{name}") as f:
            f.write(data)
        self.shards.append(Shard(name, self.rows, self.tokens, data.size, zlib.crc32(memoryview(data))))
        self.writer, self.sink, self.rows, self.tokens, self.nbytes = None, None, 0, 0, 0

    def abort(self) -> None:
        """Stop without an index (a failed prepare leaves no folder that looks finished)."""
        if self.writer is not None:
            self.writer.close()
        self.writer = self.sink = None

    def close(self) -> ShardIndex | None:
        """Close the last shard and write index.json (only when rows were written); the index or None."""
        self._close_shard()
        if not self.shards:
            return None
        index = ShardIndex(self.root, self.shards, self.cache_key, options=self.options)
        storage.write_bytes(
            storage.join(self.root, INDEX_FILE), json.dumps(index.to_json(), indent=1).encode(), self.options
        )
        return index


def has_rows(root: str | None, options: StorageOptions | None = None) -> bool:
    """Whether a split folder holds an index or Parquet files (eval splits may be empty)."""
    if root is None:
        return False
    return storage.exists(storage.join(str(root), INDEX_FILE), options) or bool(
        storage.list_files(str(root), ".parquet", options)
    )


def remedy(root: str, cache_key: str) -> str:
    """What to do about a damaged prepared split folder: a cache entry (ROOT/KEY/split) is rebuilt by the next
    train or prepare; a user's own `prepare --output` folder is the user's to write again."""
    entry = str(root).rstrip("/").rsplit("/", 1)[0]
    if cache_key and entry.rsplit("/", 1)[-1] == cache_key:
        return "train or prepare again and raysft rebuilds this cache entry"
    return f"write it again with `raysft prepare CONFIG --output {entry}`"


def load_index(
    root: str,
    options: StorageOptions | None = None,
    *,
    what: str = "train",
    check: bool = True,
    verify_bytes: bool = False,
) -> ShardIndex:
    """The index of a split folder; with `check`, every shard must exist with its recorded size, and with
    `verify_bytes` also its recorded CRC-32 (every byte is read). A damaged folder is one sentence naming the
    shard and the remedy.

    A folder without index.json (written before shards) gets one from its Parquet footers.
    """
    root = str(root)
    options = options or StorageOptions()
    index_uri = storage.join(root, INDEX_FILE)
    listing = {path: size for path, size in storage.list_files(root, ".parquet", options)}
    if storage.exists(index_uri, options):
        try:
            data = json.loads(storage.read_bytes(index_uri, options))
            index = ShardIndex(
                root,
                [Shard(**s) for s in data["shards"]],
                data.get("cache_key", ""),
                int(data.get("schema_version", 0)),
                options,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"The shard index {index_uri} is not valid ({exc}).") from None
        if index.schema_version != SCHEMA_VERSION:
            raise StorageError(
                f"The shard index {index_uri} has schema version {index.schema_version}; this raysft "
                f"reads version {SCHEMA_VERSION}: prepare the data again."
            )
        if check:
            for i, s in enumerate(index.shards):
                uri = index.uri(i)
                size = listing.get(_listed(uri))
                if size is None:
                    problem = f"listed in {index_uri} is missing"
                elif size != s.bytes:
                    problem = f"is truncated or changed ({size} bytes, the index says {s.bytes})"
                elif verify_bytes and s.crc32 is not None and zlib.crc32(storage.read_bytes(uri, options)) != s.crc32:
                    problem = f"is changed (its bytes do not match the CRC-32 in {index_uri})"
                else:
                    continue
                raise StorageError(f"The prepared {what} shard {uri} {problem}; {remedy(root, index.cache_key)}.")
        return index
    if not listing:
        raise StorageError(f"Prepared {what} data in {root} has no Parquet files.")
    shards = []
    for path, size in sorted(listing.items()):
        rel = path[len(_listed(root)) :].lstrip("/")
        try:
            meta = pq.read_metadata(*_open_args(path, options))
        except (OSError, ValueError, pa.ArrowInvalid) as exc:
            raise StorageError(
                f"The prepared {what} file {path} is not readable Parquet ({storage.describe(exc)})."
            ) from None
        shards.append(Shard(rel, meta.num_rows, -1, int(size)))
    return ShardIndex(root, shards, "", SCHEMA_VERSION, options)


def _listed(uri: str) -> str:
    """A URI/path as storage.list_files names it."""
    return uri if storage.is_remote(uri) else storage.local_path(uri)


def _open_args(uri: str, options: StorageOptions) -> tuple:
    fs, path = storage.resolve(uri, options)
    return (path,) if not storage.is_remote(uri) else (path, fs)


def read_shard(index: ShardIndex, i: int, columns: list[str] | None = None) -> pa.Table:
    """Shard `i` as one Arrow table; a missing, unreadable or short shard is one sentence naming its URI."""
    uri = index.uri(i)
    fs, path = storage.resolve(uri, index.options)
    try:
        # Parquet's page CRCs (written by ShardWriter) are checked as pages are read: a changed byte fails here.
        table = pq.read_table(path, filesystem=fs, columns=columns, page_checksum_verification=True)
    except FileNotFoundError:
        raise StorageError(f"The prepared shard {uri} is missing; {remedy(index.root, index.cache_key)}.") from None
    except (OSError, ValueError, pa.ArrowInvalid) as exc:
        if "NETWORK" in str(exc) or "NO_SUCH_BUCKET" in str(exc):
            raise storage.failure(uri, exc) from None
        raise StorageError(
            f"The prepared shard {uri} is truncated or corrupt ({storage.describe(exc)}); "
            f"{remedy(index.root, index.cache_key)}."
        ) from None
    if table.num_rows != index.shards[i].rows:
        raise StorageError(
            f"The prepared shard {uri} has {table.num_rows} rows, its index says {index.shards[i].rows}."
        )
    missing = set(REQUIRED_COLUMNS) - set(table.column_names)
    if missing:
        raise StorageError(f"The prepared shard {uri} lacks column(s) {sorted(missing)}.")
    return table.combine_chunks()


def read_all(index: ShardIndex, columns: list[str] | None = None) -> pa.Table:
    """Every shard of a (small) split, in index order: for eval sets."""
    return pa.concat_tables([read_shard(index, i, columns) for i in range(len(index.shards))]).combine_chunks()
