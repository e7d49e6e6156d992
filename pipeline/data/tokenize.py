"""Render chat rows with the tokenizer's own template, tokenize, and build exact response labels.

Masks are located by construction, never by searching for content text. Each conversation is
rendered twice: as it is, and with every assistant content, reasoning and tool-call name replaced
by a unique sentinel (private-use characters no row holds). The sentinel render cut at its
sentinels is the template's own text; the real render must be that text with each sentinel
replaced by its value (or the value with the template's whitespace handling: strip, lstrip, ...),
which gives every authored piece's exact character span (`_align`). A turn's trained text runs from
its content (or, when its reasoning is trained or it is tool calls only, from the end of the
generation prompt, `render(messages[:k], add_generation_prompt=True)`) to the first special token
after its last authored piece (`<|im_end|>`, `<|eot_id|>`, `</s>`), which is trained too.

A turn is trained inside the full conversation only when the model sees it there as at inference:
the generation-prompt render of the conversation before it is a prefix of the full render, and
every piece to train is rendered. Otherwise (Mistral moving the system message into the last user
turn, Qwen3 stripping reasoning from earlier turns) it is trained in its own view: the
conversation up to that turn, where it is the last turn. Every assistant turn is trained exactly once.

After encoding, every turn is self-checked: its trained tokens must decode to its pieces (up to
whitespace) plus its closing token; a row that fails is dropped as `mask_check_failed`. Rows of
printable ASCII under a byte-level BPE tokenizer are encoded by the exact fast path in fast_bpe.py.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import itertools
import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raysft.pipeline.atomic import write_atomic
from raysft.pipeline.data.cache import cache_root, lock_root
from raysft.pipeline.data.fast_bpe import ByteLevelFastPath, char_spans
from raysft.pipeline.data.formats import BadRow, Normalised, parse_and_normalise
from raysft.pipeline.data.light_tokenizer import TokenizerSpec, compile_chat_template
from raysft.pipeline.data.schema import IGNORE_INDEX
from raysft.pipeline.data.sources import MAX_COPIES, MAX_VIEWS, sample_ids
from raysft.pipeline.data.tool_ids import demanded_format
from raysft.pipeline.models.source import tokenizer_source
from raysft.pipeline.models.tokenizer import load_tokenizer, no_chat_template

FAST_PATH_CHECK_ROWS = 32  # rows compared with tokenizers before an encoder trusts its fast path
log = logging.getLogger(__name__)
_START, _END = itemgetter(0), itemgetter(1)
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
# Sentinel brackets (private-use characters); the first pair that no row text holds is used.
_SENTINEL_PAIRS = [("\ue000", "\ue001"), ("\ue002", "\ue003"), ("\uf8f0", "\uf8f1"), ("\U000f0000", "\U000f0001")]


def _spec_cache_path(cfg, src: str, gguf: str | None) -> Path | None:
    """Where the TokenizerSpec of a local tokenizer directory is cached, keyed by every top-level file's
    name, size and mtime there plus the transformers and tokenizers versions; None for hub ids."""
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
    root = cache_root(cfg)
    if not isinstance(root, Path):  # a cache on an object store: the spec of a local folder stays local
        root = lock_root().parent / "prepared"
    return root / "tokenizers" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"


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
            write_atomic(path, spec.to_json())  # concurrent writers write the same content
        except OSError:
            pass  # a read-only cache only costs the next call the transformers import
    return spec


@dataclass
class Turn:
    """One assistant turn to train in a rendered text (characters): trained text starts at `start`;
    the closing special token is the first one starting at or after `anchor` (the end of the turn's
    last authored piece) and before `limit` (the next turn's first piece). `pieces` are the turn's
    trained authored texts in order, for the self-check; `from_content` says the trained text must
    start with the first of them (else a template prefix such as `<think>` may come first)."""

    index: int
    start: int
    anchor: int
    limit: int
    pieces: list[str]
    from_content: bool


@dataclass
class Sample:
    """One rendered text to encode: the row's full conversation (view 0) or one turn's own view."""

    text: str
    turns: list[Turn] | None  # None: train every token (text rows, train_on=all)
    view: int = 0
    plain: bool = False  # a text row (special tokens added, eos appended)


def _trained_ranges(
    ids, turns: list[Turn], special_ids, first_ending_after, first_starting_at, start_of
) -> list[tuple[int, int, int]]:
    """Token ranges (lo, hi, closing token or -1) to train in one sample: the tokens overlapping each
    turn's trained text, through the first special token at or after its anchor (before its limit).
    The three lookups answer from the sample's token offsets: first token ending after a character,
    first starting at or after one, start of token k."""
    out, n = [], len(ids)
    for t in turns:
        lo = first_ending_after(t.start)
        k = first_ending_after(t.anchor - 1) if t.anchor > 0 else 0
        close = -1
        while k < n and start_of(k) < t.limit:
            if ids[k] in special_ids and start_of(k) >= t.anchor:
                close = k
                break
            k += 1
        out.append((lo, close + 1 if close >= 0 else first_starting_at(t.anchor), close))
    return out


def _variants(value: str) -> list[str]:
    """A value as templates may render it: as is, or with their whitespace handling."""
    out = [value]
    for v in (value.strip(), value.lstrip(), value.rstrip(), value.strip("\n"), value.lstrip("\n"), value.rstrip("\n")):
        if v not in out:
            out.append(v)
    return out


def _align(text: str, pieces: list[str], values: dict[str, str]) -> dict[str, tuple[int, int]] | None:
    """Character spans of every sentinel key in `text`, given the sentinel render cut at its
    sentinels (`pieces`: literal, key, literal, key, ..., literal). None when the real render is not
    the sentinel render with each sentinel replaced by its value (or a whitespace variant of it)."""
    if not text.startswith(pieces[0]):
        return None
    pos, spans = len(pieces[0]), {}
    for i in range(1, len(pieces), 2):
        key, literal = pieces[i], pieces[i + 1]
        if key in spans or key not in values:
            return None  # rendered twice, or not a sentinel of this row
        last = i + 2 >= len(pieces)
        for variant in _variants(values[key]):
            end = pos + len(variant)
            if (
                text.startswith(variant, pos)
                and text.startswith(literal, end)
                and (not last or end + len(literal) == len(text))
            ):
                spans[key] = (pos, end)
                pos = end + len(literal)
                break
        else:
            return None
    return spans if pos == len(text) else None


def _squeeze(text: str) -> str:
    return "".join(unicodedata.normalize("NFC", text).split())


def mask_check(decoded: str, pieces: list[str], close: str | None, from_content: bool) -> bool:
    """Do a turn's trained tokens (decoded) hold exactly its pieces, in order, plus its closing token?
    Whitespace is ignored (templates trim; tokens merge across a boundary's whitespace). A turn
    trained from its content must be its pieces and closing token with nothing before; tool-call and
    reasoning markup the template adds between pieces is allowed."""
    if from_content and len(pieces) == 1 and close is not None and decoded == pieces[0] + close:
        return True  # the common case, exact as decoded: no normalising needed
    got = _squeeze(decoded)
    if close is not None:
        end = _squeeze(close)
        if not got.endswith(end):
            return False
        got = got[: len(got) - len(end)]
    want = [p for p in map(_squeeze, pieces) if p]
    if not want:
        return False
    if from_content and not got.startswith(want[0]):
        return False
    if from_content and len(want) == 1:
        return got == want[0]
    pos = 0
    for p in want:
        at = got.find(p, pos)
        if at < 0:
            return False
        pos = at + len(p)
    return True


class ChatEncoder:
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
        self.train_on = train_on
        self.train_on_reasoning = train_on_reasoning
        self.check_masks = mask_check
        self.template = compile_chat_template(spec.chat_template) if spec.chat_template else None
        # Templates that read `reasoning_content` (Qwen3) get it as that field; others get it inline.
        self.reasoning_field = bool(spec.chat_template) and "reasoning_content" in spec.chat_template
        self.template_kwargs = {**spec.template_vars, **(template_kwargs or {})}
        # The tool-call id form the template demands (Mistral v0.3: 9 characters), probed once; rows' ids are mapped.
        self.tool_ids = demanded_format(self.render) if self.template is not None else None
        self.special_ids = set(spec.special_ids)
        self.eos_id = spec.eos_id
        # Exact fast path for byte-level BPE on ASCII rows (see fast_bpe.py), checked on first use.
        self.fast = ByteLevelFastPath.build(self.backend) if fast_path else None
        self.fast_checked = {True: False, False: False}  # per kind of text: ASCII (True) or not
        self.mask_checks = 0  # turns self-checked (for benchmarks and tests)
        self._special_text: dict[int, str] = {}

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False, tools: list | None = None) -> str:
        # The same variables apply_chat_template passes (templates test `tools is not none`).
        return self.template.render(
            messages=self._template_messages(messages),
            tools=tools,
            documents=None,
            add_generation_prompt=generation_prompt,
            **self.template_kwargs,
        )

    def _template_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages as the template expects them: reasoning as `reasoning_content` for templates that
        read it, else inline as `<think>\n...\n</think>\n\n` before the content."""
        if self.reasoning_field or not any("reasoning_content" in m for m in messages):
            return messages
        out = []
        for m in messages:
            if "reasoning_content" in m:
                m = {k: v for k, v in m.items() if k != "reasoning_content"}
                m["content"] = f"<think>\n{messages[len(out)]['reasoning_content']}\n</think>\n\n{m['content']}"
            out.append(m)
        return out

    def _sentinelled(
        self, messages: list[dict[str, Any]], pair: tuple[str, str]
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Messages with each assistant reasoning, content and tool-call name replaced by a sentinel."""
        a, b = pair
        out, values = [], {}
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                out.append(m)
                continue
            m = dict(m)
            if m.get("reasoning_content"):
                values[f"r{k}"], m["reasoning_content"] = m["reasoning_content"], f"{a}r{k}{b}"
            if m["content"]:
                values[f"c{k}"], m["content"] = m["content"], f"{a}c{k}{b}"
            if m.get("tool_calls"):
                calls = []
                for j, call in enumerate(m["tool_calls"]):
                    values[f"n{k}_{j}"] = call["function"]["name"]
                    calls.append({**call, "function": {**call["function"], "name": f"{a}n{k}_{j}{b}"}})
                m["tool_calls"] = calls
            out.append(m)
        return out, values

    def _locate(self, messages: list[dict[str, Any]], tools: list | None) -> tuple[str, dict[str, tuple[int, int]]]:
        """The real render and the character span of every rendered assistant piece in it."""
        text = self.render(messages, tools=tools)
        blob = json.dumps([messages, tools], ensure_ascii=False)
        pair = next((p for p in _SENTINEL_PAIRS if p[0] not in blob and p[1] not in blob), None)
        if pair is None:
            raise BadRow("template_mismatch", "the row holds every private-use character the mask sentinels can use")
        marked, values = self._sentinelled(messages, pair)
        render = self.render(marked, tools=tools)
        pieces = re.split(f"{re.escape(pair[0])}([rcn][0-9_]+){re.escape(pair[1])}", render)
        spans = _align(text, pieces, values)
        if spans is None:
            raise BadRow(
                "template_mismatch",
                "the rendered template does not hold the assistant contents where its own text leaves room for them",
            )
        return text, spans

    def _turn(
        self,
        k: int,
        messages: list[dict[str, Any]],
        tools: list | None,
        text: str,
        spans: dict[str, tuple[int, int]],
        own: bool,
    ) -> Turn | None:
        """Turn k of `text` to train, or None when it cannot be trained faithfully there (then it gets
        its own view); in its own view (`own`) a turn that cannot be trained is a BadRow."""
        m = messages[k]
        keys = [f"n{k}_{j}" for j in range(len(m.get("tool_calls") or []))]
        if m["content"]:
            keys.insert(0, f"c{k}")
        reasoning = bool(m.get("reasoning_content")) and self.train_on_reasoning
        if reasoning:
            keys.insert(0, f"r{k}")
        missing = [key for key in keys if key not in spans]
        if missing:
            if not own:
                return None
            what = {"r": "reasoning", "c": "content", "n": "tool calls"}[missing[0][0]]
            raise BadRow("template_mismatch", f"the chat template does not render assistant turn {k}'s {what}")
        if not keys:
            raise BadRow("template_mismatch", f"assistant turn {k} has nothing to train")
        from_content = not reasoning and bool(m["content"])
        start = spans[keys[0]][0]
        if not own or not from_content:
            prompt = self.render(messages[:k], generation_prompt=True, tools=tools)
            if not text.startswith(prompt) or len(prompt) > start:
                if not own:
                    return None
                raise BadRow(
                    "template_mismatch", f"the generation prompt before assistant turn {k} is not where the turn starts"
                )
            if not from_content:
                start = len(prompt)
        anchor = max(spans[key][1] for key in keys)
        later = [a for key, (a, _) in spans.items() if int(key[1:].split("_")[0]) > k]
        pieces = [_piece(m, key) for key in sorted(keys, key=lambda key: spans[key][0])]
        return Turn(k, start, anchor, min(later, default=len(text)), pieces, from_content)

    def samples(self, messages: list[dict[str, Any]], tools: list | None = None) -> list[Sample]:
        """The samples of one conversation: the full render (training every turn it shows faithfully)
        and one view per other assistant turn."""
        if self.template is None:
            raise BadRow("no_chat_template", "the tokenizer has no chat template")
        if self.train_on == "all":
            return [Sample(self.render(messages, tools=tools), None)]
        text, spans = self._locate(messages, tools)
        last = len(messages) - 1
        turns, views = [], []
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                turn = self._turn(k, messages, tools, text, spans, own=k == last)
                (turns.append(turn) if turn is not None else views.append(k))
        out = [Sample(text, turns)] if turns else []
        if len(out) + len(views) > MAX_VIEWS:  # sample ids number a row's views in 6 bits
            raise BadRow(
                "too_many_views", f"{len(views)} assistant turns need their own view (at most {MAX_VIEWS - 1})"
            )
        for k in views:
            view = messages[: k + 1]
            view_text, view_spans = self._locate(view, tools)
            out.append(Sample(view_text, [self._turn(k, view, tools, view_text, view_spans, own=True)], len(out)))
        return out

    def spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int, int]]]:
        """Rendered text and, per assistant turn trained in it, (trained start, anchor, limit) in characters."""
        sample = self.samples(messages)[0]
        return sample.text, [(t.start, t.anchor, t.limit) for t in sample.turns]

    def encode_flat(self, items: list[Normalised]):
        """Encode a batch into flat arrays over its samples: (input ids, labels, sample offsets,
        per-sample BadRow or None, per-sample item index, per-sample view). A row that cannot be
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
                    # The offsets list is searched in place: converting it to an array costs more than the search.
                    offs = enc.offsets
                    trained[i] = _trained_ranges(
                        enc.ids,
                        samples[i].turns,
                        self.special_ids,
                        lambda a, offs=offs: bisect.bisect_right(offs, a, key=_END),
                        lambda b, offs=offs: bisect.bisect_left(offs, b, key=_START),
                        lambda k, offs=offs: offs[k][0],
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
            if bad_item[owner[i]] is None and not mask_check(text, turn.pieces, close, turn.from_content):
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
                trained[j] = _trained_ranges(
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

    def encode_table(self, items: list[Normalised], source_ids, splits, copies=None) -> pa.Table:
        """Encode a batch straight into a TOKENIZED_SCHEMA table (dropped rows keep empty lists). A kept
        row's samples are repeated `copies` times (its source's weight), numbered in the `copy` column."""
        ids, labels, offsets, bad, owner, view, rewritten = self.encode_flat(items)
        sids = np.asarray(source_ids, dtype=np.int64)[owner]
        spl = np.asarray(splits, dtype=np.int8)[owner]
        n = np.ones(len(owner), np.int64) if copies is None else np.asarray(copies, dtype=np.int64)[owner]
        n[np.fromiter((b is not None for b in bad), dtype=bool, count=len(bad))] = 1
        n = np.minimum(n, MAX_COPIES)
        take = np.repeat(np.arange(len(n)), n)
        copy = (np.arange(len(take)) - np.repeat(np.cumsum(n) - n, n)).astype(np.int32)
        table = _tokenized_table(
            sample_ids(sids, view, np.zeros_like(view)), spl, ids, labels, offsets, bad, view, rewritten=rewritten
        )
        if len(take) == len(n):
            return table
        table = table.take(pa.array(take))
        table = table.set_column(table.schema.get_field_index("copy"), "copy", pa.array(copy, pa.int32()))
        at = table.schema.get_field_index("tool_ids_rewritten")  # counted on the first copy only
        table = table.set_column(at, "tool_ids_rewritten", pa.array(rewritten[take] * (copy == 0), pa.int32()))
        return table.set_column(0, "source_id", pa.array(sample_ids(sids[take], view[take], copy), pa.int64()))


def _piece(message: dict[str, Any], key: str) -> str:
    """The authored text a sentinel key stands for."""
    if key[0] == "r":
        return message["reasoning_content"]
    if key[0] == "c":
        return message["content"]
    return message["tool_calls"][int(key.split("_")[1])]["function"]["name"]


def _tokenized_table(
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
    arrow_offsets = pa.array(row_offsets.astype(np.int32), pa.int32())
    n = len(bad)
    return pa.table(
        {
            "source_id": pa.array(source_ids, pa.int64()),
            "split": pa.array(splits, pa.int8()),
            "input_ids": pa.ListArray.from_arrays(arrow_offsets, pa.array(ids, pa.int32())),
            "labels": pa.ListArray.from_arrays(arrow_offsets, pa.array(labels, pa.int32())),
            "drop_reason": pa.array([b.reason if b is not None else None for b in bad], pa.string()),
            "detail": pa.array([b.detail if b is not None else None for b in bad], pa.string()),
            "view": pa.array(np.zeros(n, np.int32) if view is None else view, pa.int32()),
            "copy": pa.array(np.zeros(n, np.int32) if copy is None else copy, pa.int32()),
            "tool_ids_rewritten": pa.array(np.zeros(n, np.int32) if rewritten is None else rewritten, pa.int32()),
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
        return self.encoder.encode_table(items, table.column("source_id"), table.column("split"), copies)
