"""Render chat rows with the tokenizer's own template, tokenize, and build exact response labels.

Masks are computed at character level and mapped to tokens through the tokenizer's offsets:
each assistant turn's content is located in the rendered text by rendering the conversation
prefix (`messages[:i]` + generation prompt), which tells where the turn's content starts, then
finding the content (or its trimmed form, for templates such as Llama-3's that trim) right there.
The first special token after the content (`<|im_end|>`, `<|eot_id|>`, ...) closes the turn and
is trained too; the newline after it is not. No marker token sequences are searched for, so
tokens merging across boundaries cannot shift the mask. Rows of printable ASCII under a byte-level
BPE tokenizer are encoded by the exact fast path in fast_bpe.py (same ids and offsets).
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import itertools
import json
import logging
import os
from operator import itemgetter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raysft.pipeline.data.fast_bpe import ByteLevelFastPath
from raysft.pipeline.data.formats import BadRow, Normalised, parse_and_normalise
from raysft.pipeline.data.schema import IGNORE_INDEX
from raysft.pipeline.data.light_tokenizer import TokenizerSpec, compile_chat_template
from raysft.pipeline.models.source import tokenizer_source
from raysft.pipeline.models.tokenizer import load_tokenizer, no_chat_template

FAST_PATH_CHECK_ROWS = 32  # rows compared with tokenizers before an encoder trusts its fast path
log = logging.getLogger(__name__)
_START, _END = itemgetter(0), itemgetter(1)
TOKENIZED_SCHEMA = pa.schema(
    [("source_id", pa.int64()), ("split", pa.int8()), ("input_ids", pa.list_(pa.int32())),
     ("labels", pa.list_(pa.int32())), ("drop_reason", pa.string()), ("detail", pa.string())]
)


def _spec_cache_path(cfg, src: str, gguf: Optional[str]) -> Optional[Path]:
    """Where the TokenizerSpec of a local tokenizer directory is cached, keyed by every top-level file's
    name, size and mtime there plus the transformers and tokenizers versions; None for hub ids."""
    from importlib.metadata import PackageNotFoundError, version

    from raysft.pipeline.data.cache import cache_root

    folder = Path(src)
    if not folder.is_dir():
        return None
    try:
        stats = [(f.name, f.stat()) for f in folder.iterdir() if f.is_file()]
        files = sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats)
        versions = [version("transformers"), version("tokenizers")]
    except (OSError, PackageNotFoundError):
        return None
    blob = json.dumps([str(folder.resolve()), gguf, cfg.model.trust_remote_code, files, versions])
    return cache_root(cfg) / "tokenizers" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"


def load_tokenizer_spec(cfg, need_chat_template: bool | None = None) -> TokenizerSpec:
    """The config's tokenizer as a TokenizerSpec (what the data plan runs on).

    Built once through transformers (`load_tokenizer`, with its checks) and cached next to the
    prepared data, so later prepare/train/tune calls on an unchanged tokenizer folder skip the
    ~2.5 s transformers + torch import. The cached spec is transformers' own output, not a re-implementation.
    """
    if need_chat_template is None:
        need_chat_template = cfg.data.format != "text"
    src = tokenizer_source(cfg)
    path = _spec_cache_path(cfg, src.location, src.gguf_file)
    if path is not None and path.is_file():
        try:
            spec = TokenizerSpec.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            spec = None  # unreadable or from an older layout: rebuild below
        if spec is not None:
            if need_chat_template and not spec.chat_template:
                raise no_chat_template(src.location, src.field)
            return spec
    spec = TokenizerSpec.from_hf(load_tokenizer(cfg, need_chat_template))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(spec.to_json())
            os.replace(tmp, path)  # atomic: concurrent writers write the same content
        except OSError:
            pass  # a read-only cache only costs the next call the transformers import
    return spec


def _trained_ranges(ids, spans, special_ids, first_ending_after, first_starting_at, start_of) -> list[tuple[int, int]]:
    """Token ranges to train in one row: the tokens overlapping each assistant content, then the first
    special token before the turn ends (the one closing it). The three lookups answer from the row's
    token offsets: first token ending after a character, first starting at or after one, start of token k."""
    out, n = [], len(ids)
    for a, b, turn_end in spans:
        lo, hi = first_ending_after(a), first_starting_at(b)
        out.append((lo, hi))
        k = hi
        while k < n and start_of(k) < turn_end:
            if ids[k] in special_ids:
                out.append((k, k + 1))
                break
            k += 1
    return out


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n  # binary search on slice equality: O(n log n) in C instead of a Python loop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ChatEncoder:
    """Normalised rows -> (input_ids, labels) with exact response masks; holds one tokenizer."""

    def __init__(self, tokenizer, train_on: str = "responses", fast_path: bool = True) -> None:
        # A TokenizerSpec (what Ray actors get) needs only `tokenizers` + `jinja2`; a Hugging Face
        # tokenizer is reduced to the same spec, so both paths render and encode identically.
        spec = tokenizer if isinstance(tokenizer, TokenizerSpec) else TokenizerSpec.from_hf(tokenizer)
        self.tokenizer = tokenizer
        if isinstance(tokenizer, TokenizerSpec):
            self.backend = spec.backend()
        else:
            self.backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer._tokenizer
        self.train_on = train_on
        self.template = compile_chat_template(spec.chat_template) if spec.chat_template else None
        self.template_kwargs = dict(spec.template_vars)
        self.special_ids = set(spec.special_ids)
        self.eos_id = spec.eos_id
        # Exact fast path for byte-level BPE on ASCII rows (see fast_bpe.py), checked on first use.
        self.fast = ByteLevelFastPath.build(self.backend, spec.backend_json) if fast_path else None
        self.fast_checked = False

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        # The same variables apply_chat_template passes (templates test `tools is not none`).
        return self.template.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=generation_prompt, **self.template_kwargs)

    def spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int, int]]]:
        """Rendered text and, per assistant turn, (content start, content end, turn end) in characters."""
        if self.template is None:
            raise BadRow("no_chat_template", "the tokenizer has no chat template")
        full = self.render(messages)
        out, cursor = [], 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], generation_prompt=True)
            upto = full if i == len(messages) - 1 else self.render(messages[: i + 1])
            if full.startswith(prefix):
                start = max(cursor, len(prefix))
            else:  # e.g. a generation prompt the full render lacks (an empty <think> block): where they part
                start = max(cursor, _common_prefix_len(prefix, full))
            turn_end = len(upto) if full.startswith(upto) else len(full)
            content = msg["content"]
            for variant in (content, content.strip()):
                at = full.find(variant, start, turn_end) if variant else -1
                if at != -1:
                    break
            else:
                raise BadRow("template_mismatch", f"assistant turn {i} does not appear in the rendered template")
            out.append((at, at + len(variant), turn_end))
            cursor = at + len(variant)
        return full, out

    def encode_flat(self, items: list[Normalised]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Optional[BadRow]]]:
        """Encode a batch into flat arrays: (input ids, labels, row offsets (n + 1), per-row BadRow or None).

        A row that cannot be encoded has no tokens and its BadRow (drop reason). The Python
        garbage collector is paused for the batch: encoding allocates millions of small tuples and
        no reference cycles, and collections triggered by them cost ~5% of the stage.
        """
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._encode_flat(items)
        finally:
            if paused:
                gc.enable()

    def _encode_flat(self, items: list[Normalised]):
        texts: list[Optional[str]] = [None] * len(items)
        spans: list[Any] = [None] * len(items)
        bad: list[Optional[BadRow]] = [None] * len(items)
        for j, item in enumerate(items):
            if item.drop_reason is not None:
                bad[j] = BadRow(item.drop_reason, item.detail or item.drop_reason)
            elif item.text is not None:
                texts[j] = item.text
            else:
                try:
                    texts[j], spans[j] = self.spans(item.messages)
                except BadRow as exc:
                    bad[j] = exc
                except Exception as exc:  # a template's own raise_exception (e.g. roles must alternate)
                    bad[j] = BadRow("template_error", f"the chat template refused the row: {str(exc)[:80]}")
        chat = [j for j in range(len(items)) if texts[j] is not None and spans[j] is not None]
        plain = [j for j in range(len(items)) if texts[j] is not None and spans[j] is None]
        token_ids: list[Any] = [()] * len(items)
        trained: list[list[tuple[int, int]]] = [[] for _ in items]
        fast = [j for j in chat if self.fast.safe(texts[j])] if self.fast is not None else []
        if fast and not self.fast_checked:
            fast = self._check_fast_path(fast, texts)
        if fast:
            self._encode_fast(fast, texts, spans, token_ids, trained)
        taken = set(fast)
        slow = [j for j in chat if j not in taken]
        if slow:
            for j, enc in zip(slow, self.backend.encode_batch([texts[j] for j in slow], add_special_tokens=False)):
                token_ids[j] = enc.ids
                if self.train_on != "all":
                    # The offsets list is searched in place: converting it to an array costs more than the search.
                    offs = enc.offsets
                    trained[j] = _trained_ranges(enc.ids, spans[j], self.special_ids,
                                                 lambda a, offs=offs: bisect.bisect_right(offs, a, key=_END),
                                                 lambda b, offs=offs: bisect.bisect_left(offs, b, key=_START),
                                                 lambda k, offs=offs: offs[k][0])
        if self.train_on == "all":
            for j in chat:
                trained[j] = [(0, len(token_ids[j]))]
        if plain:
            for j, enc in zip(plain, self.backend.encode_batch([texts[j] for j in plain], add_special_tokens=True)):
                ids = enc.ids
                if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                    ids.append(self.eos_id)
                token_ids[j], trained[j] = ids, [(0, len(ids))]
        for j in chat + plain:
            if not any(hi > lo for lo, hi in trained[j]):
                bad[j], token_ids[j], trained[j] = BadRow("no_trainable_tokens", "the rendered row has no trainable token"), (), []
        lengths = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(items))
        row_offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=row_offsets[1:])
        flat_ids = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int32, count=int(row_offsets[-1]))
        flat_labels = np.full(len(flat_ids), IGNORE_INDEX, dtype=np.int32)
        for j, ranges in enumerate(trained):
            base = int(row_offsets[j])
            for lo, hi in ranges:
                flat_labels[base + lo:base + hi] = flat_ids[base + lo:base + hi]
        return flat_ids, flat_labels, row_offsets, bad

    def _check_fast_path(self, rows: list[int], texts) -> list[int]:
        """Compare the fast path with `tokenizers` (ids and offsets) on the first rows it would take;
        on any difference, log it and use `tokenizers` for everything from then on."""
        self.fast_checked = True
        sample = rows[:FAST_PATH_CHECK_ROWS]
        for j, enc in zip(sample, self.backend.encode_batch([texts[j] for j in sample], add_special_tokens=False)):
            ids = self.fast.encode(texts[j])
            if ids != enc.ids or self.fast.offsets(ids) != enc.offsets:
                log.warning("The byte-level fast path differs from tokenizers on a row; using tokenizers for all rows.")
                self.fast = None
                return []
        return rows

    def _encode_fast(self, rows: list[int], texts, spans, token_ids, trained) -> None:
        """Fast-path rows: ids from ByteLevelFastPath; offsets are cumulative byte lengths (ASCII: characters)."""
        encoded = [self.fast.encode(texts[j]) for j in rows]
        for j, ids in zip(rows, encoded):
            token_ids[j] = ids
        if self.train_on == "all":
            return
        lengths = self.fast.byte_lengths[np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64)]
        ends = np.cumsum(lengths)  # in batch coordinates: each row's characters follow the previous row's
        starts = ends - lengths
        o = 0
        for j, ids in zip(rows, encoded):
            n = len(ids)
            base = int(starts[o]) if n else 0  # the row's first character
            row_starts, row_ends = starts[o:o + n], ends[o:o + n]
            trained[j] = _trained_ranges(ids, spans[j], self.special_ids,
                                         lambda a: int(np.searchsorted(row_ends, base + a, side="right")),
                                         lambda b: int(np.searchsorted(row_starts, base + b, side="left")),
                                         lambda k: row_starts[k] - base)
            o += n

    def encode(self, items: list[Normalised]) -> list[tuple[np.ndarray, np.ndarray] | BadRow]:
        """Encode a batch; a row that cannot be encoded comes back as a BadRow (its drop reason)."""
        ids, labels, offsets, bad = self.encode_flat(items)
        return [bad[j] if bad[j] is not None else (ids[offsets[j]:offsets[j + 1]], labels[offsets[j]:offsets[j + 1]])
                for j in range(len(items))]

    def encode_table(self, items: list[Normalised], source_ids, splits) -> pa.Table:
        """Encode a batch straight into a TOKENIZED_SCHEMA table (dropped rows keep empty lists)."""
        return _tokenized_table(source_ids, splits, *self.encode_flat(items))


def _tokenized_table(source_ids, splits, ids: np.ndarray, labels: np.ndarray, row_offsets: np.ndarray,
                     bad: list[Optional[BadRow]]) -> pa.Table:
    arrow_offsets = pa.array(row_offsets.astype(np.int32), pa.int32())
    return pa.table(
        {
            "source_id": pa.array(source_ids, pa.int64()),
            "split": pa.array(splits, pa.int8()),
            "input_ids": pa.ListArray.from_arrays(arrow_offsets, pa.array(ids, pa.int32())),
            "labels": pa.ListArray.from_arrays(arrow_offsets, pa.array(labels, pa.int32())),
            "drop_reason": pa.array([b.reason if b is not None else None for b in bad], pa.string()),
            "detail": pa.array([b.detail if b is not None else None for b in bad], pa.string()),
        },
        schema=TOKENIZED_SCHEMA,
    )


def _list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))


def encoded_table(source_ids, splits, results: list) -> pa.Table:
    """Results of `ChatEncoder.encode` -> TOKENIZED_SCHEMA table (dropped rows keep empty lists)."""
    empty = np.zeros(0, np.int32)
    ids = [empty if isinstance(r, BadRow) else r[0] for r in results]
    labels = [empty if isinstance(r, BadRow) else r[1] for r in results]
    row_offsets = np.zeros(len(results) + 1, dtype=np.int64)
    np.cumsum([len(i) for i in ids], out=row_offsets[1:])
    flat = lambda arrays: np.concatenate(arrays) if arrays else empty  # noqa: E731
    bad = [r if isinstance(r, BadRow) else None for r in results]
    return _tokenized_table(source_ids, splits, flat(ids), flat(labels), row_offsets, bad)


class TokenizeStage:
    """Callable class for the actor pool: raw rows -> normalise -> tokenize + mask (one tokenizer per actor)."""

    def __init__(self, tokenizer, fmt: str = "auto", system_prompt: str | None = None, train_on: str = "responses") -> None:
        self.fmt, self.system_prompt = fmt, system_prompt
        self.encoder = ChatEncoder(tokenizer, train_on)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.column("row").to_pylist()
        why = table.column("read_reason").to_pylist()
        items = [parse_and_normalise(r, self.fmt, self.system_prompt, w) for r, w in zip(rows, why)]
        return self.encoder.encode_table(items, table.column("source_id"), table.column("split"))
