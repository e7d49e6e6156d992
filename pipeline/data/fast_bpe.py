"""An exact fast path for byte-level BPE tokenizers (GPT-2 style: SmolLM2, ChatML models) on ASCII text.

Hugging Face `tokenizers` spends most of an encode on per-token bookkeeping (normalised-string
alignments, offsets, token strings), not on merges. For the common pipeline (no normaliser,
`ByteLevel(add_prefix_space=False, use_regex=True)` pre-tokenizer, BPE model, a post-processor
that leaves offsets alone) the same ids come out of: split on the added tokens (leftmost-longest,
as tokenizers does), split each piece with the GPT-2 regex, and run the tokenizer's *own* BPE model
on each byte-mapped word, memoised per word. Token i then covers exactly the bytes of its vocab
entry, so offsets are cumulative byte lengths.

It is used only where that equivalence is certain: the tokenizer's JSON matches the pipeline
above, and the text is printable ASCII plus tab/newline/CR (where every regex engine agrees on
letters, digits and whitespace). Any other row goes through `tokenizers` unchanged, and
ChatEncoder checks the first rows of every encoder against `tokenizers` before trusting it.
"""

from __future__ import annotations

import json
import re
from typing import Optional

import numpy as np

# The GPT-2 pre-tokenizer regex, with its Unicode classes written for ASCII text (letters, digits,
# and the four whitespace characters a safe text can hold).
_WORDS = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")
_UNSAFE = re.compile(r"[^\t\n\r\x20-\x7e]")
_CACHE_LIMIT = 1 << 18  # memoised words (~40 MB) before the memo is cleared


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel maps each byte of a word to)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _eligible(config: dict) -> bool:
    pre, model, post = config.get("pre_tokenizer") or {}, config.get("model") or {}, config.get("post_processor")
    return (
        config.get("normalizer") is None
        and pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") is False and pre.get("use_regex", True) is True
        and model.get("type") == "BPE" and model.get("dropout") is None and not model.get("byte_fallback")
        and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
        and (post is None or post.get("type") == "TemplateProcessing")
        and all(not (t.get("lstrip") or t.get("rstrip") or t.get("single_word")) for t in config.get("added_tokens", []))
    )


class ByteLevelFastPath:
    """ids and byte lengths of tokens for safe ASCII text, identical to `tokenizers` for eligible tokenizers."""

    def __init__(self, backend, config: dict) -> None:
        self.model = backend.model
        self.added = {t["content"]: t["id"] for t in config.get("added_tokens", [])}
        self.split = (re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")
                      if self.added else None)
        chars = _byte_chars()
        self.ascii_map = str.maketrans({chr(b): chars[b] for b in range(128)})
        vocab = backend.get_vocab(with_added_tokens=True)
        inverse = {c: b for b, c in chars.items()}
        self.byte_lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
        for token, i in vocab.items():
            # An added token is matched as raw text; a vocab entry is byte-mapped characters.
            self.byte_lengths[i] = len(token.encode()) if token in self.added else sum(1 for c in token if c in inverse)
        self.memo: dict[str, list[int]] = {}

    @classmethod
    def build(cls, backend, backend_json: str) -> Optional["ByteLevelFastPath"]:
        config = json.loads(backend_json)
        return cls(backend, config) if _eligible(config) else None

    @staticmethod
    def safe(text: str) -> bool:
        return text.isascii() and _UNSAFE.search(text) is None

    def encode(self, text: str) -> list[int]:
        """Token ids of a safe text (no special tokens added), as `tokenizers` would give them."""
        out: list[int] = []
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
            for word in _WORDS.findall(piece):
                ids = memo.get(word)
                if ids is None:
                    ids = memo[word] = [t.id for t in self.model.tokenize(word.translate(self.ascii_map))]
                out.extend(ids)
        return out

    def offsets(self, ids: list[int]) -> list[tuple[int, int]]:
        """(start, end) characters of each token of a safe text: cumulative byte lengths."""
        ends = np.cumsum(self.byte_lengths[np.asarray(ids, dtype=np.int64)]).tolist()
        return list(zip([0] + ends[:-1], ends))
