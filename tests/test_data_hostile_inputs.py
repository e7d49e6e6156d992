"""Hostile inputs are counted drops with their row, and a failing read or parse names file and row (no Ray)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pytest
from audit import normalise_batch

from raysft.pipeline.config import load_config
from raysft.pipeline.data import plan
from raysft.pipeline.data.sources import MAX_ROW_BYTES, Chunk, plan_chunks, read_chunk
from raysft.pipeline.data.spec_cache import load_tokenizer_spec
from raysft.pipeline.data.tokenize import TokenizeStage
from raysft.pipeline.errors import DataError

GOOD = json.dumps({"question": "what is 2 + 2", "answer": "it is 4"})


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tok")
    chatml_tokenizer.save_pretrained(d)
    return d


def cfg_for(tok_dir: Path, train: Path, tmp_path: Path):
    return load_config(
        None,
        {
            "model.name_or_path": str(tok_dir),
            "data.train": str(train),
            "data.cache_dir": str(tmp_path / "cache"),
            "data.max_seq_len": 256,
            "data.tokenize_batch_size": 2,
            "data.max_bad_fraction": 0.5,
        },
    )


def test_deep_nesting_and_huge_lines_are_counted_with_their_row(tok_dir, tmp_path, caplog):
    deep = "[" * 200_000 + "]" * 200_000
    huge = '{"text": "' + "a" * (MAX_ROW_BYTES + 10) + '"}'
    path = tmp_path / "hostile.jsonl"
    with open(path, "w") as f:
        f.write("\n".join([GOOD, deep, GOOD, huge, GOOD, '{"messages": ' * 5000 + "1" + "}" * 5000]) + "\n")
    table = pa.concat_tables([read_chunk(c) for c in plan_chunks([path], 2)])
    assert table.column("source_id").to_pylist() == list(range(6))
    normal = normalise_batch(table)
    assert normal.column("drop_reason").to_pylist() == [
        None,
        "malformed_json",
        None,
        "malformed_json",
        None,
        "malformed_json",
    ]
    with caplog.at_level(logging.WARNING, logger="raysft.data"):
        stats = plan.prepare(cfg_for(tok_dir, path, tmp_path), output=tmp_path / "out", use_ray=False)
    assert stats["rows_read"] == 6 and stats["rows_used"] == 3 and stats["rows_dropped"] == {"malformed_json": 3}
    assert "hostile.jsonl row 1: malformed_json (nested too deeply to parse)" in caplog.text
    assert f"row 3: malformed_json (a line of {len(huge) + 1} bytes, over the 64 MiB limit)" in caplog.text


def test_a_deep_json_array_file_is_one_sentence(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" + "[" * 200_000 + "]" * 200_000 + "]")
    with pytest.raises(DataError, match=r"deep.json is nested too deeply to parse as a JSON array"):
        plan_chunks([path], 10)


def test_a_failing_read_names_the_file(tok_dir, tmp_path):
    path = tmp_path / "broken.arrow"
    path.write_bytes(b"this is not an Arrow stream or file at all")
    with pytest.raises(DataError, match=r"Could not read .*broken.arrow \(from row 0\): ArrowInvalid"):
        plan.prepare(cfg_for(tok_dir, path, tmp_path), output=tmp_path / "out", use_ray=False)


class FailsOnRow(TokenizeStage):
    """Fault injection: the real stage, made to fail on one row's content (no real input reaches this path)."""

    def __call__(self, table: pa.Table) -> pa.Table:
        if any("poison" in (r or "") for r in table.column("row").to_pylist()):
            raise IndexError("list index out of range")
        return super().__call__(table)


def test_a_failing_parse_names_the_file_and_row(tok_dir, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([GOOD, GOOD, GOOD, json.dumps({"question": "poison", "answer": "x"}), GOOD]) + "\n")
    cfg = cfg_for(tok_dir, path, tmp_path)
    spec = load_tokenizer_spec(cfg)
    stage = FailsOnRow(spec, "auto", None, "responses")
    chunk = Chunk(str(path), "jsonl", 0, first_row=0)
    assert plan.read_and_tokenize(TokenizeStage(spec, "auto", None, "responses"), chunk).num_rows == 5
    with pytest.raises(DataError, match=r"Parsing .*rows.jsonl row 3 failed \(IndexError: list index out of range\)"):
        plan.read_and_tokenize(stage, chunk)
