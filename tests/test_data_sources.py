"""Reading inputs and normalising formats: files, globs, directories, source ids, bad rows (no Ray)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit import normalise_batch

from raysft.pipeline.data.formats import normalise_row, parse_and_normalise
from raysft.pipeline.data.sources import expand, held_out, plan_chunks, read_chunk, source_id, split_source_id
from raysft.pipeline.errors import DataError

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(10)]


def read_all(files, rows_per_chunk=3, **kw) -> pa.Table:
    return pa.concat_tables([read_chunk(c) for c in plan_chunks(files, rows_per_chunk, **kw)])


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_chunks_keep_line_numbers_and_mark_bad_lines(tmp_path):
    lines = [json.dumps(r) for r in ROWS]
    lines[4] = '{"prompt": "broken'
    lines[6] = "   "
    f = write_jsonl(tmp_path / "a.jsonl", lines)
    table = read_all([f], rows_per_chunk=3)
    assert table.column("source_id").to_pylist() == list(range(10))
    assert table.column("read_reason").to_pylist()[6] == "blank_line"
    normal = normalise_batch(table)
    reasons = normal.column("drop_reason").to_pylist()
    assert reasons[4] == "malformed_json" and reasons[6] == "blank_line"
    assert sum(r is None for r in reasons) == 8
    assert normal.column("messages")[9].as_py()[1] == {"role": "assistant", "content": "answer 9"}


def test_last_line_without_newline_and_crlf(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_bytes(b'{"text": "one"}\r\n{"text": "two"}')
    table = read_all([f], rows_per_chunk=1)
    assert table.column("row").to_pylist() == ['{"text": "one"}', '{"text": "two"}']


def test_json_array_parquet_arrow_and_json_lines_named_json(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps(ROWS))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet", row_group_size=4)
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink:
        table = pa.Table.from_pylist(ROWS)
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    for name in ("arr.json", "lines.json", "p.parquet", "s.arrow"):
        table = read_all([tmp_path / name], rows_per_chunk=3)
        assert table.column("source_id").to_pylist() == list(range(10)), name
        assert [json.loads(r) for r in table.column("row").to_pylist()] == ROWS, name
    assert len(plan_chunks([tmp_path / "p.parquet"], 3)) == 3  # row groups 4+4+2, grouped to >= 3 rows


def test_directory_and_glob_use_file_index_source_ids(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        write_jsonl(tmp_path / name, [json.dumps(r) for r in ROWS[:3]])
    (tmp_path / "notes.txt").write_text("ignored in a directory")
    files = expand(str(tmp_path))
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl"]
    assert expand(str(tmp_path / "*.jsonl")) == files
    ids = read_all(files).column("source_id").to_pylist()
    assert ids == [0, 1, 2, source_id(1, 0), source_id(1, 1), source_id(1, 2)]
    assert split_source_id(ids[-1]) == (1, 2)


def test_path_errors_are_one_sentence(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.json").write_text("[{1: 2}")
    (tmp_path / "obj.json").write_text("[]")
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "nodata").mkdir()
    cases = {
        str(tmp_path / "missing.jsonl"): "does not exist",
        str(tmp_path / "empty.jsonl"): "is empty",
        str(tmp_path / "*.none"): "matches no files",
        str(tmp_path / "nodata"): "holds no .jsonl",
        str(tmp_path / "x.csv"): "unsupported type",
    }
    for spec, words in cases.items():
        with pytest.raises(DataError, match=words):
            expand(spec)
    with pytest.raises(DataError, match="not valid JSON"):
        plan_chunks(expand(str(tmp_path / "bad.json")), 10)
    with pytest.raises(DataError, match="empty JSON array"):
        plan_chunks(expand(str(tmp_path / "obj.json")), 10)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_is_one_sentence(tmp_path):
    f = write_jsonl(tmp_path / "secret.jsonl", ['{"text": "x"}'])
    f.chmod(0)
    with pytest.raises(DataError, match="not readable"):
        expand(str(f))


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}, "non_string_content"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty_content"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, "missing_field"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "unknown_role"),
        ({"instruction": "do", "output": None}, "missing_field"),
        ({"instruction": "do", "input": ["x"], "output": "y"}, "non_string_content"),
        ({"prompt": "q", "completion": ""}, "empty_content"),
        ({"prompt": "q", "completion": [{"role": "user", "content": "a"}]}, "unknown_role"),
        ({"text": 3}, "non_string_content"),
        ({"foo": "bar"}, "unknown_format"),
        ([1, 2], "not_an_object"),
    ],
)
def test_bad_rows_get_a_reason(row, reason):
    assert normalise_row(row).drop_reason == reason


def test_declared_format_overrides_detection():
    row = {"text": "t", "prompt": "p", "completion": "c"}
    assert normalise_row(row).messages is not None  # auto: prompt/completion wins over text
    assert normalise_row(row, fmt="text").text == "t"
    assert normalise_row({"prompt": "p"}, fmt="prompt_completion").drop_reason == "missing_field"
    assert parse_and_normalise("{oops").drop_reason == "malformed_json"


def test_eval_split_is_deterministic_and_roughly_the_fraction(tmp_path):
    ids = np.arange(20000, dtype=np.int64)
    a, b = held_out(ids, 0.1, seed=3), held_out(ids, 0.1, seed=3)
    assert (a == b).all() and 0.09 < a.mean() < 0.11
    assert (held_out(ids, 0.1, seed=4) != a).any()
    f = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in ROWS * 50])
    table = read_all([f], rows_per_chunk=64, eval_fraction=0.2, seed=1)
    split = table.column("split").to_numpy()
    assert (split == held_out(np.arange(500), 0.2, 1)).all()  # source ids stay the original row numbers


def test_hf_source_offline_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"Could not load the Hugging Face data set hf://raysft-test/none"):
        expand("hf://raysft-test/none/train")
