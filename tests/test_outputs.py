"""prepare --output and export --output never destroy anything (issue 13 item 1; no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysft.pipeline import outputs
from raysft.pipeline.config import load_config
from raysft.pipeline.data import plan
from raysft.pipeline.errors import ConfigError, DataError
from raysft.pipeline.models.export import export_run


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tok")
    chatml_tokenizer.save_pretrained(d)
    return d


def parquet_input(path: Path, n: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {"question": [f"what is {i} + {i}" for i in range(n)], "answer": [f"it is {2 * i}" for i in range(n)]}
        ),
        path,
    )
    return path


def cfg_for(tok_dir: Path, train: Path, tmp_path: Path, **data):
    over = {
        "model.name_or_path": str(tok_dir),
        "data.train": str(train),
        "data.cache_dir": str(tmp_path / "cache"),
        "data.max_seq_len": 256,
    }
    over.update({f"data.{k}": v for k, v in data.items()})
    return load_config(None, over)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_input_survives_output_pointed_at_its_parent(tok_dir, tmp_path):
    """The probe: the input sits where prepare writes (DIR/train/*.parquet) and --output is DIR."""
    data = parquet_input(tmp_path / "data" / "train" / "part-00000.parquet")
    before = data.read_bytes()
    cfg = cfg_for(tok_dir, data, tmp_path)
    with pytest.raises(ConfigError, match=r"--output .*data contains the input .*part-00000.parquet"):
        plan.prepare(cfg, output=tmp_path / "data", use_ray=False)
    with pytest.raises(ConfigError, match="contains the input"):  # the tokenizer folder is an input too
        plan.prepare(cfg, output=tok_dir.parent, use_ray=False)
    with pytest.raises(ConfigError, match=r"lies inside the input .*data"):  # a folder named in data.train
        plan.prepare(cfg_for(tok_dir, tmp_path / "data", tmp_path), output=tmp_path / "data" / "o", use_ray=False)
    assert data.read_bytes() == before
    assert [p.relative_to(tmp_path).as_posix() for p in (tmp_path / "data").rglob("*")] == [
        "data/train",
        "data/train/part-00000.parquet",
    ]


def test_failed_rerun_keeps_the_previous_output(tok_dir, tmp_path):
    out = tmp_path / "out"
    good = plan.prepare(cfg_for(tok_dir, parquet_input(tmp_path / "good.parquet"), tmp_path), output=out, use_ray=False)
    assert json.loads((out / "stats.json").read_text()) == good and (out / outputs.MARKER).is_file()
    kept = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(DataError, match="on_bad_row is error"):
        plan.prepare(cfg_for(tok_dir, bad, tmp_path, on_bad_row="error"), output=out, use_ray=False)
    assert snapshot(out) == kept
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary sibling left
    # A successful rerun replaces the previous output as a whole.
    again = plan.prepare(
        cfg_for(tok_dir, parquet_input(tmp_path / "other.parquet", 12), tmp_path), output=out, use_ray=False
    )
    assert json.loads((out / "stats.json").read_text()) == again and again["rows_read"] == 12


def test_foreign_folders_are_refused_untouched(tok_dir, tmp_path):
    cfg = cfg_for(tok_dir, parquet_input(tmp_path / "in" / "t.parquet"), tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"is not empty and was not written by raysft"):
        plan.prepare(cfg, output=mine, use_ray=False)
    assert snapshot(mine) == {"notes.txt": b"keep me"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        plan.prepare(cfg, output=tmp_path / "file", use_ray=False)
    (tmp_path / "empty").mkdir()
    assert plan.prepare(cfg, output=tmp_path / "empty", use_ray=False)["rows_read"] == 40


def test_export_output_follows_the_same_rules(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not written by raysft"):
        export_run(run, output=user)
    assert snapshot(user) == {"thesis.tex": b"years of work"}
    with pytest.raises(ConfigError, match="contains the input"):
        export_run(run, output=run)
    out = export_run(run, output=tmp_path / "exported")
    card = snapshot(out).pop("README.md")  # the model card (no config.yaml here: it says the base is unknown)
    assert b"base model and training are unknown" in card
    assert {k: v for k, v in snapshot(out).items() if k != "README.md"} == {
        **snapshot(run / "adapter"),
        outputs.MARKER: b'{"kind": "export"}\n',
    }
    assert export_run(run, output=out) == out  # a previous export may be replaced
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / outputs.MARKER).write_text('{"kind": "prepare"}')
    with pytest.raises(ConfigError, match="holds a raysft prepare output"):
        export_run(run, output=prepared)
