"""Rendered samples -> token ids and labels: the tokenizer's offsets map each turn's trained characters to tokens.

`ChatEncoder` is a `ChatRenderer` (render.py) that also tokenizes: each batch's samples are encoded
with `tokenizers` (rows of printable ASCII under a byte-level BPE tokenizer by the exact fast path in
fast_bpe.py, checked against `tokenizers` on its first rows), `masks.trained_ranges` gives each
turn's tokens, and every turn is self-checked: its trained tokens must decode to its pieces (up to
whitespace) plus its closing token; a row that fails is dropped as `mask_check_failed`. The output
is flat numpy arrays over the batch's samples; tokenize.py makes the Arrow table of them.
"""

from __future__ import annotations

import gc
import itertools
import logging
from typing import Any

import numpy as np

from raysft.pipeline.data import masks
from raysft.pipeline.data.fast_bpe import ByteLevelFastPath, char_spans
from raysft.pipeline.data.formats import BadRow, Normalised
from raysft.pipeline.data.light_tokenizer import TokenizerSpec
from raysft.pipeline.data.render import ChatRenderer, Sample
from raysft.pipeline.data.schema import IGNORE_INDEX

FAST_PATH_CHECK_ROWS = 32  # rows compared with tokenizers before an encoder trusts its fast path
log = logging.getLogger(__name__)


class ChatEncoder(ChatRenderer):
    """Normalised rows -> (input_ids, labels) samples with exact response masks; holds one tokenizer."""

    def __init__(
        self,
        tokenizer,
        train_on: str = "responses",
        fast_path: bool = True,
        train_on_reasoning: bool = True,
        template_kwargs: dict[str, Any] | None = None,
        mask_check: bool = True,
    ) -> None:
        # A TokenizerSpec (what Ray actors get) needs only `tokenizers` + `jinja2`; a Hugging Face
        # tokenizer is reduced to the same spec, so both paths render and encode identically.
        spec = tokenizer if isinstance(tokenizer, TokenizerSpec) else TokenizerSpec.from_hf(tokenizer)
        self.tokenizer = tokenizer
        if isinstance(tokenizer, TokenizerSpec):
            self.backend = spec.backend()
        else:
            self.backend = (
                tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer._tokenizer
            )
        self.check_masks = mask_check
        super().__init__(spec, train_on, train_on_reasoning, template_kwargs)
        self.special_ids = set(spec.special_ids)
        self.eos_id = spec.eos_id
        # Exact fast path for byte-level BPE on ASCII rows (see fast_bpe.py), checked on first use.
        self.fast = ByteLevelFastPath.build(self.backend) if fast_path else None
        self.fast_checked = {True: False, False: False}  # per kind of text: ASCII (True) or not
        self.mask_checks = 0  # turns self-checked (for benchmarks and tests)
        self._special_text: dict[int, str] = {}

    def encode_flat(self, items: list[Normalised]):
        """Encode a batch into flat arrays over its samples: (input ids, labels, sample offsets,
        per-sample BadRow or None, per-sample item index, view and tool-call ids rewritten). A row that cannot be
        encoded is one sample with no tokens and its BadRow (drop reason).

        The Python garbage collector is paused for the batch: encoding allocates millions of small
        tuples and no reference cycles, and collections triggered by them cost ~5% of the stage.
        """
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._encode_flat(items)
        finally:
            if paused:
                gc.enable()

    def _encode_flat(self, items: list[Normalised]):
        samples: list[Sample] = []
        owner: list[int] = []
        bad_item: list[BadRow | None] = [None] * len(items)
        rewritten = [0] * len(items)  # tool-call ids mapped to the template's form, per item
        for j, item in enumerate(items):
            if item.drop_reason is not None:
                bad_item[j] = BadRow(item.drop_reason, item.detail or item.drop_reason)
                continue
            try:
                if item.text is not None:
                    row = [Sample(item.text, None, plain=True)]
                else:
                    messages = item.messages
                    if self.tool_ids is not None:
                        messages, rewritten[j] = self.tool_ids.rewrite(messages)
                    row = self.samples(messages, item.tools)
            except BadRow as exc:
                bad_item[j] = exc
                continue
            except Exception as exc:  # a template's own raise_exception (e.g. roles must alternate)
                bad_item[j] = BadRow("template_error", f"the chat template refused the row: {str(exc)[:80]}")
                continue
            samples += row
            owner += [j] * len(row)
        texts = [s.text for s in samples]
        chat = [i for i, s in enumerate(samples) if not s.plain]
        plain = [i for i, s in enumerate(samples) if s.plain]
        token_ids: list[Any] = [()] * len(samples)
        trained: list[list[tuple[int, int, int]]] = [[] for _ in samples]
        fast = [i for i in chat if self.fast.safe(texts[i])] if self.fast is not None else []
        for kind in (True, False):
            if fast and not self.fast_checked[kind]:
                fast = self._check_fast_path(fast, texts, kind)
        if fast:
            self._encode_fast(fast, samples, token_ids, trained)
        taken = set(fast)
        slow = [i for i in chat if i not in taken]
        if slow:
            for i, enc in zip(slow, self.backend.encode_batch([texts[i] for i in slow], add_special_tokens=False)):
                token_ids[i] = enc.ids
                if samples[i].turns is not None:
                    trained[i] = masks.trained_ranges(
                        enc.ids, samples[i].turns, self.special_ids, *masks.offset_lookups(enc.offsets)
                    )
        for i in chat:
            if samples[i].turns is None:
                trained[i] = [(0, len(token_ids[i]), -1)]
        if plain:
            for i, enc in zip(plain, self.backend.encode_batch([texts[i] for i in plain], add_special_tokens=True)):
                ids = enc.ids
                if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                    ids.append(self.eos_id)
                token_ids[i], trained[i] = ids, [(0, len(ids), -1)]
        if self.check_masks and self.train_on != "all":
            self._self_check(samples, owner, token_ids, trained, bad_item)
        for i in chat + plain:
            if bad_item[owner[i]] is None and not any(hi > lo for lo, hi, _ in trained[i]):
                bad_item[owner[i]] = BadRow("no_trainable_tokens", "the rendered row has no trainable token")
        # Output samples: a dropped item is one empty sample carrying its reason.
        out_ids, out_ranges, out_bad, out_owner, out_view, out_rewritten = [], [], [], [], [], []
        by_item: dict[int, list[int]] = {}
        for i, j in enumerate(owner):
            by_item.setdefault(j, []).append(i)
        for j in range(len(items)):
            if bad_item[j] is not None:
                (
                    out_ids.append(()),
                    out_ranges.append([]),
                    out_bad.append(bad_item[j]),
                    out_owner.append(j),
                    out_view.append(0),
                    out_rewritten.append(0),
                )
                continue
            for i in by_item.get(j, []):
                out_ids.append(token_ids[i]), out_ranges.append(trained[i]), out_bad.append(None)
                out_owner.append(j), out_view.append(samples[i].view)
                out_rewritten.append(rewritten[j] if samples[i].view == 0 else 0)
        lengths = np.fromiter(map(len, out_ids), dtype=np.int64, count=len(out_ids))
        row_offsets = np.zeros(len(out_ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=row_offsets[1:])
        flat_ids = np.fromiter(itertools.chain.from_iterable(out_ids), dtype=np.int32, count=int(row_offsets[-1]))
        flat_labels = np.full(len(flat_ids), IGNORE_INDEX, dtype=np.int32)
        for i, ranges in enumerate(out_ranges):
            base = int(row_offsets[i])
            for lo, hi, _ in ranges:
                flat_labels[base + lo : base + hi] = flat_ids[base + lo : base + hi]
        return (
            flat_ids,
            flat_labels,
            row_offsets,
            out_bad,
            np.asarray(out_owner, dtype=np.int64),
            np.asarray(out_view, dtype=np.int32),
            np.asarray(out_rewritten, dtype=np.int32),
        )

    def _self_check(self, samples: list[Sample], owner: list[int], token_ids, trained, bad_item) -> None:
        """Decode every turn's trained tokens and compare them with the turn's pieces and closing token;
        the row of a turn that differs is dropped as mask_check_failed."""
        segments, where = [], []
        for i, s in enumerate(samples):
            if s.turns is None or bad_item[owner[i]] is not None:
                continue
            ids = token_ids[i]
            for turn, (lo, hi, close) in zip(s.turns, trained[i]):
                segments.append(ids[lo:hi])
                where.append((i, turn, ids[close] if close >= 0 else None))
        if not where:
            return
        decoded = self.backend.decode_batch(segments, skip_special_tokens=False)
        self.mask_checks += len(where)
        for text, (i, turn, close_id) in zip(decoded, where):
            close = None if close_id is None else self._token_text(close_id)
            if bad_item[owner[i]] is None and not masks.mask_check(text, turn.pieces, close, turn.from_content):
                bad_item[owner[i]] = BadRow(
                    "mask_check_failed",
                    f"assistant turn {turn.index}'s trained tokens decode to "
                    f"{text[:60]!r}, not its content and closing token",
                )

    def _token_text(self, token_id: int) -> str:
        """A closing (special) token's text, decoded once."""
        text = self._special_text.get(token_id)
        if text is None:
            text = self._special_text[token_id] = self.backend.decode([token_id], skip_special_tokens=False)
        return text

    def _check_fast_path(self, rows: list[int], texts, ascii_kind: bool) -> list[int]:
        """Compare the fast path with `tokenizers` (ids and offsets) on the first rows of one kind (ASCII
        or not) it would take; on any difference, log it and use `tokenizers` for everything from then on."""
        sample = [j for j in rows if texts[j].isascii() == ascii_kind][:FAST_PATH_CHECK_ROWS]
        if not sample:
            return rows
        self.fast_checked[ascii_kind] = True
        for j, enc in zip(sample, self.backend.encode_batch([texts[j] for j in sample], add_special_tokens=False)):
            ids = self.fast.encode(texts[j])
            if ids != enc.ids or self.fast.offsets(ids, texts[j]) != enc.offsets:
                log.warning("The byte-level fast path differs from tokenizers on a row; using tokenizers for all rows.")
                self.fast = None
                return []
        return rows

    def _encode_fast(self, rows: list[int], samples: list[Sample], token_ids, trained) -> None:
        """Fast-path rows: ids from ByteLevelFastPath; offsets are cumulative byte lengths (ASCII: characters;
        otherwise mapped to characters)."""
        encoded = [self.fast.encode(samples[j].text) for j in rows]
        for j, ids in zip(rows, encoded):
            token_ids[j] = ids
        if all(samples[j].turns is None for j in rows):
            return
        lengths = self.fast.byte_lengths[np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64)]
        ends = np.cumsum(lengths)  # in batch coordinates: each row's characters follow the previous row's
        starts = ends - lengths
        o = 0
        for j, ids in zip(rows, encoded):
            n = len(ids)
            if samples[j].turns is not None:
                base = int(starts[o]) if n else 0  # the row's first character
                row_starts, row_ends = starts[o : o + n], ends[o : o + n]
                if not samples[j].text.isascii():  # byte spans -> character spans
                    row_starts, row_ends = char_spans(samples[j].text, row_starts - base, row_ends - base)
                    base = 0
                trained[j] = masks.trained_ranges(
                    ids,
                    samples[j].turns,
                    self.special_ids,
                    lambda a, row_ends=row_ends, base=base: int(np.searchsorted(row_ends, base + a, side="right")),
                    lambda b, row_starts=row_starts, base=base: int(np.searchsorted(row_starts, base + b, side="left")),
                    lambda k, row_starts=row_starts, base=base: row_starts[k] - base,
                )
            o += n

    def encode_views(self, items: list[Normalised]) -> list[list[tuple[np.ndarray, np.ndarray]] | BadRow]:
        """Encode a batch: per row, its samples (the full conversation first, then its turns' own views)
        as (input_ids, labels), or its BadRow (drop reason)."""
        ids, labels, offsets, bad, owner, _, _ = self.encode_flat(items)
        out: list[Any] = [[] for _ in items]
        for i, j in enumerate(owner.tolist()):
            if bad[i] is not None:
                out[j] = bad[i]
            else:
                out[j].append((ids[offsets[i] : offsets[i + 1]], labels[offsets[i] : offsets[i + 1]]))
        return out

    def encode(self, items: list[Normalised]) -> list[tuple[np.ndarray, np.ndarray] | BadRow]:
        """Encode a batch; per row its first sample (the full conversation) or its BadRow (drop reason)."""
        return [r if isinstance(r, BadRow) else r[0] for r in self.encode_views(items)]
