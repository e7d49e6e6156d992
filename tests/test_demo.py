"""The demo: its task generator and checker, its report, its config, and the whole flow on a tiny model."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from audit import report_of

from raysft.pipeline.demo import task as demo_task
from raysft.pipeline.demo.report import write_report
from raysft.pipeline.demo.run import DEMO_CONFIG, demo_config, eval_config
from raysft.pipeline.plots import loss_series


def test_task_is_seeded_disjoint_and_checkable(tmp_path):
    a = demo_task.write_task(tmp_path / "a", n_train=200, n_eval=30, seed=3)
    b = demo_task.write_task(tmp_path / "b", n_train=200, n_eval=30, seed=3)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]  # same seed, same bytes
    c = demo_task.write_task(tmp_path / "c", n_train=200, n_eval=30, seed=4)
    assert a[0].read_bytes() != c[0].read_bytes()
    train = [json.loads(x) for x in a[0].read_text().splitlines()]
    evals = [json.loads(x) for x in a[1].read_text().splitlines()]
    assert len(train) == 200 and len(evals) == 30
    dates = lambda rows: {r["messages"][-1]["content"] for r in rows}  # noqa: E731
    assert not dates(train) & dates(evals)  # no held-out date is ever trained on
    assert len({r["messages"][0]["content"].split()[0] for r in train}) == len(demo_task.PROMPTS)  # all phrasings used
    for row in train + evals:
        user, assistant = row["messages"][0]["content"], row["messages"][1]["content"]
        iso = next(w for w in user.split() if w.count("-") == 2)
        y, m, d = (int(x) for x in iso.split("-"))
        assert assistant == f"{d} {demo_task.MONTHS[m - 1]} {y}"


def test_checker_is_exact():
    assert demo_task.is_correct(" 4 August 2001\n", "4 August 2001")
    assert demo_task.is_correct("4 August 2001.", "4 August 2001")
    assert not demo_task.is_correct("04 August 2001", "4 August 2001")
    assert not demo_task.is_correct("4 august 2001", "4 August 2001")
    assert not demo_task.is_correct("2001-08-04", "4 August 2001")
    assert not demo_task.is_correct("The date is 4 August 2001", "4 August 2001")
    prompt, answer = demo_task.make_example(random.Random(0))
    assert "2038-04-01" in prompt and answer == "1 April 2038"


def test_report_and_loss_curve_are_written(tmp_path):
    metrics = [{"step": s, "loss": 3.0 / s, "tokens_per_s": 150.0, "trained_tokens": 100 * s} for s in range(1, 11)]
    metrics[4]["eval_loss"] = 1.2
    metrics[9]["eval_loss"] = 0.6
    train, evals = loss_series(metrics)
    assert len(train) == 10 and evals == [(5, 1.2), (10, 0.6)]

    def side(loss, acc):
        return {
            "eval_loss": loss,
            "eval_tokens": 90,
            "accuracy": acc,
            "correct": int(acc * 8),
            "total": 8,
            "seconds": 1.0,
            "samples": [{"prompt": "p", "reply": "r", "answer": "a"}],
        }

    report = {
        "model": "m",
        "task": "t",
        "n_train": 10,
        "steps": 10,
        "workers": 2,
        "zero_stage": 2,
        "train_seconds": 5.0,
        "tokens_per_s": 150.0,
        "before": side(2.5, 0.0),
        "after": side(0.5, 0.75),
        "run_dir": "r",
        "adapter_path": "a",
        "wall_seconds": 9.0,
    }
    paths = write_report(tmp_path, report, metrics)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    saved = report_of(tmp_path)
    assert saved["after"]["accuracy"] == 0.75 and saved["loss_curve"] == "loss_curve.png"
    md = paths["md"].read_text()
    assert "2.5000 | 0.5000" in md and "75.0%" in md and "loss_curve.png" in md


def test_demo_config_is_examples_demo_yaml_with_paths_filled_in(tmp_path):
    cfg = demo_config("/models/x", tmp_path / "data", tmp_path, "run-1", ["train.lr=1e-4"])
    assert cfg.source == str(DEMO_CONFIG)
    assert cfg.model.name_or_path == "/models/x" and cfg.model.quantization == "nf4"
    assert cfg.data.train == str(tmp_path / "data" / "train.jsonl")
    assert cfg.run.storage_path == str(tmp_path) and cfg.run.name == "run-1"
    assert cfg.scaling.num_workers == 2 and cfg.train.deepspeed.stage == 2 and not cfg.scaling.use_gpu
    assert cfg.train.lr == 1e-4
    ev = eval_config(cfg)
    assert ev.model.quantization == "none" and ev.model.dtype == "float32"


@pytest.fixture(scope="module")
def demo_cli(tiny_model_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`raysft demo` as a user runs it (not a terminal: plain lines), once for the tests below: 6 steps of
    2-worker ZeRO-2 QLoRA on the tiny model, on its own local Ray instance."""
    out_dir = tmp_path_factory.mktemp("demo") / "demo"
    sets = [
        f"model.name_or_path={tiny_model_dir}",
        "train.max_steps=6",
        "train.eval_every=3",
        "train.lr=1e-2",
        "data.max_seq_len=256",
        "train.logging.tensorboard=false",
        "demo.n_train=120",
        "demo.n_eval=12",
    ]
    cmd = [sys.executable, "-m", "raysft.pipeline.cli", "demo", "--output", str(out_dir)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_DEDUP_LOGS": "1"})
    (out_dir.parent / "console.txt").write_text(proc.stdout + proc.stderr)  # what the user saw, kept for inspection
    return proc, out_dir


@pytest.mark.ray
@pytest.mark.slow
def test_demo_end_to_end_on_tiny_model(demo_cli):
    """The whole demo flow (data, before eval, 2-worker ZeRO-2 QLoRA on Ray, after eval, report) on the tiny model."""
    proc, out_dir = demo_cli
    out = proc.stdout
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = report_of(out_dir)
    assert report["after"]["eval_loss"] < report["before"]["eval_loss"]
    assert report["steps"] == 6 and report["workers"] == 2 and report["zero_stage"] == 2
    assert report["before"]["total"] == 12 and 0.0 <= report["after"]["accuracy"] <= 1.0
    for name in ("report.json", "report.md", "loss_curve.png"):
        assert (out_dir / name).is_file()
    assert Path(report["adapter_path"], "adapter_model.safetensors").is_file()
    assert Path(report["exports"]["merged"], "config.json").is_file() and Path(report["exports"]["gguf"]).is_file()
    assert report["exports"]["gguf"] in out and report["exports"]["merged"] in out  # printed where they are
    metrics = [json.loads(x) for x in Path(report["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics)
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5", "eval loss"):
        assert stage in out  # progress is shown


@pytest.mark.ray
@pytest.mark.slow
def test_demo_cli_console_is_short_with_progress_and_eta_and_the_full_log_in_the_run_folder(demo_cli):
    """`raysft demo` as a user runs it (not a terminal: plain lines): at most 60 lines, one progress line per
    step with an ETA, none of Ray's chatter; everything else complete in the run folder's raysft.log."""
    import re

    proc, out_dir = demo_cli
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = out.splitlines()
    assert len(lines) <= 60, out
    for step in range(1, 7):
        assert any(re.search(rf"step {step}/6 .*ETA \d\d:\d\d", x) for x in lines), (step, out)
    assert any("eval_loss" in x and "step 6/6" in x for x in lines)
    assert any(x.strip().startswith("checkpoint saved: step 6") for x in lines)
    for chatter in ("Reporting training result", "core_worker", "INFO", "[raysft] step"):
        assert chatter not in out, chatter
    report = report_of(out_dir)
    log = Path(report["run_dir"], "raysft.log")
    assert str(log) in out
    text = log.read_text()
    assert "[raysft] step 6/6" in text  # rank 0's own lines, forwarded from the worker
    assert "INFO" in text  # Ray's chatter, kept in the log
