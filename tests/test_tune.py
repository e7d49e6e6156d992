"""Sweeps: search-space checks, resource sizing, the results table and plots, and real Ray Tune sweeps
of the tiny model (the suite's grid sweep, tests/sweep_fixtures.py, shared with test_tracking and
test_generate_eval; ASHA with a deliberately bad learning rate, interrupted after two finished trials and
resumed)."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_fixtures import tiny_sweep_base

from raysft.pipeline.config import load_config
from raysft.pipeline.errors import ClusterError, ConfigError
from raysft.pipeline.sweep.report import (
    COMPLETED,
    EARLY_STOPPED,
    BestTrial,
    TrialRecord,
    pick_best,
    plot_curves,
    plot_loss_vs_lr,
    summary_line,
    table_row,
    write_csv,
)
from raysft.pipeline.sweep.space import REPORTED_METRICS, plan_sweep, trial_overrides

EVAL = {"data.train": "train.jsonl", "data.eval_split": 0.2}


def cfg_with(space, **tune):
    overrides = {**EVAL, "tune.search_space": space, **{f"tune.{k}": v for k, v in tune.items()}}
    return load_config(overrides=overrides)


# --- search space -------------------------------------------------------------------------------


def test_search_space_kinds_become_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    plan = plan_sweep(
        cfg_with(
            {
                "lora.r": {"choice": [8, 16]},
                "train.lr": {"loguniform": [1e-5, 1e-3]},
                "lora.dropout": {"uniform": [0.0, 0.1]},
                "train.warmup_steps": [0, 2, 4],
                "train.weight_decay": 0.01,
                "train.grad_accum": {"loguniform": [1, 8]},
            },
            num_samples=2,
        )
    )
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


@pytest.mark.parametrize(
    "space, tune, message",
    [
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
    ],
)
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
    for space, extra in [
        ({"lora.rnk": [4]}, {}),
        ({"lora.r": {"choice": []}}, {}),
        ({"train.lr": [1e-4]}, {"tune.metric": "bleu"}),
    ]:
        with pytest.raises(ConfigError):
            tune(base.with_overrides({"tune.search_space": space, **extra}))
    assert not (tmp_path / "bad").exists()
    (tmp_path / "sweep.yaml").write_text("data: {train: x.jsonl}\n")
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "raysft.pipeline.cli",
            "tune",
            str(tmp_path / "sweep.yaml"),
            "--set",
            "tune.search_space.lora.r={choice: []}",
            "--set",
            f"run.storage_path={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == [
        f"raysft: error: tune.search_space.lora.r in {tmp_path / 'sweep.yaml'} has an empty choice list; "
        "give at least one value."
    ]


# --- resources ------------------------------------------------------------------------------------


def test_concurrency_never_oversubscribes_the_cluster():
    from raysft.pipeline.sweep.run import max_concurrent_trials

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


def test_concurrency_counts_the_generation_eval_task():
    """With train.eval_generate on, each trial also holds its eval task's CPUs/GPUs (a Ray task beside its workers,
    outside the trial's placement group): the sweep runs fewer trials at once instead of starving the evals."""
    from raysft.pipeline.sweep.run import max_concurrent_trials

    cpu = load_config(overrides={"scaling.num_workers": 1})
    on = cpu.with_overrides({"train.eval_generate.prompts": "held_out.jsonl"})
    assert max_concurrent_trials(cpu, {"CPU": 6}) == 3  # 1 driver + 1 worker
    assert max_concurrent_trials(on, {"CPU": 6}) == 2  # + 1 eval CPU (train.eval_generate.num_cpus default)
    assert max_concurrent_trials(on.with_overrides({"train.eval_generate.num_cpus": 0.5}), {"CPU": 5}) == 2
    assert max_concurrent_trials(cpu.with_overrides({"train.eval_generate.num_cpus": 4}), {"CPU": 6}) == 3  # off
    gpu = on.with_overrides({"scaling.use_gpu": True, "train.eval_generate.num_gpus": 1})
    assert max_concurrent_trials(gpu, {"CPU": 64, "GPU": 8}) == 4  # 1 worker GPU + 1 eval GPU each
    with pytest.raises(ClusterError, match=r"One trial needs 3 CPUs .*plus the generation eval's 1 CPUs and 0 GPUs"):
        max_concurrent_trials(on, {"CPU": 2})
    assert max_concurrent_trials(cpu, {"CPU": 2}) == 1  # the same cluster fits the trial without the eval


def test_search_algorithms_carry_the_concurrency_limit_and_take_sparse_metrics():
    """Tune ignores TuneConfig.max_concurrent_trials for a given BasicVariantGenerator: the limit must sit
    on the searcher. Optuna must accept results without the eval metric (it arrives at eval intervals)."""
    from ray.tune.search import ConcurrencyLimiter

    from raysft.pipeline.sweep.run import SparseMetricOptuna, search_alg

    cfg = cfg_with({"train.lr": {"loguniform": [1e-5, 1e-3]}, "lora.r": {"choice": [4, 8]}})
    plan = plan_sweep(cfg)
    assert search_alg(cfg, plan, 3).max_concurrent == 3
    limited = search_alg(cfg.with_overrides({"tune.search_alg": "optuna"}), plan, 2)
    assert isinstance(limited, ConcurrencyLimiter) and limited.max_concurrent == 2

    optuna = SparseMetricOptuna(space=plan.param_space(), metric="eval_loss", mode="min", seed=0)
    suggested = optuna.suggest("t1")
    assert set(suggested) == {"train.lr", "lora.r"} and 1e-5 <= suggested["train.lr"] <= 1e-3
    optuna.on_trial_result("t1", {"step": 1, "loss": 3.0})  # no eval_loss in this step's result
    optuna.on_trial_result("t1", {"step": 2, "loss": 2.9, "eval_loss": 2.5})
    optuna.on_trial_complete("t1", {"step": 3, "loss": 2.8})  # completes with the last eval_loss seen
    assert optuna._ot_study.trials[0].value == 2.5


def test_sweep_examples_plan_and_fit_their_clusters():
    """examples/sweep_*.yaml pass every sweep check; the demo runs one trial at a time on 2 cores and the
    multi-GPU sweep four 4-GPU trials on 2 nodes x 8 GPUs."""
    from raysft.pipeline.sweep.run import max_concurrent_trials

    examples = Path(__file__).resolve().parents[1] / "examples"
    demo = load_config(examples / "sweep_demo.yaml")
    assert plan_sweep(demo).num_trials == 4 and max_concurrent_trials(demo, {"CPU": 2}) == 1
    multi = load_config(examples / "sweep_multigpu.yaml")
    plan = plan_sweep(multi)
    assert plan.keys == ["lora.r", "train.lr", "lora.dropout"] and multi.tune.search_alg == "optuna"
    assert max_concurrent_trials(multi, {"CPU": 192, "GPU": 16}) == 4


def _asha(events: Path, steps: int):
    """The sweep's ASHA on eval_loss (min), rungs from step 2 halving, for trials of `steps` steps."""
    from raysft.pipeline.sweep.run import ASHA_MAX_T, SweepASHA

    return SweepASHA(
        str(events),
        lambda config: steps,
        metric="eval_loss",
        mode="min",
        time_attr="step",
        max_t=ASHA_MAX_T,
        grace_period=2,
        reduction_factor=2,
    )


def test_asha_stops_diverged_trials_but_never_a_trial_at_its_last_step(tmp_path):
    from types import SimpleNamespace

    events = tmp_path / "events.jsonl"
    asha = _asha(events, steps=4)
    t0, t1, t2 = (SimpleNamespace(trial_id=f"t{i}", config={}) for i in range(3))
    for t in (t0, t1, t2):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, t0, {"step": 1, "loss": 3.0}) == "CONTINUE"  # no metric: no decision
    assert asha.on_trial_result(None, t0, {"step": 2, "eval_loss": 1.0}) == "CONTINUE"
    assert asha.on_trial_result(None, t1, {"step": 2, "eval_loss": float("nan")}) == "STOP"  # stock ASHA: CONTINUE
    assert asha.on_trial_result(None, t0, {"step": 4, "eval_loss": 0.5}) == "CONTINUE"
    assert asha.on_trial_result(None, t2, {"step": 2, "eval_loss": 0.9}) == "CONTINUE"
    # Worse than t0 at the rung of step 4, but step 4 is its last: it finishes and keeps its adapter.
    assert asha.on_trial_result(None, t2, {"step": 4, "eval_loss": 2.0}) == "CONTINUE"
    stops = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(e["trial_id"], e["event"], e["step"]) for e in stops] == [("t1", "early_stopped", 2)]


def test_a_resumed_asha_judges_the_remaining_trials_against_the_finished_ones(tmp_path):
    """Tuner.restore brings back the scheduler as it was before any trial ran: SweepASHA rebuilds its rungs from
    what the restored trials reported (up to an early stop), so a diverged trial left to run is still stopped."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    events = tmp_path / "events.jsonl"
    reported = {
        "t0": [{"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 1.0}, {"step": 4, "eval_loss": 0.5}],
        # stopped at step 2; its step-4 result raced the stop and is not judged
        "t1": [{"step": 2, "eval_loss": float("nan")}, {"step": 4, "eval_loss": 0.1}],
    }
    for trial_id, results in reported.items():
        (tmp_path / trial_id).mkdir()
        (tmp_path / trial_id / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    events.write_text(json.dumps({"trial_id": "t1", "event": "early_stopped", "step": 2}) + "\n")

    def restored_asha(*trial_ids):
        asha = _asha(events, steps=8)
        fs = pafs.LocalFileSystem()
        trials = [
            SimpleNamespace(
                trial_id=t,
                config={},
                has_reported_at_least_once=t in reported,
                path=str(tmp_path / t),
                storage=SimpleNamespace(storage_filesystem=fs),
            )
            for t in trial_ids
        ]
        for t in trials:
            asha.on_trial_add(None, t)
        return asha, trials[-1]

    asha, t2 = restored_asha("t0", "t1", "t2")
    (step2,) = [recorded for milestone, recorded in asha._brackets[0]._rungs if milestone == 2]
    (step4,) = [recorded for milestone, recorded in asha._brackets[0]._rungs if milestone == 4]
    assert step2 == {"t0": -1.0, "t1": -1e30} and step4 == {"t0": -0.5}  # t1's raced step 4 is not there
    assert asha.on_trial_result(None, t2, {"step": 2, "eval_loss": float("nan")}) == "STOP"
    assert [json.loads(x)["trial_id"] for x in events.read_text().splitlines()] == ["t1", "t2"]  # none replayed
    asha, t2 = restored_asha("t0", "t2")
    assert asha.on_trial_result(None, t2, {"step": 2, "eval_loss": 0.9}) == "CONTINUE"  # better than t0
    # What resuming did before: the first trial at an empty rung passes it, diverged or not.
    asha, t2 = restored_asha("t2")
    assert asha.on_trial_result(None, t2, {"step": 2, "eval_loss": float("nan")}) == "CONTINUE"


def test_history_keeps_diverged_values_and_the_last_report_of_a_repeated_step(tmp_path):
    """A resumed trial re-reports steps after its checkpoint; a diverged one reports NaN (not a missing value)."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    from raysft.pipeline.sweep.run import _history

    lines = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0, "eval_loss": 2.5},
        {"step": 3, "loss": 9.0},
        {"step": 3, "loss": 1.5},
        {"step": 4, "loss": float("nan"), "eval_loss": float("nan")},
    ]
    (tmp_path / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    history = _history(SimpleNamespace(path=str(tmp_path), filesystem=pafs.LocalFileSystem()))
    assert [h["step"] for h in history] == [1, 2, 3, 4] and history[2]["loss"] == 1.5
    row = table_row(TrialRecord("t", {}, history, 1.0, COMPLETED), "eval_loss", "min")
    assert math.isnan(row["final_eval_loss"]) and row["best_eval_loss"] == 2.5


# --- table, best trial, plots ---------------------------------------------------------------------


def _record(trial_id, r, lr, evals, reason=COMPLETED):
    history = [
        {"step": s, "loss": 3.0, "trained_tokens": 100 * s, **({"eval_loss": e} if e is not None else {})}
        for s, e in enumerate(evals, start=1)
    ]
    return TrialRecord(trial_id, {"lora.r": r, "train.lr": lr}, history, 12.5, reason, adapter=f"/a/{trial_id}")


def test_table_best_trial_plots_and_summary(tmp_path):
    records = [
        _record("t0", 4, 1e-3, [3.0, None, 2.5]),
        _record("t1", 4, 1e-1, [9.0, 12.0], EARLY_STOPPED),
        _record("t2", 8, 1e-3, [2.9, None, 2.6]),
        _record("t3", 8, 1e-1, [float("nan")], "error: boom"),
    ]
    table = [table_row(r, "eval_loss", "min") for r in records]
    assert table[0] == {
        "trial_id": "t0",
        "lora.r": 4,
        "train.lr": 1e-3,
        "final_eval_loss": 2.5,
        "best_eval_loss": 2.5,
        "trained_tokens": 300,
        "steps": 3,
        "wall_time_s": 12.5,
        "stop_reason": COMPLETED,
        "adapter": "/a/t0",
    }
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
    assert line.startswith(
        "Sweep of 4 trials (2 completed, 1 early-stopped by ASHA, 1 error): "
        "best t0 (lora.r=4, train.lr=0.001) eval_loss=2.5000"
    )
    assert "no trial completed" in summary_line(table[1:2], None, "eval_loss", "/s")


# --- real sweeps on the tiny model ------------------------------------------------------------------

GOOD_LR, BAD_LR = 0.01, 1.0e30  # BAD_LR makes the loss NaN at the first step: ASHA must stop it


@pytest.fixture(scope="module")
def sweep_base(tmp_path_factory, tiny_model_dir) -> dict:
    """Config (as a dict) for 4-step trials of the tiny model on 1 worker, sharing one data cache."""
    return tiny_sweep_base(tmp_path_factory.mktemp("sweep"), tiny_model_dir)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train_reports(run_dir: Path) -> list[dict]:
    """The lines of metrics.jsonl that the training reported (not the generation eval's gen_ lines)."""
    return [m for m in _metrics(run_dir) if not any(k.startswith("gen_") for k in m)]


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_folder_mistakes_are_caught_before_ray(sweep_base, tmp_path):
    from raysft.pipeline import tune

    cfg = load_config(
        overrides={
            **_flat(sweep_base),
            "run.storage_path": str(tmp_path),
            "run.name": "s",
            "tune.search_space": {"train.lr": [1e-3]},
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"There is no sweep to resume in .*/s \(run.storage_path/run.name\); start it without --resume\.",
    ):
        tune(cfg, resume=True)
    (tmp_path / "s" / "tune").mkdir(parents=True)
    with pytest.raises(
        ConfigError, match=r"already holds a sweep; continue it with --resume or choose another run.name\."
    ):
        tune(cfg)


@pytest.mark.ray
@pytest.mark.slow
def test_grid_of_ranks_and_learning_rates(shared_sweep, tiny_model_dir):
    """The suite's grid sweep (sweep_fixtures: 2 ranks x 2 learning rates, alpha_rule 2r, judged by a generation
    metric, mode max): its table, plots, best adapter and best config; trials never exceed the cluster."""
    import yaml
    from peft import PeftModel
    from sweep_fixtures import LRS, METRIC, NAME, RANKS
    from transformers import AutoModelForCausalLM

    from raysft.pipeline.sweep.run import max_concurrent_trials

    sweep = shared_sweep.result
    sweep_dir = shared_sweep.sweep_dir

    rows = _csv(sweep_dir / "results.csv")
    assert len(rows) == 4 and [r["trial_id"] for r in rows] == [r["trial_id"] for r in sweep.table]
    assert sorted((int(r["lora.r"]), float(r["train.lr"])) for r in rows) == sorted(
        (r, lr) for r in RANKS for lr in LRS
    )
    for row in rows:
        run_dir = sweep_dir / "trials" / row["trial_id"]
        trained = yaml.safe_load((run_dir / "config.yaml").read_text())  # what the trial really trained with
        assert (trained["lora"]["r"], trained["train"]["lr"]) == (int(row["lora.r"]), float(row["train.lr"]))
        assert trained["lora"]["alpha"] == float(row["lora.alpha"]) == 2 * int(row["lora.r"])
        history = _train_reports(run_dir)
        evals = [m["eval_loss"] for m in history if "eval_loss" in m]
        assert len(evals) == 2 and float(row["final_eval_loss"]) == pytest.approx(evals[-1], rel=1e-9)
        assert float(row["best_eval_loss"]) == pytest.approx(min(evals), rel=1e-9)
        assert int(row["trained_tokens"]) == history[-1]["trained_tokens"] > 0
        assert (row["steps"], row["stop_reason"]) == ("4", COMPLETED) and float(row["wall_time_s"]) > 0

    # The best trial is the completed one with the best final tune.metric (here the highest generation score).
    best = max(rows, key=lambda r: float(r[f"final_{METRIC}"]))
    assert sweep.best.trial_id == best["trial_id"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sweep_dir / "best_adapter")
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha) == (int(best["lora.r"]), 2 * int(best["lora.r"]))
    best_cfg = load_config(sweep_dir / "best_config.yaml")
    assert (best_cfg.lora.r, best_cfg.train.lr) == (int(best["lora.r"]), float(best["train.lr"]))
    assert (best_cfg.lora.alpha, best_cfg.run.name, best_cfg.tune.search_space) == (
        2 * best_cfg.lora.r,
        f"{NAME}-best",
        {},
    )
    for png in ("loss_vs_lr.png", "eval_curves.png"):
        assert (sweep_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert sweep.summary_line().startswith(f"Sweep of 4 trials (4 completed): best {best['trial_id']}")

    # Trial resources are accounted: Tune alone would start all 4 (each reserves 1 driver CPU of the 4), but a
    # trial holds 1 driver + 1 worker + 1 generation-eval CPU, so raysft runs one at a time (2 without the eval).
    sweep_cfg = load_config(sweep_dir / "sweep.yaml")
    assert max_concurrent_trials(sweep_cfg, {"CPU": 4}) == 1
    assert max_concurrent_trials(sweep_cfg.with_overrides({"train.eval_generate.prompts": None}), {"CPU": 4}) == 2
    events = [json.loads(line) for line in (sweep_dir / "events.jsonl").read_text().splitlines()]
    running, peak = 0, 0
    for e in events:
        running += {"started": 1, "ended": -1}.get(e["event"], 0)
        peak = max(peak, running)
    assert peak == 1 and [e["event"] for e in events].count("started") == 4
    # The data was prepared once, by the driver: one cache entry.
    assert len([d for d in shared_sweep.cache_dir.iterdir() if (d / "stats.json").is_file()]) == 1


@pytest.mark.ray
@pytest.mark.slow
def test_tune_metric_names_are_what_a_real_run_reported(shared_sweep):
    """tune.metric is checked against REPORTED_METRICS before Ray starts, so they must be exactly the metrics the
    trials' training reported (each training line of a trial's metrics.jsonl is one ray.train.report): every step
    metric at every step, the eval metrics together at eval steps, and nothing else. The generation eval (a task
    beside the workers) adds its own lines: the step and gen_<metric> only."""
    from sweep_fixtures import METRIC

    from raysft.pipeline.sweep.space import EVAL_METRICS, STEP_METRICS

    sweep = shared_sweep.result
    trials = [row["trial_id"] for row in sweep.table]
    assert len(trials) == 4
    for trial in trials:
        run_dir = shared_sweep.sweep_dir / "trials" / trial
        history = _train_reports(run_dir)
        assert [m["step"] for m in history] == [1, 2, 3, 4], trial
        reported = set().union(*history)
        assert reported == set(REPORTED_METRICS), (
            f"trial {trial} reported {sorted(reported)}; sweep/space.py REPORTED_METRICS says "
            f"{sorted(REPORTED_METRICS)}"
        )
        for m in history:
            assert set(STEP_METRICS) <= set(m), (trial, m)
            assert (set(EVAL_METRICS) & set(m)) in (set(), set(EVAL_METRICS)), (trial, m)
        assert [m["step"] for m in history if "eval_loss" in m] == [2, 4]  # train.eval_every 2, and the end
        generation = [m for m in _metrics(run_dir) if m not in history]
        assert [sorted(m) for m in generation] == [sorted(["step", METRIC])], (trial, generation)


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_the_bad_learning_rate_and_an_interrupted_sweep_resumes(sweep_base, tmp_path):
    """`raysft tune` in a subprocess with its own local cluster, one trial at a time, grid of 3 learning rates
    (good, bad, bad): the diverging lr is stopped by ASHA at its first rung; Ctrl-C after two finished trials
    (one completed, one early-stopped), then `--resume` runs the third, which ASHA, its rungs rebuilt from the
    finished trials, stops too (it would be the first at an empty rung otherwise), and leaves the first two
    untouched. Three trials, not four: each costs a trial start (~40-80 s here), not its 4 steps."""
    import yaml

    base = {
        **sweep_base,
        "run": {**sweep_base["run"], "storage_path": str(tmp_path), "name": "asha", "address": "local"},
    }
    base["tune"] = {
        "search_space": {"train.lr": [GOOD_LR, BAD_LR, 10 * BAD_LR]},
        "search_alg": "grid",
        "scheduler": "asha",
        "grace_period": 2,
        "reduction_factor": 4,
        "max_concurrent_trials": 1,
    }
    config = tmp_path / "asha.yaml"
    config.write_text(yaml.safe_dump(base))
    sweep_dir = tmp_path / "asha"
    events = sweep_dir / "events.jsonl"
    command = [sys.executable, "-m", "raysft.pipeline.cli", "tune", str(config)]

    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 420
        while sum('"ended"' in line for line in (events.read_text().splitlines() if events.exists() else [])) < 2:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {r["trial_id"]: r for r in _csv(sweep_dir / "results.csv")}
    done = sorted(first)[:2]
    assert [first[t]["stop_reason"] for t in done] == [COMPLETED, EARLY_STOPPED]
    snapshot = {
        t: {
            f: ((sweep_dir / "trials" / t / f).stat().st_mtime_ns, (sweep_dir / "trials" / t / f).read_bytes())
            for f in ("metrics.jsonl", "attempts.jsonl")
        }
        for t in done
    }

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = _csv(sweep_dir / "results.csv")
    assert len(rows) == 3
    # The best is the completed trial with the lowest final eval_loss (tune.metric's default, mode min).
    best = min((r for r in rows if r["stop_reason"] == COMPLETED), key=lambda r: float(r["final_eval_loss"]))
    assert (
        resumed.stdout.strip()
        .splitlines()[-1]
        .startswith(f"Sweep of 3 trials (1 completed, 2 early-stopped by ASHA): best {best['trial_id']} ")
    )
    for row in rows:
        bad = float(row["train.lr"]) >= BAD_LR
        assert row["stop_reason"] == (EARLY_STOPPED if bad else COMPLETED), row
        assert int(row["steps"]) == (2 if bad else 4)  # stopped at ASHA's first rung (grace period 2)
    # The two trials that had finished were not run again: same files, one start each.
    for t in done:
        for f, (mtime, content) in snapshot[t].items():
            path = sweep_dir / "trials" / t / f
            assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, content)
    starts = [json.loads(line)["trial_id"] for line in events.read_text().splitlines() if '"started"' in line]
    assert sorted(set(starts)) == sorted(r["trial_id"] for r in rows)
    assert all(starts.count(t) == 1 for t in done)
    # The third was stopped by the resumed sweep's ASHA (rungs rebuilt from the first two), not before Ctrl-C.
    (third,) = [r["trial_id"] for r in rows if r["trial_id"] not in done]
    assert f"[raysft] ASHA stopped trial {third} at step 2" in resumed.stdout, resumed.stdout[-3000:]
    assert Path(sweep_dir / "best_adapter" / "adapter_config.json").is_file()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("search_space",):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
