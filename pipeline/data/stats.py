"""Accumulate stats.json from the packed stream, log the first bad rows, enforce the bad-row policy.

Every source row ends up either in a packed row's `source_ids` or as a drop row with its reason,
so `rows_read == rows_used + sum(rows_dropped.values())` holds by construction. Rows count once:
a row's extra turn views (`extra_views`) and its weighted repeats (`samples_repeated`) are samples
of the epoch, counted apart. With data.train as a list of sources, `per_source` breaks the train
split down by source.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysft.pipeline.data.formats import BAD_INPUT_REASONS
from raysft.pipeline.data.schema import IGNORE_INDEX
from raysft.pipeline.data.sources import FILE_SHIFT, MAX_FILES, split_source_id
from raysft.pipeline.errors import DataError

log = logging.getLogger("raysft.data")
BAD_REASONS = BAD_INPUT_REASONS | {"template_error", "mask_check_failed"}
LOGGED_PER_SPLIT = 5

_LIKELY_CAUSE = {
    "no_trainable_tokens": (
        "no assistant content survives rendering (check data.format, data.train_on and the chat template)"
    ),
    "template_mismatch": (
        "the chat template does not render the assistant contents (check the tokenizer's chat template)"
    ),
    "template_error": "the chat template refuses these conversations (check roles and their order)",
    "too_long": "every sample is longer than data.max_seq_len (raise it, or set data.too_long=truncate)",
    "no_trainable_tokens_after_truncation": (
        "truncation to data.max_seq_len cuts off every response (raise data.max_seq_len)"
    ),
    "malformed_json": "the file is not JSON lines or a JSON array",
    "unknown_format": "the rows match no known format (set data.format, or rename the fields)",
    "missing_field": "the rows lack the fields data.format expects",
    "blank_line": "the file holds only blank lines",
    "mask_check_failed": (
        "the trained tokens do not decode to the assistant contents (a bug: please report it with the row)"
    ),
    "not_sampled": "every row's weight draw left it out (raise the source's weight)",
}


class SplitStats:
    """Counters for one split (train or eval)."""

    def __init__(self, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len
        self.rows_used = 0
        self.dropped: Counter[str] = Counter()
        self.rows_truncated = 0
        self.tokens_total = 0
        self.tokens_trainable = 0
        self.tokens_truncated = 0
        self.tokens_dropped = 0
        self.packed_rows = 0
        self.logged = 0
        self.extra_views = 0  # kept samples that are a turn's own view (first copy)
        self.samples_repeated = 0  # kept samples that are a weighted repeat of a row (copy >= 1)
        self.samples_dropped: Counter[str] = Counter()  # dropped views and repeats, by reason
        self.tool_call_ids_rewritten = 0  # kept rows' tool-call ids mapped to the form the template demands

    @property
    def rows_read(self) -> int:
        return self.rows_used + sum(self.dropped.values())

    @property
    def rows_bad(self) -> int:
        return sum(n for r, n in self.dropped.items() if r in BAD_REASONS)

    def to_dict(self) -> dict:
        eff = self.tokens_total / (self.packed_rows * self.max_seq_len) if self.packed_rows else 0.0
        return {
            "rows_read": self.rows_read,
            "rows_used": self.rows_used,
            "rows_dropped": dict(sorted(self.dropped.items())),
            "rows_truncated": self.rows_truncated,
            "tokens_total": self.tokens_total,
            "tokens_trainable": self.tokens_trainable,
            "tokens_truncated": self.tokens_truncated,
            "tokens_dropped": self.tokens_dropped,
            "packed_rows": self.packed_rows,
            "max_seq_len": self.max_seq_len,
            "packing_efficiency": round(eff, 6),
            "extra_views": self.extra_views,
            "samples_repeated": self.samples_repeated,
            "samples_dropped": dict(sorted(self.samples_dropped.items())),
            "tool_call_ids_rewritten": self.tool_call_ids_rewritten,
        }


class SourceStats:
    """Train-split counters for one data.train source."""

    def __init__(self, name: str, weight: float) -> None:
        self.name, self.weight = name, weight
        self.rows_used = self.rows_truncated = self.samples = self.extra_views = 0
        self.tokens = self.tokens_trainable = 0
        self.dropped: Counter[str] = Counter()

    def to_dict(self) -> dict:
        return {
            "source": self.name,
            "weight": self.weight,
            "rows_read": self.rows_used + sum(self.dropped.values()),
            "rows_used": self.rows_used,
            "rows_dropped": dict(sorted(self.dropped.items())),
            "rows_truncated": self.rows_truncated,
            "samples": self.samples,
            "extra_views": self.extra_views,
            "tokens": self.tokens,
            "tokens_trainable": self.tokens_trainable,
            "trained_share": round(self.tokens_trainable / self.tokens, 6) if self.tokens else 0.0,
        }


class StatsAccumulator:
    """Feeds on PACKED_SCHEMA batches; raises DataError at the first bad row when on_bad_row=error."""

    def __init__(
        self,
        max_seq_len: int,
        files: list[list[Path]],
        on_bad_row: str = "skip",
        sources: list[tuple[str, float, int]] | None = None,
    ) -> None:
        self.splits = [SplitStats(max_seq_len), SplitStats(max_seq_len)]
        self.files = files  # per split: the matched files, indexed by source id's file index
        self.on_bad_row = on_bad_row
        # data.train sources: (name, weight, number of files); train file index -> source index
        sources = sources or [("train", 1.0, len(files[0]) if files else 0)]
        self.sources = [SourceStats(name, weight) for name, weight, _ in sources]
        self.file_source = (
            np.repeat(np.arange(len(sources)), [max(n, 0) for _, _, n in sources]) if sources else np.zeros(0, int)
        )

    def _source_of(self, sids: np.ndarray) -> np.ndarray:
        index = (sids >> FILE_SHIFT) & (MAX_FILES - 1)
        return (
            self.file_source[np.minimum(index, len(self.file_source) - 1)]
            if len(self.file_source)
            else np.zeros_like(index)
        )

    def where(self, split: int, sid: int) -> str:
        index, row = split_source_id(sid)
        files = self.files[split] if split < len(self.files) and self.files[split] else self.files[0]
        name = files[index] if index < len(files) else f"file #{index}"
        return f"{name} row {row}"

    def add(self, batch: pa.Table) -> None:
        reasons = batch.column("drop_reason")
        kept = pc.is_null(reasons)
        splits = batch.column("split").to_numpy()
        if not pc.all(kept).as_py():
            drops = batch.filter(pc.invert(kept))
            for split, sids, reason, detail, view, copy in zip(
                drops.column("split").to_pylist(),
                drops.column("source_ids").to_pylist(),
                drops.column("drop_reason").to_pylist(),
                drops.column("detail").to_pylist(),
                drops.column("sample_views").to_pylist(),
                drops.column("sample_copies").to_pylist(),
            ):
                st = self.splits[split]
                if view[0] or copy[0]:
                    st.samples_dropped[reason] += 1
                    continue
                st.dropped[reason] += 1
                if split == 0:
                    self.sources[int(self._source_of(np.asarray(sids[:1], np.int64))[0])].dropped[reason] += 1
                if reason in BAD_REASONS and self.on_bad_row == "error":
                    raise DataError(
                        f"Bad row in {self.where(split, sids[0])}: {reason} ({detail}); data.on_bad_row is error."
                    )
                if st.logged < LOGGED_PER_SPLIT and reason != "blank_line":
                    st.logged += 1
                    log.warning("dropped %s: %s (%s)", self.where(split, sids[0]), reason, detail)
        for split in (0, 1):
            mask = splits == split
            if not mask.any():
                continue
            # Filtering copies list columns, so only small columns are filtered; drop rows have empty
            # token lists, so token counts over the whole batch are already the kept rows' counts.
            part = batch if mask.all() else batch.filter(pa.array(mask))
            st = self.splits[split]
            st.tokens_dropped += int(pc.sum(part.column("tokens_dropped")).as_py() or 0)
            keep = pc.is_null(part.column("drop_reason"))
            small = part.select(
                [
                    "source_ids",
                    "tokens_truncated",
                    "seq_lengths",
                    "sample_views",
                    "sample_copies",
                    "sample_truncated",
                    "tool_ids_rewritten",
                ]
            )
            if not pc.all(keep).as_py():
                small = small.filter(keep)
            if not small.num_rows:
                continue
            st.packed_rows += small.num_rows
            flat = {
                name: pc.list_flatten(small.column(name)).to_numpy()
                for name in ("source_ids", "seq_lengths", "sample_views", "sample_copies", "sample_truncated")
            }
            first = (flat["sample_views"] == 0) & (flat["sample_copies"] == 0)
            st.rows_used += int(first.sum())
            st.extra_views += int(((flat["sample_views"] > 0) & (flat["sample_copies"] == 0)).sum())
            st.samples_repeated += int((flat["sample_copies"] > 0).sum())
            st.rows_truncated += int((first & (flat["sample_truncated"] > 0)).sum())
            st.tokens_truncated += int(pc.sum(small.column("tokens_truncated")).as_py())
            st.tool_call_ids_rewritten += int(pc.sum(small.column("tool_ids_rewritten")).as_py() or 0)
            st.tokens_total += int(pc.sum(pc.list_value_length(part.column("input_ids"))).as_py() or 0)
            trained = pc.not_equal(pc.list_flatten(part.column("labels")), IGNORE_INDEX).to_numpy(zero_copy_only=False)
            st.tokens_trainable += int(trained.sum())
            if split == 0:
                self._add_sources(flat, first, trained)

    def _add_sources(self, flat: dict, first: np.ndarray, trained: np.ndarray) -> None:
        """Per-source counters of one batch's kept train samples (packed in order, so per-sample
        trained counts come from cumulative sums at the samples' ends)."""
        n = len(self.sources)
        src = self._source_of(flat["source_ids"].astype(np.int64))
        lengths = flat["seq_lengths"].astype(np.int64)
        ends = np.cumsum(lengths)
        cum = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
        per_sample = cum[ends] - cum[ends - lengths]
        for name, values in (
            ("rows_used", first),
            ("rows_truncated", first & (flat["sample_truncated"] > 0)),
            ("samples", np.ones(len(src), bool)),
            ("extra_views", (flat["sample_views"] > 0) & (flat["sample_copies"] == 0)),
        ):
            counts = np.bincount(src, weights=values.astype(np.int64), minlength=n)
            for k in range(n):
                setattr(self.sources[k], name, getattr(self.sources[k], name) + int(counts[k]))
        tokens = np.bincount(src, weights=lengths, minlength=n)
        trainable = np.bincount(src, weights=per_sample, minlength=n)
        for k in range(n):
            self.sources[k].tokens += int(tokens[k])
            self.sources[k].tokens_trainable += int(trainable[k])

    def check(self, max_bad_fraction: float, fmt: str) -> None:
        """Stop with one sentence when too many rows are bad or nothing at all is usable."""
        for name, st in zip(("train", "eval"), self.splits):
            if not st.rows_read:
                continue
            if st.rows_bad / st.rows_read > max_bad_fraction:
                top = Counter({r: n for r, n in st.dropped.items() if r in BAD_REASONS}).most_common(1)[0][0]
                raise DataError(
                    f"{st.rows_bad} of {st.rows_read} {name} rows are bad (mostly {top}), more than "
                    f"data.max_bad_fraction={max_bad_fraction}; see the log for the first offending rows."
                )
            if st.rows_used == 0:
                top = st.dropped.most_common(1)[0][0]
                cause = _LIKELY_CAUSE.get(top, f"every row was dropped as {top}")
                raise DataError(
                    f"All {st.rows_read} {name} rows were dropped (mostly {top}, data.format={fmt}): likely {cause}."
                )

    def to_dict(self) -> dict:
        out = self.splits[0].to_dict()
        out["eval"] = self.splits[1].to_dict() if self.splits[1].rows_read else None
        out["per_source"] = [s.to_dict() for s in self.sources]
        return out
