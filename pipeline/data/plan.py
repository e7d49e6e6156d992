"""The data plan on Ray Data (the only module that touches Ray Data).

chunk descriptors -> read + normalise + tokenize + mask (actor pool of `data.num_tokenizer_actors`,
one tokenizer per actor, each reading its own chunks) -> pack (one long-lived actor; each batch of
`data.pack_window` samples is one packing window, so memory stays bounded) -> the driver streams
the packed rows into bounded Parquet shards with an index (data/shards.py) and accumulates stats.json.
Every stage is a pure pyarrow function from sources.py / tokenize.py / pack.py, so the same result
comes out of `prepare_local` (no Ray)
for the same windows.

`ensure_prepared(cfg)` is what training and tuning call: it reuses the cache entry keyed by the
input files, the tokenizer and the data config, or builds it once (lock + atomic rename).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from raysft.pipeline import lease, outputs, ray_runtime, storage
from raysft.pipeline.data import cache
from raysft.pipeline.data.light_tokenizer import TokenizerSpec, compile_chat_template
from raysft.pipeline.data.pack import pack_batch
from raysft.pipeline.data.schema import Prepared
from raysft.pipeline.data.shards import ShardWriter, has_rows, load_index
from raysft.pipeline.data.sources import MAX_FILES, Chunk, expand, files_identity, plan_chunks, read_chunk
from raysft.pipeline.data.spec_cache import load_tokenizer_spec
from raysft.pipeline.data.stats import StatsAccumulator
from raysft.pipeline.data.tokenize import TokenizeStage
from raysft.pipeline.errors import ClusterError, ConfigError, DataError, RaysftError, user_error
from raysft.pipeline.models.source import tokenizer_source
from raysft.pipeline.storage import StorageOptions


@dataclass
class TrainSource:
    """One data.train source, resolved: its files (consecutive in Inputs.train_files), format, columns, weight."""

    name: str
    files: list[Path]
    format: str
    columns: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0


@dataclass
class Inputs:
    """Everything the plan reads, resolved on the driver (files, tokenizer, cache key)."""

    train_files: list[Path]
    eval_files: list[Path]
    tokenizer: TokenizerSpec
    key: str
    sources: list[TrainSource] = field(default_factory=list)


def resolve_sources(cfg) -> list[TrainSource]:
    """data.train as a list of sources (a single path is one source of weight 1 in data.format)."""
    if not cfg.data.train:
        raise ConfigError("data.train is not set; point it at a file, directory, glob or hf:// data set.")
    options = StorageOptions.of(cfg)
    if isinstance(cfg.data.train, str):
        return [TrainSource(cfg.data.train, expand(cfg.resolve_path(cfg.data.train), options), cfg.data.format)]
    return [
        TrainSource(
            s.path, expand(cfg.resolve_path(s.path), options), s.format or cfg.data.format, dict(s.columns), s.weight
        )
        for s in cfg.data.train
    ]


def resolve_inputs(cfg) -> Inputs:
    sources = resolve_sources(cfg)
    train_files = [f for s in sources for f in s.files]
    if len(train_files) >= MAX_FILES:
        raise DataError(
            f"data.train matches {len(train_files)} files; at most {MAX_FILES - 1} are supported "
            "(source ids number files in 12 bits): merge some files."
        )
    eval_files = expand(cfg.resolve_path(cfg.data.eval), StorageOptions.of(cfg)) if cfg.data.eval else []
    root = cache.cache_root(cfg)
    if not storage.is_remote(root):
        cache.remove_stale_temps(root)  # what a killed run left, once it is a day old
    spec = load_tokenizer_spec(cfg)
    if cfg.data.chat_template:
        spec = dataclasses.replace(spec, chat_template=read_chat_template(cfg))
    key = cache.prepared_key(
        cfg.data.model_dump(mode="json"),
        files_identity(train_files),
        files_identity(eval_files),
        spec.fingerprint(),
    )
    inputs = Inputs(train_files, eval_files, spec, key, sources)
    report = _REPORT.get()
    if report is not None:
        report("inputs", files=len(train_files) + len(eval_files), key=key)
    return inputs


def read_chat_template(cfg) -> str:
    """The text of data.chat_template (a Jinja file), checked to compile."""
    path = Path(os.path.expanduser(cfg.resolve_path(cfg.data.chat_template)))
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"The chat template file {path} (data.chat_template) cannot be read: {exc.strerror or exc}."
        ) from None
    try:
        compile_chat_template(text)
    except Exception as exc:
        raise ConfigError(
            f"The chat template file {path} (data.chat_template) is not a valid Jinja template: "
            f"{str(exc).splitlines()[0][:120]}."
        ) from None
    return text


def chunks_for(cfg, inputs: Inputs) -> list[Chunk]:
    rows = cfg.data.tokenize_batch_size
    fraction = 0.0 if inputs.eval_files else cfg.data.eval_split
    chunks, first = [], 0
    options = StorageOptions.of(cfg)
    for k, source in enumerate(inputs.sources):
        chunks += plan_chunks(source.files, rows, 0, fraction, cfg.data.seed, first, k, source.weight, options)
        first += len(source.files)
    return chunks + plan_chunks(inputs.eval_files, rows, 1, options=options)


# Where the plan reports its progress (`reporting`): report(event, **info) with event "inputs" (resolved: files,
# key), "run" (the plan starts: files, actors), "batch" (rows, tokens so far) or "written" (out_dir). None: a line
# on stderr every 10 s.
_REPORT: contextvars.ContextVar[Callable[..., None] | None] = contextvars.ContextVar("raysft_report", default=None)


@contextlib.contextmanager
def reporting(report: Callable[..., None]) -> Iterator[None]:
    """Send the plan's progress to `report` while the block runs (`raysft prepare`'s console)."""
    token = _REPORT.set(report)
    try:
        yield
    finally:
        _REPORT.reset(token)


def stage_kwargs(cfg, inputs: Inputs) -> dict:
    """What every tokenize stage (local or actor) is built with."""
    return dict(
        tokenizer=inputs.tokenizer,
        fmt=cfg.data.format,
        system_prompt=cfg.data.system_prompt,
        train_on=cfg.data.train_on,
        sources=[(s.format, s.columns) for s in inputs.sources],
        train_on_reasoning=cfg.data.train_on_reasoning,
        template_kwargs=dict(cfg.data.chat_template_kwargs),
    )


def consume(cfg, inputs: Inputs, batches: Iterable[pa.Table], out_dir: Path | str) -> dict:
    """Packed batches -> shards under out_dir/{train,eval} (a folder or a URI) + stats.json, written last."""
    stats = StatsAccumulator(
        cfg.data.max_seq_len,
        [inputs.train_files, inputs.eval_files],
        cfg.data.on_bad_row,
        [(s.name, s.weight, len(s.files)) for s in inputs.sources],
    )
    options = StorageOptions.of(cfg)
    sinks = [
        ShardWriter(storage.join(out_dir, split), cfg.data.shard_mb, inputs.key, options) for split in ("train", "eval")
    ]
    start = last = time.monotonic()
    report = _REPORT.get()
    try:
        for batch in batches:
            stats.add(batch)
            for split, sink in enumerate(sinks):
                keep = pc.and_(pc.equal(batch.column("split"), split), pc.is_null(batch.column("drop_reason")))
                kept = pc.sum(keep).as_py() or 0
                if kept:  # filtering copies every list column: skip it when the whole batch is kept
                    sink.write(batch if kept == batch.num_rows else batch.filter(keep))
            if report is not None:
                report("batch", rows=stats.splits[0].rows_read, tokens=stats.splits[0].tokens_total)
            elif time.monotonic() - last > 10:
                last = time.monotonic()
                st = stats.splits[0]
                print(
                    f"raysft prepare: {st.rows_read} rows, {st.tokens_total} tokens, "
                    f"{st.tokens_total / (last - start):.0f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
    except BaseException:
        for sink in sinks:
            sink.abort()  # no index: the folder is not a finished artifact
        raise
    finally:
        # Close the stream while Ray is still up: left to the garbage collector after ray.shutdown(),
        # Ray Data's iterator prints a traceback below the error that stopped it (e.g. on_bad_row: error).
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    for sink in sinks:
        sink.close()
    stats.check(cfg.data.max_bad_fraction, cfg.data.format)
    result = stats.to_dict()
    seconds = time.monotonic() - start
    result.update(
        packing=cfg.data.packing,
        train_on=cfg.data.train_on,
        format=cfg.data.format,
        sources=[str(f) for f in inputs.train_files],
        eval_sources=[str(f) for f in inputs.eval_files],
        cache_key=inputs.key,
        seconds=round(seconds, 3),
    )
    storage.write_bytes(storage.join(out_dir, "stats.json"), (json.dumps(result, indent=2) + "\n").encode(), options)
    if report is not None:
        report("written", out_dir=str(out_dir))
    return result


def summary(stats: dict) -> str:
    """The per-source lines every prepare prints: rows read, kept, dropped by reason, truncated; tokens;
    trained share."""
    lines = ["raysft prepare: per source (train split)"]
    for s in stats.get("per_source") or []:
        dropped = ", ".join(f"{r} {n}" for r, n in s["rows_dropped"].items()) or "none"
        lines.append(
            f"  {s['source']} (weight {s['weight']:g}): {s['rows_read']} rows read, {s['rows_used']} kept, "
            f"dropped: {dropped}; {s['rows_truncated']} truncated; {s['samples']} samples "
            f"({s['extra_views']} extra views); {s['tokens']} tokens, {100 * s['trained_share']:.1f}% trained"
        )
    if stats.get("eval"):
        e = stats["eval"]
        lines.append(f"  eval: {e['rows_read']} rows read, {e['rows_used']} kept, {e['tokens_total']} tokens")
    return "\n".join(lines)


def packed_batches_local(cfg, inputs: Inputs) -> Iterable[pa.Table]:
    """The same stages without Ray, one window after another (for tests and tiny inputs)."""
    stage = TokenizeStage(**stage_kwargs(cfg, inputs))
    tokenized = [read_and_tokenize(stage, c) for c in chunks_for(cfg, inputs)]
    table = pa.concat_tables(tokenized)
    for start in range(0, table.num_rows, cfg.data.pack_window):
        yield pack_batch(
            table.slice(start, cfg.data.pack_window), cfg.data.max_seq_len, cfg.data.packing, cfg.data.too_long
        )


def read_and_tokenize(tokenize: Callable[[pa.Table], pa.Table], chunk: Chunk) -> pa.Table:
    """One chunk read and tokenized. Bad rows are counted drops; anything else that fails names the file and
    row (found by retrying the rows one at a time, only after a failure), never a bare traceback."""
    table = read_chunk(chunk)
    try:
        return tokenize(table)
    except RaysftError:
        raise
    except Exception as exc:
        where, error = f"rows {chunk.first_row}-{chunk.first_row + table.num_rows - 1}", exc
        for i in range(table.num_rows):
            try:
                tokenize(table.slice(i, 1))
            except Exception as row_error:
                where, error = f"row {chunk.first_row + i}", row_error
                break
        raise DataError(f"Parsing {chunk.path} {where} failed ({type(error).__name__}: {str(error)[:120]}).") from None


class ReadAndTokenize(TokenizeStage):
    """Actor: chunk descriptors -> their rows, tokenized. Reading inside the actor keeps Ray from fusing
    a read op into the actor op with the tokenizer's batch size (which would hand one actor every chunk)."""

    def __call__(self, chunks: pa.Table) -> pa.Table:
        tokenize = super().__call__
        return pa.concat_tables([read_and_tokenize(tokenize, Chunk(**c)) for c in chunks.to_pylist()])


class PackStage:
    """Actor: one window of tokenized samples -> packed rows. A long-lived actor, not tasks: each task
    wave made the raylet start and reap worker processes (~2.4 CPU-s of imports each)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def __call__(self, table: pa.Table) -> pa.Table:
        return pack_batch(table, **self.kwargs)


def packed_batches_ray(cfg, inputs: Inputs) -> Iterable[pa.Table]:
    """The Ray Data plan; yields packed batches in a deterministic order (preserve_order)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    chunks = chunks_for(cfg, inputs)
    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # same windows, same packed rows on every run
    ctx.enable_progress_bars = False
    try:
        ds = ray.data.from_items([c.to_dict() for c in chunks], override_num_blocks=len(chunks))
        ds = ds.map_batches(
            ReadAndTokenize,  # one chunk (<= data.tokenize_batch_size rows) per call
            fn_constructor_kwargs=stage_kwargs(cfg, inputs),
            batch_size=1,
            compute=ActorPoolStrategy(size=cfg.data.num_tokenizer_actors),
            batch_format="pyarrow",
            udf_modifying_row_count=True,
        )
        ds = ds.map_batches(
            PackStage,
            fn_constructor_kwargs=dict(
                max_seq_len=cfg.data.max_seq_len, packing=cfg.data.packing, too_long=cfg.data.too_long
            ),
            batch_size=cfg.data.pack_window,
            batch_format="pyarrow",
            udf_modifying_row_count=True,
            # Packing costs ~2% of tokenizing: it runs beside the tokenizer actors, which hold the CPUs,
            # so windows stream out as they fill instead of waiting for every actor to finish.
            num_cpus=0,
            compute=ActorPoolStrategy(size=1),
        )
        try:
            yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
        except Exception as exc:  # a task's one-sentence error arrives wrapped in Ray's traceback: unwrap it
            user = user_error(exc)
            if user is None:
                raise
            raise user from None
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _start_ray(cfg) -> bool:
    """Start Ray for the plan (ray_runtime: the one way raysft starts Ray); True when this call started it."""
    return ray_runtime.start(cfg.run.address, ray_runtime.PREPARE)


def _resolve_while_ray_starts(cfg) -> tuple[Inputs, bool]:
    """resolve_inputs (file listing, and the tokenizer: from the spec cache, else a transformers import
    + load of ~3 s of one core) in a thread while the main thread runs ray.init, which mostly waits for
    GCS and raylet to come up. A config or data error wins over a Ray error, and Ray is shut down again
    when the inputs fail."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(contextvars.copy_context().run, resolve_inputs, cfg)  # with the caller's `reporting`
        try:
            started = _start_ray(cfg)
        except ClusterError:
            future.result()
            raise
        try:
            return future.result(), started
        except BaseException:
            if started:
                ray_runtime.stop()
            raise


def _run(cfg, inputs: Inputs, out_dir: Path, use_ray: bool = True, started: bool | None = None) -> dict:
    """Run the plan into out_dir; `started` says Ray was already started for this run (by us: True)."""
    report = _REPORT.get()
    if report is not None:
        report("run", files=len(inputs.train_files) + len(inputs.eval_files), actors=cfg.data.num_tokenizer_actors)
    if not use_ray:
        return consume(cfg, inputs, packed_batches_local(cfg, inputs), out_dir)
    if started is None:
        started = _start_ray(cfg)
    try:
        return consume(cfg, inputs, packed_batches_ray(cfg, inputs), out_dir)
    finally:
        if started:
            ray_runtime.stop()


def prepare_log_path(cfg) -> Path:
    """Where `raysft prepare` logs Ray's and the plan's output: CACHE_ROOT/logs/prepare-TIME-PID.log (with the
    cache on an object store, under ~/.cache/raysft/logs)."""
    root = cache.cache_root(cfg)
    base = root if isinstance(root, Path) else cache.lock_root().parent
    return base / "logs" / f"prepare-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"


def input_paths(cfg, inputs: Inputs) -> list[Path]:
    """What an output folder must not overlap: the data files, the data folders named, the tokenizer folder."""
    paths = [*inputs.train_files, *inputs.eval_files]
    train = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    for spec in [s.path if hasattr(s, "path") else s for s in train] + [cfg.data.eval]:
        local = cfg.resolve_path(spec) if spec and "://" not in spec else None
        if local and Path(local).expanduser().exists():
            paths.append(Path(local).expanduser())
    tokenizer = tokenizer_source(cfg)
    return paths + [Path(tokenizer.location)] if tokenizer.local else paths


def prepare(cfg, output: str | Path | None = None, use_ray: bool = True) -> dict:
    """Run the data plan; write DIR/train, DIR/eval (when there is eval data) and DIR/stats.json.

    Without `output` the result goes to (or is reused from) the cache; returns the stats dict.
    """
    if output is None:
        return ensure_prepared(cfg, use_ray=use_ray).stats
    # One writer per output folder: a lease beside it (the folder itself is swapped in whole when done).
    out = str(output).rstrip("/") if storage.is_remote(output) else str(Path(output).expanduser().absolute())
    with lease.hold(lease.beside(out), f"--output {out}", StorageOptions.of(cfg)):
        if storage.is_remote(out):
            return _prepare_remote(cfg, out, use_ray)
        return _prepare_local(cfg, Path(out), use_ray)


def _prepare_local(cfg, out_dir: Path, use_ray: bool) -> dict:
    """`prepare --output DIR`: into a temporary sibling, swapped in on success."""
    if not use_ray:
        inputs, started = resolve_inputs(cfg), None
    else:
        inputs, started = _resolve_while_ray_starts(cfg)
    with contextlib.ExitStack() as stack:
        if started:
            stack.callback(ray_runtime.stop)  # also when the output folder is refused
        # Written into a temporary sibling, swapped in only on success: a failed run keeps the old output.
        tmp = stack.enter_context(outputs.atomic_output(out_dir, "prepare", input_paths(cfg, inputs)))
        return _run(cfg, inputs, tmp, use_ray, started=False)


def _prepare_remote(cfg, output: str, use_ray: bool) -> dict:
    """`prepare --output s3://...`: into an empty prefix only (raysft never deletes objects it did not write)."""
    options = StorageOptions.of(cfg)
    storage.check_location(output, options)
    if storage.list_files(output, "", options):
        raise ConfigError(f"--output {output} already holds objects; name an empty prefix.")
    return _run(cfg, resolve_inputs(cfg), output, use_ray)


def ensure_prepared(cfg, use_ray: bool = True) -> Prepared:
    """The prepared dataset for cfg from the cache, building it once when missing (safe concurrently).

    An entry that is damaged (a shard missing, truncated or with other bytes; an unreadable index or stats.json)
    is derived data: it is rebuilt, atomically, with a one-line notice, and never used.

    Call it on the driver before starting Tune trials or Train workers: building needs free CPUs for
    the tokenizer actors, which trials that already hold every CPU could not give it.
    """
    inputs = resolve_inputs(cfg)
    root = cache.cache_root(cfg)
    if storage.is_remote(root):
        return _ensure_remote(cfg, inputs, str(root), use_ray)
    final = root / inputs.key
    if (final / "stats.json").exists() and entry_damage(final) is None:
        return load_prepared(final, inputs.key)
    with cache.locked(root, inputs.key):
        if final.exists():  # another caller may have built or healed it while we waited
            damage = entry_damage(final)
            if damage is None:
                return load_prepared(final, inputs.key)
            _notice_rebuild(final, damage)
            cache.set_aside(root, final)
        tmp = root / f"{cache.TMP_PREFIX}{inputs.key}-{uuid.uuid4().hex[:8]}"
        try:
            _run(cfg, inputs, tmp, use_ray)
            cache.publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(final, inputs.key)


def entry_damage(entry: Path | str, options: StorageOptions | None = None) -> str | None:
    """Why a finished cache entry cannot be used (one sentence), or None when it is whole. A local entry's shard
    bytes are checked against their CRC-32 (read at ~2 GB/s); an object store's shards by size only."""
    try:
        stats = json.loads(storage.read_bytes(storage.join(entry, "stats.json"), options))
        if not isinstance(stats, dict):
            return f"{storage.join(entry, 'stats.json')} does not hold a JSON object"
        for split in ("train", "eval"):
            folder = storage.join(entry, split)
            if split == "train" or has_rows(folder, options):
                load_index(folder, options, what=split, verify_bytes=not storage.is_remote(entry))
    except (RaysftError, OSError, ValueError) as exc:
        return str(exc).split("; ")[0].rstrip(".")
    return None


def _notice_rebuild(entry: Path | str, damage: str) -> None:
    print(f"raysft: the prepared-data cache entry {entry} is damaged ({damage}); rebuilding it.", file=sys.stderr)


def _ensure_remote(cfg, inputs: Inputs, root: str, use_ray: bool) -> Prepared:
    """The cache on an object store: shards and indexes are written under ROOT/KEY, stats.json last (the
    marker of a finished entry). A local lock keeps this machine's callers to one writer; writers on two
    machines write the same deterministic objects. A damaged entry loses its marker first, then is rebuilt."""
    options = StorageOptions.of(cfg)
    storage.check_location(root, options)
    final = storage.join(root, inputs.key)
    marker = storage.join(final, "stats.json")
    if storage.exists(marker, options) and entry_damage(final, options) is None:
        return load_prepared(final, inputs.key, options)
    with cache.locked(cache.lock_root(), inputs.key):
        fs, path = storage.resolve(final, options)
        if storage.exists(marker, options):
            damage = entry_damage(final, options)
            if damage is None:
                return load_prepared(final, inputs.key, options)
            _notice_rebuild(final, damage)
            fs.delete_file(storage.resolve(marker, options)[1])  # no longer a finished entry, for any reader
            fs.delete_dir(path)
        try:
            _run(cfg, inputs, final, use_ray)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_dir(path)  # this call's partial entry, never a finished one (no marker)
            raise
    return load_prepared(final, inputs.key, options)


def load_prepared(directory: Path | str, key: str = "", options: StorageOptions | None = None) -> Prepared:
    """A prepared folder or URI: its stats.json and split folders (eval only when it holds rows)."""
    stats = json.loads(storage.read_bytes(storage.join(directory, "stats.json"), options))
    wrap = (lambda p: p) if storage.is_remote(directory) else Path
    eval_dir = storage.join(directory, "eval")
    return Prepared(
        wrap(storage.join(directory, "train")), wrap(eval_dir) if has_rows(eval_dir, options) else None, stats, key
    )
