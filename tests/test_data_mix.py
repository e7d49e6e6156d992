"""The data plan with real tokenizers: the run-time mask self-check, weighted mixing of sources,
the chat template file, the per-source summary and the mask preview (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raysft.pipeline.config import load_config
from raysft.pipeline.data import masks, plan, preview
from raysft.pipeline.data.sources import split_source_id
from raysft.pipeline.errors import ConfigError

LLAMA = "llama-3.1-instruct"


def gsm8k_rows(shared_data: Path, n: int) -> list[dict]:
    with open(shared_data / "gsm8k" / "train.jsonl") as f:
        return [json.loads(next(f)) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, tokenizer: Path, train, **data):
    over = {
        "model.name_or_path": str(tokenizer),
        "data.train": train,
        "data.cache_dir": str(tmp_path / "cache"),
        "data.max_seq_len": 1024,
    }
    over.update({f"data.{k}": v for k, v in data.items()})
    return load_config(None, over)


def test_self_check_drops_and_counts_every_row_a_broken_mask_routine_breaks(
    shared_tokenizers, shared_data, tmp_path, monkeypatch
):
    rows = gsm8k_rows(shared_data, 300)
    train = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    cfg = config(tmp_path, shared_tokenizers / LLAMA, str(train), max_bad_fraction=1.0)
    clean = plan.prepare(cfg, tmp_path / "clean", use_ray=False)
    assert clean["rows_used"] == 300 and "mask_check_failed" not in clean["rows_dropped"]
    real = masks.trained_ranges

    def broken(ids, turns, *args):  # skips the first content token of answers whose result starts with 1
        return [
            (lo + 1 if "#### 1" in t.pieces[0] else lo, hi, close)
            for t, (lo, hi, close) in zip(turns, real(ids, turns, *args))
        ]

    monkeypatch.setattr(masks, "trained_ranges", broken)
    stats = plan.prepare(cfg, tmp_path / "broken", use_ray=False)
    affected = sum("#### 1" in r["answer"] for r in rows)
    assert 10 < affected < 300
    assert stats["rows_dropped"] == {"mask_check_failed": affected} and stats["rows_used"] == 300 - affected
    kept = {s for r in pq.read_table(tmp_path / "broken" / "train").column("source_ids").to_pylist() for s in r}
    assert kept == {i for i, r in enumerate(rows) if "#### 1" not in r["answer"]}


def test_weighted_sources_give_the_expected_epoch_and_per_source_stats(shared_tokenizers, shared_data, tmp_path):
    # Source 0: sharegpt (weight 1). Source 1: gsm8k with its own field names (weight 3, then 2.5).
    gsm = write_jsonl(
        tmp_path / "gsm8k_renamed.jsonl",
        [{"q": r["question"], "a": r["answer"]} for r in gsm8k_rows(shared_data, 2000)],
    )
    sources = [
        {"path": str(shared_data / "sharegpt" / "dummy_conversation.json"), "format": "sharegpt", "weight": 1},
        {"path": str(gsm), "format": "prompt_completion", "weight": 3, "columns": {"prompt": "q", "completion": "a"}},
    ]
    n_share = len(json.loads(Path(sources[0]["path"]).read_text()))
    for weight, tolerance in ((3, 0.0), (2.5, 0.01)):
        sources[1]["weight"] = weight
        out = tmp_path / f"mix_{weight}"
        stats = plan.prepare(config(tmp_path, shared_tokenizers / LLAMA, sources), out, use_ray=False)
        counts = [0, 0]
        ids = [sid for row in pq.read_table(out / "train").column("source_ids").to_pylist() for sid in row]
        assert len(ids) == len(set(ids))  # repeats have ids of their own: none repeats within the epoch
        for sid in ids:
            counts[split_source_id(sid)[0]] += 1
        share, gsm_stats = stats["per_source"]
        assert [share["source"], gsm_stats["source"]] == [sources[0]["path"], str(gsm)]
        assert gsm_stats["rows_read"] == 2000 and gsm_stats["rows_used"] == 2000 and share["rows_read"] == n_share
        assert counts[0] == share["rows_used"] == share["samples"]  # weight 1: each kept row once
        assert abs(counts[1] - weight * gsm_stats["rows_used"]) <= tolerance * weight * gsm_stats["rows_used"]
        assert gsm_stats["samples"] == counts[1] and stats["samples_repeated"] == counts[1] - 2000
        assert stats["rows_used"] == share["rows_used"] + 2000  # rows count once, repeats apart
        assert sum(s["tokens"] for s in stats["per_source"]) == stats["tokens_total"]
        assert sum(s["tokens_trainable"] for s in stats["per_source"]) == stats["tokens_trainable"]
        assert 0 < gsm_stats["trained_share"] < 1
        text = plan.summary(stats)
        assert f"{gsm} (weight {weight:g}): 2000 rows read, 2000 kept, dropped: none" in text
        assert f"{sources[0]['path']} (weight 1): {n_share} rows read" in text


def test_fractional_weight_below_one_counts_unsampled_rows(shared_tokenizers, shared_data, tmp_path):
    gsm = write_jsonl(tmp_path / "g.jsonl", gsm8k_rows(shared_data, 400))
    stats = plan.prepare(
        config(tmp_path, shared_tokenizers / LLAMA, [{"path": str(gsm), "weight": 0.5}]), tmp_path / "o", use_ray=False
    )
    (src,) = stats["per_source"]
    assert src["rows_read"] == 400 and src["rows_used"] + src["rows_dropped"]["not_sampled"] == 400
    assert 150 < src["rows_used"] < 250 and stats["rows_dropped"] == {"not_sampled": 400 - src["rows_used"]}


def test_chat_template_file_replaces_the_tokenizers_own(shared_tokenizers, shared_data, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
        "m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )
    train = write_jsonl(tmp_path / "g.jsonl", gsm8k_rows(shared_data, 20))
    cfg = config(tmp_path, shared_tokenizers / LLAMA, str(train), chat_template=str(template), packing="none")
    plan.prepare(cfg, tmp_path / "o", use_ray=False)
    spec = plan.resolve_inputs(cfg).tokenizer
    first = pq.read_table(tmp_path / "o" / "train").to_pylist()[0]
    text = spec.backend().decode(first["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|start_header_id|>user<|end_header_id|>\n\n") and "Cutting Knowledge" not in text
    (template.parent / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match=r"bad.jinja \(data.chat_template\) is not a valid Jinja template"):
        plan.resolve_inputs(cfg.with_overrides({"data.chat_template": str(template.parent / "bad.jinja")}))


def test_preview_marks_trained_tokens_in_terminal_and_html(shared_tokenizers, shared_data, tmp_path):
    rows = gsm8k_rows(shared_data, 30)
    train = write_jsonl(tmp_path / "g.jsonl", rows)
    cfg = config(tmp_path, shared_tokenizers / LLAMA, str(train), packing="none")
    out = tmp_path / "o"
    plan.prepare(cfg, out, use_ray=False)
    spec = plan.resolve_inputs(cfg).tokenizer
    plain = preview.preview(out, spec, 3, colour=False)
    assert plain.count("--- sample") == 3
    for r in rows[:3]:  # packing=none keeps file order: the first samples are the first rows
        assert f"[[{r['answer'].strip()}<|eot_id|>]]" in plain
        assert f"[[{r['question']}" not in plain and r["question"].strip() in plain
    coloured = preview.preview(out, spec, 3, colour=True)
    assert f"\x1b[1;32m{rows[0]['answer'].strip()}<|eot_id|>\x1b[0m" in coloured and "[[" not in coloured
    page = (out / "preview.html").read_text()
    assert page.count("<mark>") == 3 and page.startswith("<!doctype html>")
    assert "<mark>" + rows[0]["answer"].strip().replace("<", "&lt;").replace(">", "&gt;") in page
