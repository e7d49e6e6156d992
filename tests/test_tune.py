"""Sweeps: search-space checks, resource sizing, the results table and plots, and real Ray Tune sweeps
of the tiny model (grid with concurrent trials; ASHA with a deliberately bad learning rate, interrupted
after two finished trials and resumed)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysft.pipeline.config import load_config
from raysft.pipeline.errors import ClusterError, ConfigError
from raysft.pipeline.tune_report import (
    COMPLETED, EARLY_STOPPED, BestTrial, TrialRecord, pick_best, plot_curves, plot_loss_vs_lr, summary_line,
    table_row, write_csv,
)
from raysft.pipeline.tune_space import REPORTED_METRICS, plan_sweep, trial_overrides

EVAL = {"data.train": "train.jsonl", "data.eval_split": 0.2}


def cfg_with(space, **tune):
    overrides = {**EVAL, "tune.search_space": space, **{f"tune.{k}": v for k, v in tune.items()}}
    return load_config(overrides=overrides)


# --- search space -------------------------------------------------------------------------------

def test_search_space_kinds_become_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    plan = plan_sweep(cfg_with({
        "lora.r": {"choice": [8, 16]}, "train.lr": {"loguniform": [1e-5, 1e-3]},
        "lora.dropout": {"uniform": [0.0, 0.1]}, "train.warmup_steps": [0, 2, 4], "train.weight_decay": 0.01,
        "train.grad_accum": {"loguniform": [1, 8]},
    }, num_samples=2))
    space = plan.param_space()
    assert isinstance(space["lora.r"], Categorical) and space["lora.r"].categories == [8, 16]
    assert isinstance(space["train.lr"], Float) and (space["train.lr"].lower, space["train.lr"].upper) == (1e-5, 1e-3)
    assert isinstance(space["lora.dropout"], Float)
    assert space["train.warmup_steps"] == {"grid_search": [0, 2, 4]}
    assert space["train.weight_decay"] == 0.01
    assert isinstance(space["train.grad_accum"], Integer)  # an int field draws whole numbers
    assert plan.num_trials == 3 * 2  # the grid, repeated num_samples times


def test_alpha_rule_derives_alpha_from_the_sampled_rank():
    cfg = cfg_with({"lora.r": [4, 8]}, alpha_rule="2r")
    plan = plan_sweep(cfg)
    assert trial_overrides(plan, {"lora.r": 8}, cfg) == {"lora.r": 8, "lora.alpha": 16.0}
    cfg = cfg_with({"train.lr": [1e-4]}, alpha_rule="r")
    assert trial_overrides(plan_sweep(cfg), {"train.lr": 1e-4}, cfg)["lora.alpha"] == cfg.lora.r


def test_grid_search_alg_enumerates_choices_and_refuses_ranges():
    plan = plan_sweep(cfg_with({"lora.r": {"choice": [4, 8]}, "train.lr": [1e-4, 1e-3]}, search_alg="grid"))
    assert plan.num_trials == 4
    with pytest.raises(ConfigError, match="tune.search_space.train.lr .*loguniform range.*search_alg grid"):
        plan_sweep(cfg_with({"train.lr": {"loguniform": [1e-5, 1e-3]}}, search_alg="grid"))


def test_data_fields_are_prepared_per_value_and_must_be_finite():
    plan = plan_sweep(cfg_with({"data.max_seq_len": [64, 128], "lora.r": [4, 8], "data.num_tokenizer_actors": [1, 2]}))
    assert plan.data_variants() == [{"data.max_seq_len": 64}, {"data.max_seq_len": 128}]
    with pytest.raises(ConfigError, match="changes the prepared data"):
        plan_sweep(cfg_with({"data.max_seq_len": {"uniform": [64, 128]}}))


@pytest.mark.parametrize("space, tune, message", [
    ({"lora.rank": [4, 8]}, {}, r"tune.search_space.lora.rank is not a config field"),
    ({"lora.r": {"choice": []}}, {}, r"tune.search_space.lora.r has an empty choice list"),
    ({"lora.r": []}, {}, r"tune.search_space.lora.r is an empty list"),
    ({}, {}, r"tune.search_space is empty"),
    ({"train.lr": [1e-4]}, {"metric": "accuracy"}, r"tune.metric 'accuracy' is never reported by the training"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, {}, r"must be \{loguniform: \[lo, hi\]\} with numbers 0 < lo < hi"),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, {}, r"lo < hi"),
    ({"train.lr": {"normal": [0, 1]}}, {}, r"must be a list \(grid\), \{choice"),
    ({"lora.r": [8, 0]}, {}, r"tune.search_space.lora.r has value 0 that the field rejects"),
    ({"lora": [1]}, {}, r"is a config section, not a field"),
    ({"scaling.num_workers": [1, 2]}, {}, r"cannot be searched"),
    ({"lora.r": [4, 8]}, {"search_alg": "optuna"}, r"grid \(plain list\), which search_alg optuna cannot take"),
    ({"lora.r": [4], "lora.alpha": [8]}, {"alpha_rule": "2r"}, r"lora.alpha cannot also be in tune.search_space"),
    ({"lora.r": {"loguniform": [2.5, 8]}}, {}, r"integer field"),
])
def test_bad_search_spaces_are_one_sentence(space, tune, message):
    with pytest.raises(ConfigError, match=message) as err:
        plan_sweep(cfg_with(space, **tune))
    assert not re.search(r"\. [A-Z]", str(err.value)) and str(err.value).endswith(".")  # one sentence


def test_eval_metric_needs_eval_data():
    cfg = load_config(overrides={"data.train": "x.jsonl", "tune.search_space": {"train.lr": [1e-4]}})
    with pytest.raises(ConfigError, match="never reported without eval data; set data.eval or data.eval_split"):
        plan_sweep(cfg)
    plan_sweep(cfg.with_overrides({"tune.metric": "loss"}))  # a per-step metric needs none


def test_bad_input_fails_before_anything_starts(tmp_path):
    """Through the real entry point: the error comes before Ray, data preparation or any sweep folder."""
    from raysft.pipeline import tune

    base = load_config(overrides={**EVAL, "run.storage_path": str(tmp_path), "run.name": "bad"})
    for space, extra in [({"lora.rnk": [4]}, {}), ({"lora.r": {"choice": []}}, {}), ({"train.lr": [1e-4]}, {"tune.metric": "bleu"})]:
        with pytest.raises(ConfigError):
            tune(base.with_overrides({"tune.search_space": space, **extra}))
    assert not (tmp_path / "bad").exists()
    (tmp_path / "sweep.yaml").write_text("data: {train: x.jsonl}\n")
    cli = subprocess.run(
        [sys.executable, "-m", "raysft.pipeline.cli", "tune", str(tmp_path / "sweep.yaml"),
         "--set", "tune.search_space.lora.r={choice: []}", "--set", f"run.storage_path={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == [
        f"raysft: error: tune.search_space.lora.r in {tmp_path / 'sweep.yaml'} has an empty choice list; give at least one value."]


# --- resources ------------------------------------------------------------------------------------

def test_concurrency_never_oversubscribes_the_cluster():
    from raysft.pipeline.tune import max_concurrent_trials

    cpu = load_config(overrides={"scaling.num_workers": 1})
    assert max_concurrent_trials(cpu, {"CPU": 4}) == 2  # 1 driver + 1 worker each
    assert max_concurrent_trials(cpu.with_overrides({"scaling.num_workers": 2}), {"CPU": 4}) == 1
    assert max_concurrent_trials(cpu.with_overrides({"tune.max_concurrent_trials": 1}), {"CPU": 8}) == 1
    assert max_concurrent_trials(cpu.with_overrides({"tune.max_concurrent_trials": 9}), {"CPU": 8}) == 4
    gpu = load_config(overrides={"scaling.num_workers": 2, "scaling.use_gpu": True})
    assert max_concurrent_trials(gpu, {"CPU": 64, "GPU": 8}) == 4  # GPUs bound it
    assert max_concurrent_trials(gpu, {"CPU": 7, "GPU": 8}) == 2  # CPUs bound it (3 per trial)
    with pytest.raises(ClusterError, match="One trial needs 3 CPUs and 2 GPUs .* the cluster has 8 CPUs and 1 GPUs"):
        max_concurrent_trials(gpu, {"CPU": 8, "GPU": 1})


# --- table, best trial, plots ---------------------------------------------------------------------

def _record(trial_id, r, lr, evals, reason=COMPLETED):
    history = [{"step": s, "loss": 3.0, "trained_tokens": 100 * s, **({"eval_loss": e} if e is not None else {})}
               for s, e in enumerate(evals, start=1)]
    return TrialRecord(trial_id, {"lora.r": r, "train.lr": lr}, history, 12.5, reason, adapter=f"/a/{trial_id}")


def test_table_best_trial_plots_and_summary(tmp_path):
    records = [
        _record("t0", 4, 1e-3, [3.0, None, 2.5]),
        _record("t1", 4, 1e-1, [9.0, 12.0], EARLY_STOPPED),
        _record("t2", 8, 1e-3, [2.9, None, 2.6]),
        _record("t3", 8, 1e-1, [float("nan")], "error: boom"),
    ]
    table = [table_row(r, "eval_loss", "min") for r in records]
    assert table[0] == {"trial_id": "t0", "lora.r": 4, "train.lr": 1e-3, "final_eval_loss": 2.5, "best_eval_loss": 2.5,
                        "trained_tokens": 300, "steps": 3, "wall_time_s": 12.5, "stop_reason": COMPLETED, "adapter": "/a/t0"}
    assert (table[2]["final_eval_loss"], table[2]["best_eval_loss"]) == (2.6, 2.6)
    assert table[1]["best_eval_loss"] == 9.0 and table[1]["final_eval_loss"] == 12.0
    assert math.isnan(table[3]["final_eval_loss"])
    assert pick_best(table, "eval_loss", "min")["trial_id"] == "t0"  # stopped and failed trials never win
    assert pick_best(table, "eval_loss", "max")["trial_id"] == "t2"

    write_csv(table, tmp_path / "results.csv")
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0].startswith("trial_id,lora.r,train.lr,final_eval_loss,best_eval_loss,trained_tokens")
    assert len(lines) == 5
    plot_loss_vs_lr(table, tmp_path / "lr.png")
    plot_curves(records, tmp_path / "curves.png", ["lora.r", "train.lr"])
    for png in ("lr.png", "curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best = BestTrial("t0", {}, table[0], "/s/best_adapter")
    line = summary_line(table, best, "eval_loss", "/s")
    assert line.startswith("Sweep of 4 trials (2 completed, 1 early-stopped by ASHA, 1 error): best t0 (lora.r=4, train.lr=0.001) eval_loss=2.5000")
    assert "no trial completed" in summary_line(table[1:2], None, "eval_loss", "/s")


def test_metric_names_match_what_the_training_reports():
    """tune.metric is checked against REPORTED_METRICS; keep it in step with the training loop's report."""
    loop = Path(__file__).resolve().parents[1] / "pipeline" / "train" / "loop.py"
    source = loop.read_text()
    for name in REPORTED_METRICS:
        assert f'"{name}"' in source, f"the training loop no longer reports {name}"
