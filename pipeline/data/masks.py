r"""Response masks by construction: where each authored assistant piece sits in a render, which tokens train.

Masks are located by construction, never by searching for content text. Each conversation is
rendered twice: as it is, and with every assistant content, reasoning and tool-call name replaced
by a unique sentinel (private-use characters no row holds: `sentinelled`). The sentinel render cut
at its sentinels (`cut_at_sentinels`) is the template's own text; the real render must be that text
with each sentinel replaced by its value (or the value with the template's whitespace handling:
strip, lstrip, ...), which gives every authored piece's exact character span (`align`). A `Turn`
says which characters of a render train; `trained_ranges` maps it to tokens through the tokens'
offsets, through the first special token after the turn's last piece (`<|im_end|>`, `<|eot_id|>`,
`</s>`), which is trained too. `mask_check` is the self-check of a turn's trained tokens, decoded.

Every function here is pure (strings, lists and offsets in, the same out); render.py renders with a
template and decides where each turn starts, encode.py tokenizes and applies these.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

# Sentinel brackets (private-use characters); the first pair that no row text holds is used.
SENTINEL_PAIRS = [("\ue000", "\ue001"), ("\ue002", "\ue003"), ("\uf8f0", "\uf8f1"), ("\U000f0000", "\U000f0001")]
_START, _END = itemgetter(0), itemgetter(1)


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


def free_sentinel_pair(blob: str) -> tuple[str, str] | None:
    r"""The first sentinel pair neither of whose characters `blob` (the row, as text) holds; None if none is free.

    >>> free_sentinel_pair("plain text")
    ('\ue000', '\ue001')
    >>> free_sentinel_pair("a row that holds \ue001")
    ('\ue002', '\ue003')
    """
    return next((p for p in SENTINEL_PAIRS if p[0] not in blob and p[1] not in blob), None)


def sentinelled(messages: list[dict[str, Any]], pair: tuple[str, str]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Messages with each assistant reasoning (key `rK`), content (`cK`) and tool-call name (`nK_J`) replaced by
    the key in sentinel brackets, and the value of each key (K: the message's index, J: the call's).

    >>> chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    >>> marked, values = sentinelled(chat, ("[", "]"))
    >>> marked[1]["content"], values
    ('[c1]', {'c1': 'Hello!'})
    >>> chat[1]["content"]  # the input is not changed
    'Hello!'
    """
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


def cut_at_sentinels(render: str, pair: tuple[str, str]) -> list[str]:
    """A sentinel render cut at its sentinels: literal, key, literal, key, ..., literal.

    >>> cut_at_sentinels("user: hi\\nbot: [c1]\\n", ("[", "]"))
    ['user: hi\\nbot: ', 'c1', '\\n']
    """
    return re.split(f"{re.escape(pair[0])}([rcn][0-9_]+){re.escape(pair[1])}", render)


def piece(message: dict[str, Any], key: str) -> str:
    """The authored text a sentinel key stands for.

    >>> calls = [{"function": {"name": "f", "arguments": {}}}]
    >>> m = {"role": "assistant", "content": "ok", "reasoning_content": "hmm", "tool_calls": calls}
    >>> piece(m, "c1"), piece(m, "r1"), piece(m, "n1_0")
    ('ok', 'hmm', 'f')
    """
    if key[0] == "r":
        return message["reasoning_content"]
    if key[0] == "c":
        return message["content"]
    return message["tool_calls"][int(key.split("_")[1])]["function"]["name"]


def variants(value: str) -> list[str]:
    """A value as templates may render it: as is, or with their whitespace handling (first match wins).

    >>> variants(" hi\\n")
    [' hi\\n', 'hi', 'hi\\n', ' hi']
    >>> variants("hi")
    ['hi']
    """
    out = [value]
    for v in (value.strip(), value.lstrip(), value.rstrip(), value.strip("\n"), value.lstrip("\n"), value.rstrip("\n")):
        if v not in out:
            out.append(v)
    return out


def align(text: str, pieces: list[str], values: dict[str, str]) -> dict[str, tuple[int, int]] | None:
    """Character spans of every sentinel key in `text`, given the sentinel render cut at its
    sentinels (`pieces`: literal, key, literal, key, ..., literal). None when the real render is not
    the sentinel render with each sentinel replaced by its value (or a whitespace variant of it).

    >>> cut = ["<user>hi</user><bot>", "c1", "</bot>"]
    >>> align("<user>hi</user><bot>Hello!</bot>", cut, {"c1": "Hello!"})
    {'c1': (20, 26)}
    >>> align("<user>hi</user><bot>Hello!</bot>", cut, {"c1": " Hello! "})  # the template stripped it
    {'c1': (20, 26)}
    >>> align("<user>hi</user><bot>Bye</bot>", cut, {"c1": "Hello!"}) is None  # not where the template left room
    True
    """
    if not text.startswith(pieces[0]):
        return None
    pos, spans = len(pieces[0]), {}
    for i in range(1, len(pieces), 2):
        key, literal = pieces[i], pieces[i + 1]
        if key in spans or key not in values:
            return None  # rendered twice, or not a sentinel of this row
        last = i + 2 >= len(pieces)
        for variant in variants(values[key]):
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


def offset_lookups(
    offsets: list[tuple[int, int]],
) -> tuple[Callable[[int], int], Callable[[int], int], Callable[[int], int]]:
    """`trained_ranges`' three lookups over a sample's token offsets (character (start, end) per token): the
    first token ending after a character, the first starting at or after one, and the start of token k.
    The offsets list is searched in place: converting it to an array costs more than the search.

    >>> after, at, start = offset_lookups([(0, 5), (5, 7), (7, 13), (13, 18)])
    >>> after(5), after(6), at(6), at(7), start(2)
    (1, 1, 2, 2, 7)
    """
    return (
        lambda a: bisect.bisect_right(offsets, a, key=_END),
        lambda b: bisect.bisect_left(offsets, b, key=_START),
        lambda k: offsets[k][0],
    )


def trained_ranges(
    ids, turns: list[Turn], special_ids, first_ending_after, first_starting_at, start_of
) -> list[tuple[int, int, int]]:
    """Token ranges (lo, hi, closing token or -1) to train in one sample: the tokens overlapping each
    turn's trained text, through the first special token at or after its anchor (before its limit).
    The three lookups answer from the sample's token offsets (`offset_lookups`): first token ending
    after a character, first starting at or after one, start of token k.

    "<bot>Hi there<end>" as 4 tokens, `<end>` (id 9) special; the turn's content "Hi there" is characters 5..13:

    >>> offsets = [(0, 5), (5, 7), (7, 13), (13, 18)]
    >>> turn = Turn(index=1, start=5, anchor=13, limit=18, pieces=["Hi there"], from_content=True)
    >>> trained_ranges([1, 2, 3, 9], [turn], {9}, *offset_lookups(offsets))  # tokens 1..3 train, 3 closes
    [(1, 4, 3)]
    >>> trained_ranges([1, 2, 3, 4], [turn], {9}, *offset_lookups(offsets))  # no closing token before the limit
    [(1, 3, -1)]
    """
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


def squeeze(text: str) -> str:
    """Text NFC-normalised with all whitespace removed (what the self-check compares).

    >>> squeeze(" Cafe\\u0301 au\\n lait ")
    'Caféaulait'
    """
    return "".join(unicodedata.normalize("NFC", text).split())


def mask_check(decoded: str, pieces: list[str], close: str | None, from_content: bool) -> bool:
    """Do a turn's trained tokens (decoded) hold exactly its pieces, in order, plus its closing token?
    Whitespace is ignored (templates trim; tokens merge across a boundary's whitespace). A turn
    trained from its content must be its pieces and closing token with nothing before; tool-call and
    reasoning markup the template adds between pieces is allowed.

    >>> mask_check("Hi there<end>", ["Hi there"], "<end>", from_content=True)
    True
    >>> mask_check(" there<end>", ["Hi there"], "<end>", from_content=True)  # a token short
    False
    >>> mask_check("<think>\\nhmm\\n</think>\\n\\nHi<end>", ["hmm", "Hi"], "<end>", from_content=False)
    True
    """
    if from_content and len(pieces) == 1 and close is not None and decoded == pieces[0] + close:
        return True  # the common case, exact as decoded: no normalising needed
    got = squeeze(decoded)
    if close is not None:
        end = squeeze(close)
        if not got.endswith(end):
            return False
        got = got[: len(got) - len(end)]
    want = [p for p in map(squeeze, pieces) if p]
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
