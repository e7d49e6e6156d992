"""MLflow and W&B tracking against a real MLflow server and W&B offline files; `raysft runs` / `raysft report`
on the real runs they produce (a train run, a run whose server died mid-run, the suite's grid sweep)."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import pytest
from tiny import fp32_cfg
from tracking_fixtures import free_port, wandb_history
from train_fixtures import make_prepared

from raysft.pipeline.cli import main as cli_main
from raysft.pipeline.config import load_config
from raysft.pipeline.run_folder import FAILURES_FILE
from raysft.pipeline.tracking import StepSinks, flat_params, read_handles


def test_flat_params_is_the_resolved_config():
    cfg = load_config(overrides={"train.lr": 1e-3, "lora.target_modules": ["q_proj", "v_proj"]})
    params = flat_params(cfg.to_dict())
    assert params["train.lr"] == "0.001" and params["lora.r"] == "16"
    assert params["lora.target_modules"] == '["q_proj", "v_proj"]' and params["model.tokenizer"] == "null"
    assert params["train.logging.mlflow"] == "false"


def test_unreachable_server_gives_one_warning_and_logging_goes_on(tmp_path, caplog, monkeypatch):
    """No server at all behind the URI: every step still returns at once after the first failure."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (tmp_path / "tracking.json").write_text(
        json.dumps(
            {
                "mlflow": {
                    "uri": f"http://127.0.0.1:{free_port()}",
                    "run_id": "r",
                    "experiment_id": "0",
                }
            }
        )
    )
    sinks = StepSinks(tmp_path)
    with caplog.at_level(logging.WARNING, logger="raysft.tracking"):
        for step in range(1, 6):
            sinks.log({"step": step, "loss": 1.0 / step}, step)
    sinks.close()
    warnings = [r for r in caplog.records if "mlflow tracking failed at step 1" in r.getMessage()]
    assert len(warnings) == 1 and len(caplog.records) == 1
    events = [json.loads(x) for x in (tmp_path / FAILURES_FILE).read_text().splitlines()]
    assert [(e["event"], e["sink"], e["step"]) for e in events] == [("tracking_lost", "mlflow", 1)]


# --- real runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage(sweep_storage) -> Path:
    """Where these runs go: the shared sweep's run.storage_path (conftest), so `raysft runs` lists both."""
    return sweep_storage


def _train_cfg(model_dir, storage, name, uri, **more):
    from raysft.pipeline.trainer import preflight

    over = {
        "train.lr": 5e-3,
        "train.warmup_steps": 1,
        "train.micro_batch_size": 4,
        "train.max_steps": 4,
        "train.save_every": 2,
        "train.eval_every": 2,
        "train.logging.tensorboard": False,
        "train.logging.mlflow": True,
        "train.logging.mlflow_tracking_uri": uri,
        "train.logging.project": "raysft-test",
        "scaling.num_workers": 1,
        "run.storage_path": str(storage),
        "run.name": name,
        "run.max_failures": 0,
    }
    over.update(more)
    return preflight(fp32_cfg(model_dir, **over))


def _fit(cfg, prepared):
    from raysft.pipeline.trainer import build_trainer, finish_run

    return finish_run(cfg, build_trainer(cfg, prepared).fit())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("packed"), n_train=48, n_eval=9, per_row=3)


@pytest.fixture(scope="module")
def tracked_run(ray_session, tiny_model_dir, storage, mlflow_server, prepared, tmp_path_factory):
    """A 4-step run with MLflow (the test server) and W&B (offline) on."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    try:
        cfg = _train_cfg(
            tiny_model_dir,
            storage,
            "tracked",
            mlflow_server.uri,
            **{"train.logging.wandb": True},
        )
        return _fit(cfg, prepared)
    finally:
        mp.undo()


@pytest.mark.ray
@pytest.mark.slow
def test_train_run_logs_params_metrics_and_artifacts_to_mlflow(tracked_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    handles = read_handles(tracked_run.run_dir)
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(handles["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "raysft-test"
    assert run.data.params["train.lr"] == "0.005" and run.data.params["lora.r"] == "4"
    assert run.data.params["run.name"] == "tracked" and run.data.params["scaling.num_workers"] == "1"
    local = [json.loads(x) for x in (tracked_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == [(r["step"], r["loss"]) for r in local]
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted(m.step for m in evals) == [2, 4]
    assert {"lr", "grad_norm", "tokens_per_s", "eval_ppl"} <= set(run.data.metrics)
    adapter = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter
    plots = {Path(a.path).name: a.file_size for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots.get("loss.png", 0) > 1000


@pytest.mark.ray
@pytest.mark.slow
def test_wandb_offline_run_files_hold_the_logged_metrics(tracked_run):
    handles = read_handles(tracked_run.run_dir)
    rows = [r for r in wandb_history(tracked_run.run_dir, handles["wandb"]["id"]) if "loss" in r]
    local = [json.loads(x) for x in (tracked_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["_step"], r["loss"]) for r in rows] == [(m["step"], m["loss"]) for m in local]
    assert [r["_step"] for r in rows if "eval_loss" in r] == [2, 4]


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_logs_one_parent_run_with_a_child_per_trial(shared_sweep, mlflow_server):
    """The suite's grid sweep (sweep_fixtures, MLflow on): one parent run, one child run per trial."""
    from mlflow.tracking import MlflowClient
    from sweep_fixtures import LRS, METRIC, PROJECT, STEPS

    sweep = shared_sweep.result
    client = MlflowClient(mlflow_server.uri)
    parent_id = read_handles(sweep.sweep_dir)["mlflow"]["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["raysft.kind"] == "sweep"
    assert client.get_experiment(parent.info.experiment_id).name == PROJECT
    assert json.loads(parent.data.params["tune.search_space.train.lr"]) == LRS
    assert parent.data.tags["raysft.best_trial"] == sweep.best.trial_id
    assert parent.data.metrics[f"best_trial_{METRIC}"] == pytest.approx(sweep.best.metrics[f"final_{METRIC}"])
    assert "results.csv" in {a.path for a in client.list_artifacts(parent_id)}
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    assert sorted(c.info.run_name for c in children) == sorted(r["trial_id"] for r in sweep.table)
    assert sorted(float(c.data.params["train.lr"]) for c in children) == sorted(LRS * 2)  # 2 ranks x 2 lrs
    for child in children:
        assert child.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss")) == list(range(1, STEPS + 1))
        assert "eval_loss" in child.data.metrics
        assert "adapter" in {a.path for a in client.list_artifacts(child.info.run_id)}


# --- raysft runs / raysft report on those runs ------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_runs_table_lists_runs_and_sweep_trials(tracked_run, shared_sweep, storage, capsys):
    """`raysft runs` on the storage path that holds the tracked run and the suite's grid sweep (sweep_fixtures)."""
    from sweep_fixtures import NAME, STEPS

    sweep = shared_sweep.result
    assert cli_main(["runs", str(storage), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    tracked = rows["tracked"]
    local = [json.loads(x) for x in (tracked_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in local if "eval_loss" in m]
    assert tracked["status"] == "finished" and (
        tracked["steps_done"],
        tracked["steps_total"],
    ) == (4, 4)
    assert tracked["last_eval_loss"] == evals[-1] and tracked["best_eval_loss"] == min(evals)
    assert tracked["tokens_per_s"] > 0 and tracked["adapter"] == str(tracked_run.adapter_path)
    assert tracked["sweep"] is None
    trials = [r for r in rows.values() if r["sweep"] == NAME]
    assert sorted(r["name"] for r in trials) == sorted(f"{NAME}/{r['trial_id']}" for r in sweep.table)
    assert all(r["status"] == "finished" and r["steps_done"] == r["steps_total"] == STEPS for r in trials)
    assert cli_main(["runs", str(storage)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "STATUS", "STEPS"] and len(table) == 1 + len(rows)
    line = next(x for x in table if x.startswith("tracked "))
    assert f"{evals[-1]:.4f}" in line and "4/4" in line and "finished" in line


@pytest.mark.ray
@pytest.mark.slow
def test_server_stopped_mid_run_leaves_training_finished_with_one_warning(
    ray_session, tiny_model_dir, storage, prepared, mlflow_server
):
    """Kills the shared server (conftest.mlflow_server), so it runs after every other test of this file that talks
    to it (the file's order); a later module gets it started again."""
    from mlflow.tracking import MlflowClient

    server = mlflow_server
    cfg = _train_cfg(
        tiny_model_dir,
        storage,
        "server-died",
        server.uri,
        **{
            "train.micro_batch_size": 1,
            "train.max_steps": 16,
            "train.save_every": 8,
            "train.eval_every": 8,
        },
    )
    metrics = cfg.run.storage_path + "/server-died/metrics.jsonl"

    def kill_after_first_step():
        # Step 2's line in metrics.jsonl means step 1 has reached MLflow (rank 0 logs file, then sinks).
        deadline = time.time() + 300
        while time.time() < deadline and not (
            Path(metrics).is_file() and len(Path(metrics).read_text().splitlines()) >= 2
        ):
            time.sleep(0.02)
        server.stop(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_step, daemon=True)
    killer.start()
    try:
        result = _fit(cfg, prepared)
    finally:
        killer.join(timeout=310)
        server.stop()
    local = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in local] == list(range(1, 17))  # training finished every step
    assert (result.adapter_path / "adapter_model.safetensors").is_file()
    lost = [
        json.loads(x)
        for x in (result.run_dir / FAILURES_FILE).read_text().splitlines()
        if json.loads(x)["event"] == "tracking_lost"
    ]
    assert len(lost) == 1 and lost[0]["sink"] == "mlflow"
    # In the server's database: the run exists, logged its first steps, and stops where the server died.
    client = MlflowClient(server.db_uri)
    steps = sorted(m.step for m in client.get_metric_history(read_handles(result.run_dir)["mlflow"]["run_id"], "loss"))
    assert steps and steps == list(range(1, len(steps) + 1)) and len(steps) < 16


@pytest.mark.ray
@pytest.mark.slow
def test_report_writes_non_empty_pngs(tracked_run, tmp_path, capsys):
    assert cli_main(["report", str(tracked_run.run_dir), "--output", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in printed)
    assert names == ["grad_norm.png", "loss.png", "lr.png", "tokens_per_s.png"]
    for p in printed:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 5000


def test_report_plots_generation_metrics_and_refuses_non_runs(tmp_path, capsys):
    rows = [
        {
            "step": s,
            "loss": 2.0 / s,
            "lr": 1e-3,
            "tokens_per_s": 100.0,
            "grad_norm": 1.0,
        }
        for s in range(1, 7)
    ]
    rows[2]["gen_exact_match"], rows[5]["gen_exact_match"] = 0.25, 0.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report" / "gen_exact_match.png").stat().st_size > 5000
    capsys.readouterr()
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a run folder: it has no metrics.jsonl" in capsys.readouterr().err
    assert cli_main(["runs", str(tmp_path / "nope")]) == 2
