"""`raysft prepare --preview N`: prepared samples decoded with their trained tokens marked.

Reads the first N samples of a prepared folder's train split (packed rows cut at `seq_lengths`),
decodes each run of trained / untrained tokens with the config's tokenizer, and shows trained text
in colour on a terminal or between `[[` and `]]` otherwise; `preview.html` (next to stats.json)
shows the same samples with the trained text highlighted.
"""

from __future__ import annotations

import html
from pathlib import Path

import pyarrow.parquet as pq

from raysft.pipeline.data.light_tokenizer import TokenizerSpec
from raysft.pipeline.data.schema import IGNORE_INDEX as IGNORE

_ON, _OFF = "\x1b[1;32m", "\x1b[0m"  # bold green
HTML_NAME = "preview.html"


def samples(directory: Path, n: int) -> list[tuple[int, list[int], list[int]]]:
    """(source id, input_ids, labels) of the first n samples in directory/train."""
    out: list[tuple[int, list[int], list[int]]] = []
    for part in sorted((directory / "train").glob("*.parquet")):
        for row in pq.read_table(part, columns=["input_ids", "labels", "seq_lengths", "source_ids"]).to_pylist():
            start = 0
            for length, sid in zip(row["seq_lengths"], row["source_ids"]):
                out.append((sid, row["input_ids"][start : start + length], row["labels"][start : start + length]))
                start += length
                if len(out) >= n:
                    return out
    return out


def runs(backend, ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """(trained?, text) for each maximal run of trained or untrained tokens, decoded."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            out.append((labels[start] != IGNORE, backend.decode(ids[start:i], skip_special_tokens=False)))
            start = i
    return out


def render_terminal(decoded: list[tuple[int, list[tuple[bool, str]]]], colour: bool) -> str:
    lines = []
    for sid, parts in decoded:
        lines.append(f"--- sample (source id {sid}); trained text {'in green' if colour else 'between [[ and ]]'} ---")
        lines.append("".join((f"{_ON}{t}{_OFF}" if colour else f"[[{t}]]") if trained else t for trained, t in parts))
    return "\n".join(lines)


def render_html(decoded: list[tuple[int, list[tuple[bool, str]]]]) -> str:
    body = []
    for sid, parts in decoded:
        text = "".join(f"<mark>{html.escape(t)}</mark>" if trained else html.escape(t) for trained, t in parts)
        body.append(f"<h3>source id {sid}</h3>\n<pre>{text}</pre>")
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>raysft mask preview</title>\n'
        "<style>pre{white-space:pre-wrap;border:1px solid #ccc;padding:8px}mark{background:#b6f2b6}</style>"
        "</head><body>\n<p>Highlighted text is trained (labels = input_ids); the rest has label -100.</p>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def preview(directory: Path, spec: TokenizerSpec, n: int, colour: bool) -> str:
    """The terminal text of the first n samples; writes directory/preview.html as a side effect."""
    backend = spec.backend()
    decoded = [(sid, runs(backend, ids, labels)) for sid, ids, labels in samples(directory, n)]
    (directory / HTML_NAME).write_text(render_html(decoded))
    return render_terminal(decoded, colour)
