"""An exact fast path for byte-level BPE tokenizers (GPT-2 style: SmolLM2; Llama-3 and Qwen2 style:
a `Split` regex then `ByteLevel(use_regex=False)`).

Hugging Face `tokenizers` spends most of an encode on per-token bookkeeping (normalised-string
alignments, offsets, token strings), not on merges. For these pipelines (no normaliser or NFC on
text that is already NFC, a byte-level pre-tokenizer without prefix space, BPE model, a
post-processor that leaves offsets alone) the same ids come out of: split on the added tokens
(leftmost-longest, as tokenizers does), split each piece with the pre-tokenizer's regex (GPT-2's,
or the tokenizer's own `Split` pattern, compiled with the `regex` module), and run the tokenizer's
*own* BPE model on each byte-mapped word, memoised per word. Token i then covers exactly the bytes
of its vocab entry, so offsets are cumulative byte lengths (mapped to characters for non-ASCII text).

It is used only where that equivalence is expected: the tokenizer's JSON matches a pipeline above,
and the text is printable ASCII plus tab/newline/CR, or (non-ASCII) holds no control, format,
private-use, line/paragraph-separator or unassigned (in Python's Unicode tables) character. Any
other row goes through `tokenizers` unchanged, and ChatEncoder checks the first rows of each kind
(ASCII, non-ASCII) of every encoder against `tokenizers` before trusting the fast path for that kind.
"""

from __future__ import annotations

import json
import re
import unicodedata

import numpy as np
import regex

# The GPT-2 pre-tokenizer regex, with its Unicode classes written for ASCII text (letters, digits,
# and the four whitespace characters a safe text can hold).
_WORDS = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")
_UNSAFE = re.compile(r"[^\t\n\r\x20-\x7e]")
# The GPT-2 pattern with Unicode classes (what ByteLevel(use_regex=True) splits with), for non-ASCII text.
_GPT2_UNICODE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_CACHE_LIMIT = 1 << 18  # memoised words (~40 MB) before the memo is cleared


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel maps each byte of a word to)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _pattern(config: dict) -> str | None:
    """The word-splitting regex of an eligible pipeline ("" for GPT-2's ByteLevel regex), else None."""
    pre, model, post, norm = (
        config.get("pre_tokenizer") or {},
        config.get("model") or {},
        config.get("post_processor"),
        config.get("normalizer"),
    )
    if norm is not None and norm.get("type") != "NFC":
        return None
    if model.get("type") != "BPE" or model.get("dropout") is not None or model.get("byte_fallback"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    posts = post.get("processors", []) if post is not None and post.get("type") == "Sequence" else [post]
    for p in posts:  # offsets kept as they are: a TemplateProcessing, or ByteLevel without trimming
        if (
            p is not None
            and p.get("type") != "TemplateProcessing"
            and not (p.get("type") == "ByteLevel" and p.get("trim_offsets") is False)
        ):
            return None
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in config.get("added_tokens", [])):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") is False and pre.get("use_regex", True) is True:
        return ""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2:
        split, byte = steps
        if (
            split.get("type") == "Split"
            and split.get("behavior") == "Isolated"
            and split.get("invert") is False
            and "Regex" in (split.get("pattern") or {})
            and byte.get("type") == "ByteLevel"
            and byte.get("add_prefix_space") is False
            and byte.get("use_regex") is False
        ):
            return split["pattern"]["Regex"]
    return None


def _ascii_pattern(pattern: str) -> str | None:
    """The pattern for ASCII text with `re` (about twice as fast as `regex` here): `\\p{L}` and `\\p{N}`
    written as ASCII classes; None when it holds other Unicode properties."""
    out, i, depth = [], 0, 0
    while i < len(pattern):
        if pattern.startswith(("\\p{L}", "\\p{N}"), i):
            cls = "A-Za-z" if pattern[i + 3] == "L" else "0-9"
            out.append(cls if depth else f"[{cls}]")
            i += 5
            continue
        if pattern[i] == "\\":
            if pattern[i + 1 : i + 2] in ("p", "P"):
                return None
            out.append(pattern[i : i + 2])
            i += 2
            continue
        depth += {"[": 1, "]": -1}.get(pattern[i], 0)
        out.append(pattern[i])
        i += 1
    return "".join(out)


def pipeline_config(backend) -> dict:
    """The parts of a `tokenizers.Tokenizer`'s JSON the fast path reads (normalizer, pre-tokenizer,
    post-processor, the BPE model's options, added tokens), read from its components: parsing the whole
    JSON (vocab and merges) costs ~0.3 s of CPU per tokenizer actor."""

    def state(component) -> dict | None:
        return json.loads(component.__getstate__()) if component is not None else None

    model = backend.model
    options = ("dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix")
    return {
        "normalizer": state(backend.normalizer),
        "pre_tokenizer": state(backend.pre_tokenizer),
        "post_processor": state(backend.post_processor),
        "model": {"type": type(model).__name__, **{k: getattr(model, k, None) for k in options}},
        "added_tokens": [
            {"id": i, "content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "single_word": t.single_word}
            for i, t in sorted(backend.get_added_tokens_decoder().items())
        ],
    }


def _eligible(config: dict) -> bool:
    return _pattern(config) is not None


class ByteLevelFastPath:
    """ids and byte lengths of tokens for safe ASCII text, identical to `tokenizers` for eligible tokenizers."""

    def __init__(self, backend, config: dict) -> None:
        self.model = backend.model
        pattern = _pattern(config)
        self.nfc = (config.get("normalizer") or {}).get("type") == "NFC"
        ascii_pattern = _ascii_pattern(pattern) if pattern else None
        self.words_ascii = (
            _WORDS.findall
            if pattern == ""
            else re.compile(ascii_pattern).findall
            if ascii_pattern
            else regex.compile(pattern).findall
        )
        self.words_unicode = regex.compile(pattern or _GPT2_UNICODE).findall
        self.added = {t["content"]: t["id"] for t in config.get("added_tokens", [])}
        self.split = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")
            if self.added
            else None
        )
        chars = _byte_chars()
        self.ascii_map = str.maketrans({chr(b): chars[b] for b in range(128)})
        self.byte_map = [chars[b] for b in range(256)]
        vocab = backend.get_vocab(with_added_tokens=True)
        unmapped = {ord(c): None for c in chars.values()}  # str.translate deletes the byte-mapped characters
        self.byte_lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
        for token, i in vocab.items():
            # An added token is matched as raw text; a vocab entry is byte-mapped characters (one per byte).
            self.byte_lengths[i] = (
                len(token.encode()) if token in self.added else len(token) - len(token.translate(unmapped))
            )
        self.memo: dict[str, list[int]] = {}

    @classmethod
    def build(cls, backend, config: dict | None = None) -> ByteLevelFastPath | None:
        """The fast path for `backend` (its `pipeline_config` unless `config` is given), or None if ineligible."""
        config = pipeline_config(backend) if config is None else config
        return cls(backend, config) if _eligible(config) else None

    def safe(self, text: str) -> bool:
        """May this text take the fast path? ASCII: printable plus tab/newline/CR. Otherwise: NFC when
        the tokenizer normalises to NFC, and no character of an unsafe category."""
        if text.isascii():
            return _UNSAFE.search(text) is None
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return False
        return not any(
            unicodedata.category(c) in _UNSAFE_CATEGORIES
            for c in set(text)
            if c > "\x7e" or c < " " and c not in "\t\n\r"
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of a safe text (no special tokens added), as `tokenizers` would give them."""
        out: list[int] = []
        words = self.words_ascii if text.isascii() else self.words_unicode
        memo, pieces = self.memo, (self.split.split(text) if self.split else [text])
        if len(memo) > _CACHE_LIMIT:
            memo.clear()
        for piece in pieces:
            if not piece:
                continue
            added = self.added.get(piece)
            if added is not None:
                out.append(added)
                continue
            for word in words(piece):
                ids = memo.get(word)
                if ids is None:
                    mapped = (
                        word.translate(self.ascii_map)
                        if word.isascii()
                        else "".join(self.byte_map[b] for b in word.encode())
                    )
                    ids = memo[word] = [t.id for t in self.model.tokenize(mapped)]
                out.extend(ids)
        return out

    def offsets(self, ids: list[int], text: str | None = None) -> list[tuple[int, int]]:
        """(start, end) characters of each token of a safe text: cumulative byte lengths, mapped to
        characters when the text is not ASCII (a token that ends inside a character covers all of it)."""
        ends = np.cumsum(self.byte_lengths[np.asarray(ids, dtype=np.int64)])
        starts = ends - self.byte_lengths[np.asarray(ids, dtype=np.int64)]
        if text is not None and not text.isascii():
            starts, ends = char_spans(text, starts, ends)
        return list(zip(starts.tolist(), ends.tolist()))


def char_spans(text: str, byte_starts: np.ndarray, byte_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans of tokens in `text` -> character spans (start: the character holding the first byte;
    end: one past the character holding the last byte).

    "né!" is 4 bytes (é is 2); tokens "n", "é", "!" at bytes 0..1, 1..3, 3..4 are characters 0..1, 1..2, 2..3:

    >>> starts, ends = char_spans("né!", np.array([0, 1, 3]), np.array([1, 3, 4]))
    >>> starts.tolist(), ends.tolist()
    ([0, 1, 2], [1, 2, 3])
    """
    raw = np.frombuffer(text.encode(), dtype=np.uint8)
    char_of = np.cumsum((raw & 0xC0) != 0x80, dtype=np.int64) - 1  # UTF-8: continuation bytes are 10xxxxxx
    nonempty = byte_ends > byte_starts
    starts = np.where(nonempty, char_of[np.minimum(byte_starts, len(char_of) - 1)], 0)
    ends = np.where(nonempty, char_of[np.maximum(byte_ends - 1, 0)] + 1, 0)
    return starts, ends
