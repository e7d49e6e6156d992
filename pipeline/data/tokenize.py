"""The tokenize stage of the data plan: raw rows -> normalised -> encoded -> a TOKENIZED_SCHEMA table.

`TokenizeStage` is the callable class of the Ray Data actor pool (one tokenizer per actor); it
parses each row with its source's format (formats.py), encodes the batch with `ChatEncoder`
(encode.py: render.py's samples, masks.py's trained tokens) and returns one Arrow row per sample,
each kept row's samples repeated by its source's weight. pack.py reads the table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raysft.pipeline.data.arrow_lists import int32_lists_at
from raysft.pipeline.data.encode import ChatEncoder
from raysft.pipeline.data.formats import BadRow, Normalised, parse_and_normalise
from raysft.pipeline.data.sources import MAX_COPIES, sample_ids

TOKENIZED_SCHEMA = pa.schema(
    [
        ("source_id", pa.int64()),
        ("split", pa.int8()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("drop_reason", pa.string()),
        ("detail", pa.string()),
        ("view", pa.int32()),
        ("copy", pa.int32()),
        ("tool_ids_rewritten", pa.int32()),  # on a row's first sample: its tool-call ids mapped (tool_ids.py)
    ]
)


def encode_table(encoder: ChatEncoder, items: list[Normalised], source_ids, splits, copies=None) -> pa.Table:
    """Encode a batch straight into a TOKENIZED_SCHEMA table (dropped rows keep empty lists). A kept
    row's samples are repeated `copies` times (its source's weight), numbered in the `copy` column."""
    ids, labels, offsets, bad, owner, view, rewritten = encoder.encode_flat(items)
    sids = np.asarray(source_ids, dtype=np.int64)[owner]
    spl = np.asarray(splits, dtype=np.int8)[owner]
    n = np.ones(len(owner), np.int64) if copies is None else np.asarray(copies, dtype=np.int64)[owner]
    n[np.fromiter((b is not None for b in bad), dtype=bool, count=len(bad))] = 1
    n = np.minimum(n, MAX_COPIES)
    take = np.repeat(np.arange(len(n)), n)
    copy = (np.arange(len(take)) - np.repeat(np.cumsum(n) - n, n)).astype(np.int32)
    table = tokenized_table(
        sample_ids(sids, view, np.zeros_like(view)), spl, ids, labels, offsets, bad, view, rewritten=rewritten
    )
    if len(take) == len(n):
        return table
    table = table.take(pa.array(take))
    table = table.set_column(table.schema.get_field_index("copy"), "copy", pa.array(copy, pa.int32()))
    at = table.schema.get_field_index("tool_ids_rewritten")  # counted on the first copy only
    table = table.set_column(at, "tool_ids_rewritten", pa.array(rewritten[take] * (copy == 0), pa.int32()))
    return table.set_column(0, "source_id", pa.array(sample_ids(sids[take], view[take], copy), pa.int64()))


def tokenized_table(
    source_ids,
    splits,
    ids: np.ndarray,
    labels: np.ndarray,
    row_offsets: np.ndarray,
    bad: list[BadRow | None],
    view=None,
    copy=None,
    rewritten=None,
) -> pa.Table:
    """Flat encoded samples (ids and labels cut at `row_offsets`, a BadRow or None each) -> TOKENIZED_SCHEMA table."""
    n = len(bad)
    return pa.table(
        {
            "source_id": pa.array(source_ids, pa.int64()),
            "split": pa.array(splits, pa.int8()),
            "input_ids": int32_lists_at(row_offsets, ids),
            "labels": int32_lists_at(row_offsets, labels),
            "drop_reason": pa.array([b.reason if b is not None else None for b in bad], pa.string()),
            "detail": pa.array([b.detail if b is not None else None for b in bad], pa.string()),
            "view": pa.array(np.zeros(n, np.int32) if view is None else view, pa.int32()),
            "copy": pa.array(np.zeros(n, np.int32) if copy is None else copy, pa.int32()),
            "tool_ids_rewritten": pa.array(np.zeros(n, np.int32) if rewritten is None else rewritten, pa.int32()),
        },
        schema=TOKENIZED_SCHEMA,
    )


def encoded_table(source_ids, splits, results: list) -> pa.Table:
    """Results of `ChatEncoder.encode` -> TOKENIZED_SCHEMA table (dropped rows keep empty lists)."""
    empty = np.zeros(0, np.int32)
    ids = [empty if isinstance(r, BadRow) else r[0] for r in results]
    labels = [empty if isinstance(r, BadRow) else r[1] for r in results]
    row_offsets = np.zeros(len(results) + 1, dtype=np.int64)
    np.cumsum([len(i) for i in ids], out=row_offsets[1:])
    flat = lambda arrays: np.concatenate(arrays) if arrays else empty  # noqa: E731
    bad = [r if isinstance(r, BadRow) else None for r in results]
    return tokenized_table(source_ids, splits, flat(ids), flat(labels), row_offsets, bad)


class TokenizeStage:
    """Callable class for the actor pool: raw rows -> normalise -> tokenize + mask (one tokenizer per actor).

    `sources` lists (format, columns) per data.train source (a read row's `source` column indexes it);
    without it every row uses `fmt`.
    """

    def __init__(
        self,
        tokenizer,
        fmt: str = "auto",
        system_prompt: str | None = None,
        train_on: str = "responses",
        sources: list[tuple[str, dict[str, str]]] | None = None,
        train_on_reasoning: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.fmt, self.system_prompt = fmt, system_prompt
        self.sources = sources or [(fmt, {})]
        self.encoder = ChatEncoder(
            tokenizer, train_on, train_on_reasoning=train_on_reasoning, template_kwargs=template_kwargs
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.column("row").to_pylist()
        why = table.column("read_reason").to_pylist()
        names = table.column_names
        source = table.column("source").to_pylist() if "source" in names else [0] * len(rows)
        items = [
            parse_and_normalise(r, self.sources[k][0], self.system_prompt, w, self.sources[k][1])
            for r, w, k in zip(rows, why, source)
        ]
        copies = table.column("copies").to_numpy() if "copies" in names else None
        return encode_table(self.encoder, items, table.column("source_id"), table.column("split"), copies)
