"""List and read input files: JSON lines, JSON arrays, Parquet, Arrow, directories, globs, hf://.

The driver turns a `data.train` / `data.eval` spec into `Chunk`s (a file slice with the row
number it starts at); `read_chunk` turns one chunk into a pyarrow table of raw JSON rows with
their source ids. Reading is split from parsing so a malformed line becomes a counted drop with
its line number instead of failing the whole file.

Source ids: a file's 0-based row number (line for JSON lines, element for a JSON array, row for
Parquet/Arrow) plus `file_index << 40`, where file_index is the file's position in the sorted
list of matched files (so a single file's ids are plain row numbers). With several weighted
sources (`data.train` as a list) the file index runs on across sources, in the listed order.
A row's extra samples get ids of their own, so no id repeats within an epoch: a turn's own view k
adds `k << 52`, a weighted repeat c adds `c << 58` (hence at most 4095 files, 63 views, 32 copies).

Weights: a train row of a source with weight w appears `copies` = floor(w) times in the epoch,
plus once more when a seeded hash of its source id falls under w - floor(w) (rows with 0 copies
are counted as `not_sampled`). Eval rows always have one copy.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysft.pipeline import storage
from raysft.pipeline.errors import DataError

FILE_SHIFT = 40  # source_id = (file_index << FILE_SHIFT) | row
MAX_ROW_BYTES = 64 << 20  # a longer JSON line is counted as malformed_json without being held in memory
VIEW_SHIFT, COPY_SHIFT = 52, 58  # extra samples of a row: | view << VIEW_SHIFT | copy << COPY_SHIFT
MAX_FILES, MAX_VIEWS, MAX_COPIES = (
    1 << (VIEW_SHIFT - FILE_SHIFT),
    1 << (COPY_SHIFT - VIEW_SHIFT),
    1 << (63 - COPY_SHIFT),
)
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
READ_SCHEMA = pa.schema(
    [
        ("source_id", pa.int64()),
        ("split", pa.int8()),
        ("row", pa.string()),
        ("read_reason", pa.string()),
        ("source", pa.int32()),
        ("copies", pa.int32()),
    ]
)
_COPY_SALT = 0x5BD1E995  # hash seed offset for the fractional copy (independent of the eval split's hash)


@dataclass
class Chunk:
    """A slice of one input file: what a read task reads."""

    path: str
    kind: str  # jsonl | json | parquet | arrow
    file_index: int
    split: int = 0  # 0 train, 1 eval
    first_row: int = 0
    byte_start: int = 0  # jsonl
    byte_end: int = -1  # jsonl; -1 = to the end
    row_groups: list[int] = field(default_factory=list)  # parquet
    eval_fraction: float = 0.0  # rows held out for eval (data.eval_split), chosen by a hash of (seed, source id)
    seed: int = 0
    source: int = 0  # index of the data.train source the file belongs to
    weight: float = 1.0  # that source's weight (train rows' copies per epoch)
    storage: dict = field(default_factory=dict)  # how to reach an s3:// / gs:// path (no credentials)

    def to_dict(self) -> dict:
        return asdict(self)


def source_id(file_index: int, row: int) -> int:
    """A row's id: its file's index in the high bits, its row number in the low 40 (one file's ids are its rows).

    >>> source_id(0, 7), source_id(2, 7) == 2 * 2**40 + 7
    (7, True)
    """
    return (file_index << FILE_SHIFT) | row


def split_source_id(sid: int) -> tuple[int, int]:
    """(file_index, row) of a source id (of any of the row's samples).

    >>> split_source_id(source_id(2, 7))
    (2, 7)
    """
    return (sid >> FILE_SHIFT) & (MAX_FILES - 1), sid & ((1 << FILE_SHIFT) - 1)


def sample_ids(sids: np.ndarray, views: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """The ids of a row's samples: its source id, plus its view and copy numbers in the high bits.

    >>> ids = sample_ids(np.array([7, 7]), views=np.array([0, 1]), copies=np.array([0, 2]))
    >>> ids.tolist() == [7, 7 | 1 << VIEW_SHIFT | 2 << COPY_SHIFT], [split_source_id(i) for i in ids.tolist()]
    (True, [(0, 7), (0, 7)])
    """
    return sids.astype(np.int64) | (views.astype(np.int64) << VIEW_SHIFT) | (copies.astype(np.int64) << COPY_SHIFT)


def _kind(path: Path) -> str | None:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind == "json":  # a .json file may hold JSON lines: look at its first character
        with storage.open_input(path) as f:
            head = f.read(4096).lstrip()
        kind = "json" if head.startswith(b"[") else "jsonl"
    return kind


def resolve_hf(spec: str) -> list[Path]:
    """hf://NAME[/SPLIT] -> the Arrow cache files of `datasets.load_dataset(NAME, split=SPLIT)`."""
    name = spec[len("hf://") :].removeprefix("datasets/")
    parts = name.split("/")
    split = "train"
    if len(parts) == 3 or (len(parts) == 2 and parts[1] in ("train", "test", "validation")):
        split = parts.pop()
    try:
        import datasets

        ds = datasets.load_dataset("/".join(parts), split=split)
    except Exception as exc:  # offline, unknown name, gated ...
        raise DataError(
            f"Could not load the Hugging Face data set {spec} ({type(exc).__name__}: {str(exc)[:120]})."
        ) from None
    files = [Path(f["filename"]) for f in ds.cache_files]
    if not files:
        raise DataError(f"The Hugging Face data set {spec} has no local Arrow files to read.")
    return files


def expand(spec: str, options: storage.StorageOptions | None = None) -> list[Path]:
    """A file, directory, glob, s3:// / gs:// URI (an object or a prefix) or hf:// spec -> the sorted list
    of readable, non-empty data files (storage.Uri for objects)."""
    if spec.startswith("hf://"):
        return resolve_hf(spec)
    if storage.is_remote(spec):  # s3://, gs://: objects read through pyarrow.fs (storage.py)
        files = storage.remote_files(spec, tuple(SUFFIXES), options)
        if not files:
            raise DataError(f"The data location {spec} holds no .jsonl, .json, .parquet or .arrow files.")
        if empty := [f for f in files if f.size == 0]:
            raise DataError(f"The data file {empty[0]} is empty.")
        return files
    path = Path(os.path.expanduser(spec))
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"The data glob {spec} matches no files.")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"The data directory {spec} holds no .jsonl, .json, .parquet or .arrow files.")
    elif path.exists():
        files = [path]
    else:
        raise DataError(f"The data path {spec} does not exist.")
    for f in files:
        if f.suffix.lower() not in SUFFIXES:
            raise DataError(f"The data file {f} has an unsupported type (use .jsonl, .json, .parquet or .arrow).")
        if not os.access(f, os.R_OK):
            raise DataError(f"The data file {f} is not readable.")
        if f.stat().st_size == 0:
            raise DataError(f"The data file {f} is empty.")
    return files


def _jsonl_chunks(path: Path, file_index: int, split: int, rows_per_chunk: int) -> list[Chunk]:
    """Byte ranges of `rows_per_chunk` lines each, found with one buffered pass over the file."""
    chunks, start, line, offset, lines_in_chunk = [], 0, 0, 0, 0
    with storage.open_input(path) as f:
        while block := f.read(1 << 24):
            pos = 0
            while (nl := block.find(b"\n", pos)) != -1:
                pos = nl + 1
                line += 1
                lines_in_chunk += 1
                if lines_in_chunk == rows_per_chunk:
                    end = offset + pos
                    chunks.append(Chunk(str(path), "jsonl", file_index, split, line - lines_in_chunk, start, end))
                    start, lines_in_chunk = end, 0
            offset += len(block)
    if offset > start:
        chunks.append(Chunk(str(path), "jsonl", file_index, split, line - lines_in_chunk, start, -1))
    return chunks


def _json_array_chunks(path: Path, file_index: int, split: int) -> list[Chunk]:
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:
        raise DataError(f"The data file {path} is not valid JSON ({str(exc)[:80]}).") from None
    except RecursionError:
        raise DataError(
            f"The data file {path} is nested too deeply to parse as a JSON array; "
            "split it into JSON lines to have the deep rows counted."
        ) from None
    if not isinstance(data, list):
        raise DataError(f"The data file {path} holds a JSON {type(data).__name__}, not an array of rows.")
    if not data:
        raise DataError(f"The data file {path} is an empty JSON array.")
    return [Chunk(str(path), "json", file_index, split)]


def _parquet_chunks(path: Path, file_index: int, split: int, rows_per_chunk: int) -> list[Chunk]:
    import pyarrow.parquet as pq

    try:
        with storage.open_input(path) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as exc:
        raise DataError(f"The data file {path} is not a readable Parquet file ({str(exc)[:80]}).") from None
    if meta.num_rows == 0:
        raise DataError(f"The data file {path} has no rows.")
    chunks, groups, first, count = [], [], 0, 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        count += meta.row_group(g).num_rows
        if count >= rows_per_chunk:
            chunks.append(Chunk(str(path), "parquet", file_index, split, first, row_groups=groups))
            first, groups, count = first + count, [], 0
    if groups:
        chunks.append(Chunk(str(path), "parquet", file_index, split, first, row_groups=groups))
    return chunks


def held_out(source_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Deterministic eval membership: splitmix64(seed, source id) / 2**64 < fraction."""
    return _unit(source_ids, seed) < fraction


def copies(source_ids: np.ndarray, weight: float, seed: int) -> np.ndarray:
    """Copies of each row in one epoch for a source weight: floor(weight), plus one where a seeded
    hash of the source id falls under the fractional part."""
    whole, frac = int(weight), weight - int(weight)
    out = np.full(len(source_ids), whole, dtype=np.int32)
    if frac > 0:
        out += (_unit(source_ids, seed + _COPY_SALT) < frac).astype(np.int32)
    return out


def _unit(source_ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64(seed, source id) / 2**64: a deterministic uniform number per row."""
    with np.errstate(over="ignore"):
        z = source_ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def plan_chunks(
    files: list[Path],
    rows_per_chunk: int,
    split: int = 0,
    eval_fraction: float = 0.0,
    seed: int = 0,
    first_file: int = 0,
    source: int = 0,
    weight: float = 1.0,
    options: storage.StorageOptions | None = None,
) -> list[Chunk]:
    """Cut every file into chunks of about `rows_per_chunk` rows (JSON arrays: one per file); file
    indexes (in source ids) start at `first_file`."""
    chunks = _plan_chunks(files, rows_per_chunk, split, first_file)
    reach = asdict(options) if options is not None else {}
    for c in chunks:
        c.eval_fraction, c.seed, c.source, c.weight, c.storage = eval_fraction, seed, source, weight, reach
    return chunks


def _plan_chunks(files: list[Path], rows_per_chunk: int, split: int, first_file: int = 0) -> list[Chunk]:
    chunks: list[Chunk] = []
    for i, path in enumerate(files, start=first_file):
        kind = _kind(path)
        if kind == "jsonl":
            chunks += _jsonl_chunks(path, i, split, rows_per_chunk)
        elif kind == "json":
            chunks += _json_array_chunks(path, i, split)
        elif kind == "parquet":
            chunks += _parquet_chunks(path, i, split, rows_per_chunk)
        else:
            chunks.append(Chunk(str(path), "arrow", i, split))
    return chunks


def _table_rows_as_json(table: pa.Table) -> list[str]:
    return [json.dumps(r, default=str) for r in table.to_pylist()]


def read_chunk(chunk: Chunk) -> pa.Table:
    """Pure stage: one chunk -> READ_SCHEMA table (one row per source row, raw JSON text)."""
    try:
        rows, reasons = _read_rows(chunk)
    except DataError:
        raise
    except Exception as exc:  # never a bare traceback from a read task: say which file and rows
        raise DataError(
            f"Could not read {chunk.path} (from row {chunk.first_row}): {type(exc).__name__}: {str(exc)[:120]}."
        ) from None
    base = source_id(chunk.file_index, chunk.first_row)
    ids = np.arange(base, base + len(rows), dtype=np.int64)
    split = np.full(len(rows), chunk.split, dtype=np.int8)
    if chunk.eval_fraction > 0:
        split[held_out(ids, chunk.eval_fraction, chunk.seed)] = 1
    n_copies = np.ones(len(rows), dtype=np.int32)
    if chunk.weight != 1.0 and chunk.split == 0:
        n_copies = np.where(split == 0, copies(ids, chunk.weight, chunk.seed), 1).astype(np.int32)
        reasons = [r if r is not None or c else "not_sampled" for r, c in zip(reasons, n_copies.tolist())]
    return pa.table(
        {
            "source_id": pa.array(ids, pa.int64()),
            "split": pa.array(split, pa.int8()),
            "row": pa.array(rows, pa.string()),
            "read_reason": pa.array(reasons, pa.string()),
            "source": pa.array(np.full(len(rows), chunk.source, dtype=np.int32), pa.int32()),
            "copies": pa.array(np.maximum(n_copies, 1), pa.int32()),
        },
        schema=READ_SCHEMA,
    )


def _read_jsonl(chunk: Chunk) -> tuple[list[str | None], list[str | None]]:
    """Lines of a JSON lines chunk; a line over MAX_ROW_BYTES is skipped unread and counted (malformed_json)."""
    rows: list[str | None] = []
    reasons: list[str | None] = []
    with storage.open_input(chunk.path, chunk.storage) as f:
        f.seek(chunk.byte_start)
        left = float("inf") if chunk.byte_end < 0 else chunk.byte_end - chunk.byte_start
        while left > 0 and (raw := f.readline(int(min(MAX_ROW_BYTES + 1, left)))):
            left -= len(raw)
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                while left > 0 and (rest := f.readline(int(min(1 << 20, left)))):
                    left, size = left - len(rest), size + len(rest)
                    if rest.endswith(b"\n"):
                        break
                rows.append(f"a line of {size} bytes, over the {MAX_ROW_BYTES >> 20} MiB limit")
                reasons.append("malformed_json")
                continue
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                rows.append("not UTF-8"), reasons.append("malformed_json")
                continue
            rows.append(text or None)
            reasons.append(None if text else "blank_line")
    return rows, reasons


def _read_rows(chunk: Chunk) -> tuple[list[str | None], list[str | None]]:
    """(raw JSON text or a drop's detail, drop reason or None) per row of the chunk."""
    rows: list[str | None]
    reasons: list[str | None]
    if chunk.kind == "jsonl":
        return _read_jsonl(chunk)
    if chunk.kind == "json":
        with storage.open_input(chunk.path, chunk.storage) as f:
            data = json.loads(f.read())
        rows, reasons = [], []
        for r in data:
            try:
                rows.append(json.dumps(r)), reasons.append(None)
            except RecursionError:
                rows.append("nested too deeply to parse"), reasons.append("malformed_json")
    elif chunk.kind == "parquet":
        import pyarrow.parquet as pq

        with storage.open_input(chunk.path, chunk.storage) as f:
            rows = _table_rows_as_json(pq.ParquetFile(f).read_row_groups(chunk.row_groups))
        reasons = [None] * len(rows)
    else:
        with (
            storage.open_input(chunk.path, chunk.storage)
            if storage.is_remote(chunk.path)
            else pa.memory_map(chunk.path)
        ) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
        rows = _table_rows_as_json(table)
        reasons = [None] * len(rows)
    return rows, reasons


def files_identity(files: list[Path]) -> list[tuple[str, int, int]]:
    """(absolute path or URI, size, mtime_ns) of each file: what the prepared-data cache is keyed by."""
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return out
