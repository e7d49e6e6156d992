"""The data plan end to end: Parquet + stats.json, bad-input policy, tokenizer errors, cache, CLI, Ray == pure."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysft.pipeline import cli
from raysft.pipeline.config import load_config
from raysft.pipeline.data import plan
from raysft.pipeline.data.light_tokenizer import TokenizerSpec
from raysft.pipeline.data.spec_cache import load_tokenizer_spec
from raysft.pipeline.errors import DataError, ModelError
from raysft.pipeline.models.tokenizer import load_tokenizer

STATS_KEYS = {
    "rows_read",
    "rows_used",
    "rows_dropped",
    "rows_truncated",
    "tokens_total",
    "tokens_trainable",
    "packed_rows",
    "max_seq_len",
    "packing_efficiency",
}
INT32_LIST, INT64_LIST = pa.list_(pa.int32()), pa.list_(pa.int64())


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tok")
    chatml_tokenizer.save_pretrained(d)
    return d


def write_rows(path: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    lines = []
    for i in range(n):
        if i % 3 == 0:
            row = {
                "question": f"how many apples does {i} have",
                "answer": "the answer is " + " ".join(["more"] * (i % 40)) + f" #### {i}",
            }
        elif i % 3 == 1:
            row = {
                "conversations": [
                    {"from": "human", "value": f"hello {i}"},
                    {"from": "gpt", "value": f"hi {i} " * (i % 9 + 1)},
                    {"from": "human", "value": "thanks"},
                    {"from": "gpt", "value": "sure"},
                ]
            }
        else:
            row = {"instruction": "add the numbers", "input": f"{i} and {i + 1}", "output": str(2 * i + 1)}
        lines.append(json.dumps(row))
    for i, text in (bad or {}).items():
        lines[i] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def make_cfg(tok_dir: Path, train: Path, tmp_path: Path, **data):
    over = {
        "model.name_or_path": str(tok_dir),
        "data.train": str(train),
        "data.cache_dir": str(tmp_path / "cache"),
        "data.max_seq_len": 128,
        "data.tokenize_batch_size": 64,
    }
    over.update({f"data.{k}": v for k, v in data.items()})
    return load_config(None, over)


def read_split(directory: Path) -> pa.Table:
    return pq.read_table(directory) if directory.is_dir() else None


def test_prepare_writes_dataset_and_stats(tok_dir, tmp_path, caplog):
    train = write_rows(tmp_path / "train.jsonl", 300, bad={5: "{not json", 8: '{"messages": "no list"}'})
    cfg = make_cfg(tok_dir, train, tmp_path, eval_split=0.1)
    with caplog.at_level(logging.WARNING, logger="raysft.data"):
        stats = plan.prepare(cfg, output=tmp_path / "out", use_ray=False)
    assert STATS_KEYS <= set(stats) and stats["eval"] is not None
    assert stats == json.loads((tmp_path / "out" / "stats.json").read_text())
    assert "train.jsonl row 5: malformed_json" in caplog.text  # first offending rows logged with the file name
    train_t, eval_t = read_split(tmp_path / "out" / "train"), read_split(tmp_path / "out" / "eval")
    for t in (train_t, eval_t):
        assert t.schema == pa.schema(
            [
                ("input_ids", INT32_LIST),
                ("labels", INT32_LIST),
                ("position_ids", INT32_LIST),
                ("seq_lengths", INT32_LIST),
                ("source_ids", INT64_LIST),
            ]
        )
    ids = [s for t in (train_t, eval_t) for row in t.column("source_ids").to_pylist() for s in row]
    dropped = sum(stats["rows_dropped"].values()) + sum(stats["eval"]["rows_dropped"].values())
    assert len(ids) == len(set(ids)) == 300 - dropped  # every row once, or counted as dropped
    assert stats["rows_read"] + stats["eval"]["rows_read"] == 300
    assert stats["rows_dropped"].get("malformed_json", 0) + stats["eval"]["rows_dropped"].get("malformed_json", 0) == 1
    assert stats["tokens_total"] == sum(len(x) for x in train_t.column("input_ids").to_pylist())
    assert stats["tokens_trainable"] == sum(sum(v != -100 for v in x) for x in train_t.column("labels").to_pylist())
    assert stats["packed_rows"] == train_t.num_rows
    assert 0 < stats["packing_efficiency"] <= 1


def test_bad_row_policies(tok_dir, tmp_path):
    train = write_rows(
        tmp_path / "t.jsonl",
        60,
        bad={3: "{oops", 7: "[1]", 9: "{oops", 11: "{oops", 13: "{oops", 15: "{oops", 17: "{oops", 19: "{oops"},
    )
    with pytest.raises(DataError, match=r"Bad row in .*t.jsonl row 3: malformed_json .*on_bad_row is error"):
        plan.prepare(make_cfg(tok_dir, train, tmp_path, on_bad_row="error"), tmp_path / "o1", use_ray=False)
    with pytest.raises(
        DataError, match=r"8 of 60 train rows are bad \(mostly malformed_json\), more than data.max_bad_fraction=0.1"
    ):
        plan.prepare(make_cfg(tok_dir, train, tmp_path), tmp_path / "o2", use_ray=False)
    stats = plan.prepare(make_cfg(tok_dir, train, tmp_path, max_bad_fraction=0.2), tmp_path / "o3", use_ray=False)
    assert stats["rows_dropped"] == {"malformed_json": 7, "not_an_object": 1}
    with pytest.raises(DataError, match=r"All 60 train rows were dropped \(mostly too_long.*raise it"):
        plan.prepare(
            make_cfg(tok_dir, train, tmp_path, max_seq_len=8, too_long="drop", max_bad_fraction=0.2),
            tmp_path / "o4",
            use_ray=False,
        )


def test_tokenizer_errors_are_one_sentence(tok_dir, tmp_path, chatml_tokenizer):
    base = {"data.train": "x.jsonl"}
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(load_config(None, {**base, "model.name_or_path": str(tmp_path / "nope")}))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ModelError, match="does not hold a tokenizer"):
        load_tokenizer(load_config(None, {**base, "model.name_or_path": str(tmp_path / "empty_dir")}))
    plain = chatml_tokenizer.__class__(tokenizer_object=chatml_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    plain.save_pretrained(tmp_path / "plain")
    cfg = load_config(None, {**base, "model.name_or_path": str(tmp_path / "plain")})
    with pytest.raises(ModelError, match="has no chat template"):
        load_tokenizer(cfg)
    assert load_tokenizer(cfg.with_overrides({"data.format": "text"})) is not None
    assert load_tokenizer(
        load_config(None, {**base, "model.name_or_path": "/nowhere", "model.tokenizer": str(tok_dir)})
    )


def test_tokenizer_spec_is_cached_and_keyed_by_the_tokenizer_files(tok_dir, tmp_path, chatml_tokenizer):
    """The data plan's tokenizer spec is transformers' own output, cached: a second call with unchanged
    files does not import transformers; a touched file, a corrupt entry or a missing template is handled."""
    folder = tmp_path / "tok"
    chatml_tokenizer.save_pretrained(folder)
    cfg = make_cfg(folder, tmp_path / "x.jsonl", tmp_path)
    spec = load_tokenizer_spec(cfg)
    assert spec == TokenizerSpec.from_hf(load_tokenizer(cfg))
    (entry,) = (tmp_path / "cache" / "tokenizers").glob("*.json")
    code = (
        "import sys; from raysft.pipeline.config import load_config; "
        "from raysft.pipeline.data.spec_cache import load_tokenizer_spec; "
        f"s = load_tokenizer_spec(load_config(None, {cfg_overrides(cfg)!r})); "
        "print(s.fingerprint(), 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [spec.fingerprint(), "False"]
    entry.write_text("{not json")
    assert load_tokenizer_spec(cfg) == spec and TokenizerSpec.from_json(entry.read_text()) == spec
    cfg_file = folder / "tokenizer_config.json"
    cfg_file.write_text(cfg_file.read_text())  # same content, new mtime: a new entry
    load_tokenizer_spec(cfg)
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 2
    plain = chatml_tokenizer.__class__(tokenizer_object=chatml_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    plain.save_pretrained(tmp_path / "plain")
    plain_cfg = make_cfg(tmp_path / "plain", tmp_path / "x.jsonl", tmp_path)
    assert load_tokenizer_spec(plain_cfg.with_overrides({"data.format": "text"})).chat_template is None
    with pytest.raises(ModelError, match="has no chat template"):
        load_tokenizer_spec(plain_cfg)  # answered from the cached spec, with the same sentence


def cfg_overrides(cfg) -> dict:
    return {
        "model.name_or_path": cfg.model.name_or_path,
        "data.train": cfg.data.train,
        "data.cache_dir": cfg.data.cache_dir,
    }


def test_cache_is_reused_and_keyed_by_inputs(tok_dir, tmp_path):
    train = write_rows(tmp_path / "t.jsonl", 90)
    cfg = make_cfg(tok_dir, train, tmp_path)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(plan.ensure_prepared(cfg, use_ray=False))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.key for r in results}) == 1 and len({r.train_dir for r in results}) == 1
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "tokenizers"]
    assert len(entries) == 1 and not list((tmp_path / "cache").glob(".tmp-*"))
    stamp = (results[0].train_dir.parent / "stats.json").stat().st_mtime_ns
    again = plan.ensure_prepared(cfg, use_ray=False)
    assert again.key == results[0].key and (again.train_dir.parent / "stats.json").stat().st_mtime_ns == stamp
    assert again.eval_dir is None and plan.prepare(cfg, use_ray=False) == again.stats
    # A different data config, or a touched input file, is a different entry.
    assert plan.ensure_prepared(cfg.with_overrides({"data.max_seq_len": 256}), use_ray=False).key != again.key
    write_rows(train, 91)
    assert plan.ensure_prepared(cfg, use_ray=False).key != again.key


def entry_bytes(entry: Path) -> dict[str, bytes]:
    """Every shard and index of a prepared entry (stats.json holds the seconds it took: left out)."""
    return {
        str(p.relative_to(entry)): p.read_bytes()
        for p in sorted(entry.rglob("*"))
        if p.is_file() and p.name != "stats.json"
    }


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a data page: the size stays, one bit changes
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "is truncated or changed"),
        (Path.unlink, "is missing"),
        (flip_a_byte, "is changed (its bytes do not match the CRC-32 in"),
    ],
    ids=["truncated", "deleted", "byte-flipped"],
)
def test_damaged_cache_shard_is_rebuilt_as_a_fresh_prepare(tok_dir, tmp_path, capfd, damage, said):
    """The cache is derived data: a truncated, deleted or changed shard is found before it is used and the entry
    is rebuilt (one line said), with the same bytes a fresh prepare writes; a second caller then reuses it."""
    train = write_rows(tmp_path / "t.jsonl", 300)
    fresh = plan.ensure_prepared(make_cfg(tok_dir, train, tmp_path / "fresh", shard_mb=0.002), use_ray=False)
    cfg = make_cfg(tok_dir, train, tmp_path, shard_mb=0.002)
    entry = plan.ensure_prepared(cfg, use_ray=False).train_dir.parent
    want = entry_bytes(fresh.train_dir.parent)
    assert entry_bytes(entry) == want and len(list(entry.glob("train/shard-*.parquet"))) >= 3
    shard = entry / "train" / "shard-00001.parquet"
    damage(shard)
    capfd.readouterr()
    healed = plan.ensure_prepared(cfg, use_ray=False)
    notice = [line for line in capfd.readouterr().err.splitlines() if "cache entry" in line]
    assert len(notice) == 1 and said in notice[0], notice
    assert notice[0].startswith(f"raysft: the prepared-data cache entry {entry} is damaged (The prepared train shard "
                                f"{shard} "), notice  # fmt: skip
    assert notice[0].endswith("; rebuilding it.")
    assert healed.train_dir.parent == entry and entry_bytes(entry) == want
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # the damaged entry was set aside and removed
    plan.ensure_prepared(cfg, use_ray=False)
    assert "cache entry" not in capfd.readouterr().err  # whole again: reused, nothing said


def test_damaged_output_folder_names_the_remedy(tok_dir, tmp_path):
    """A user's own --output folder is not a cache: it is not rewritten behind the user's back; the sentence
    names the shard and the remedy, before any worker starts and in a worker's read."""
    from raysft.pipeline.data.shards import load_index, read_shard
    from raysft.pipeline.storage import StorageError

    out = tmp_path / "prepared"
    plan.prepare(make_cfg(tok_dir, write_rows(tmp_path / "t.jsonl", 300), tmp_path, shard_mb=0.002), out, False)
    shard = out / "train" / "shard-00001.parquet"
    remedy = f"; write it again with `raysft prepare CONFIG --output {out}`."
    flip_a_byte(shard)
    with pytest.raises(StorageError) as err:
        load_index(str(out / "train"), verify_bytes=True)
    assert str(err.value) == f"The prepared train shard {shard} is changed (its bytes do not match the CRC-32 in " + (
        f"{out / 'train' / '_index.json'}){remedy}"
    )
    with pytest.raises(StorageError, match=r"is truncated or corrupt \(.*\); write it again with `raysft prepare"):
        read_shard(load_index(str(out / "train")), 1)  # Parquet's page CRC: a worker never reads other tokens
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StorageError) as err:
        load_index(str(out / "train"))
    assert str(err.value).startswith(f"The prepared train shard {shard} is truncated or changed (100 bytes, ")
    assert str(err.value).endswith(remedy)


@pytest.mark.ray
def test_ray_plan_equals_pure_functions_and_cli(ray_session, tok_dir, tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    write_rows(data / "a.jsonl", 200, bad={10: "{broken"})
    write_rows(data / "b.jsonl", 150)
    cfg = make_cfg(tok_dir, data, tmp_path, eval_split=0.1, pack_window=100000)
    local = plan.prepare(cfg, tmp_path / "local", use_ray=False)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(cfg.dump_yaml())
    assert cli.main(["prepare", str(config_file), "--output", str(tmp_path / "ray"), "--preview", "2"]) == 0
    captured = capfd.readouterr()
    stats_text, _, shown = captured.out.partition("\n--- sample")
    printed = json.loads(stats_text)
    # --preview: two samples with [[trained]] text (not a terminal), and preview.html next to stats.json.
    assert shown.count("--- sample") == 1 and "[[" in shown and "<|im_end|>]]" in shown
    assert (tmp_path / "ray" / "preview.html").read_text().count("<h3>") == 2
    assert f"{data} (weight 1): {printed['rows_read']} rows read, {printed['rows_used']} kept" in captured.err
    strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert strip(printed) == strip(local)
    for split in ("train", "eval"):
        assert read_split(tmp_path / "ray" / split).equals(read_split(tmp_path / "local" / split))
    ids = [s for r in read_split(tmp_path / "ray" / "train").column("source_ids").to_pylist() for s in r]
    assert max(ids) >= 1 << 40  # the second file's ids carry its file index

    # Several packing windows: the same samples and accounting, windows cut where Ray batches fall.
    small = cfg.with_overrides({"data.pack_window": 64})
    ray_stats = plan.prepare(small, tmp_path / "ray_small")
    local_stats = plan.prepare(small, tmp_path / "local_small", use_ray=False)
    for key in ("rows_read", "rows_used", "rows_dropped", "tokens_total", "tokens_trainable", "eval"):
        assert ray_stats[key] == local_stats[key]

    def samples(directory: Path) -> dict[int, list[int]]:
        out = {}
        for row in read_split(directory).to_pylist():
            start = 0
            for n, sid in zip(row["seq_lengths"], row["source_ids"]):
                out[sid] = row["input_ids"][start : start + n]
                start += n
        return out

    assert samples(tmp_path / "ray_small" / "train") == samples(tmp_path / "local_small" / "train")


def test_cli_bad_input_exits_2_with_one_sentence(tok_dir, tmp_path):
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(f"model: {{name_or_path: {tok_dir}}}\ndata: {{train: {tmp_path / 'missing.jsonl'}}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "raysft.pipeline.cli", "prepare", str(config_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines == [f"raysft: error: The data path {tmp_path / 'missing.jsonl'} does not exist."]
