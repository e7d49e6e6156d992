"""Generation eval during training (train.eval_generate): prompts in any format with references from the
responses, built-in and user metrics, one-sentence errors before any worker starts, and real runs on the
tiny model: gen_exact_match at its interval (replies reproduced from the saved adapter), a user metric
loaded and used, and a Tune grid that picks its best trial by the generation metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysft.pipeline.config import load_config
from raysft.pipeline.errors import ConfigError, DataError
from raysft.pipeline.training import generate_eval as ge

CUSTOM_METRIC = '''
def char_code(replies, references):
    """A number that depends on every character of every reply (so two trials almost surely differ)."""
    return (sum(ord(c) for r in replies for c in r) % 1009) / 1009.0
'''


def _char_code(replies):
    return (sum(ord(c) for r in replies for c in r) % 1009) / 1009.0


def _write_prompts(root: Path) -> Path:
    """Three formats in one folder: multi-turn messages (JSON lines), Alpaca (JSON array), prompt/completion
    (Parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / "prompts"
    d.mkdir()
    rows = [
        {
            "messages": [
                {"role": "user", "content": "what is 2 plus 3?"},
                {"role": "assistant", "content": "5"},
                {"role": "user", "content": "and 4 plus 4?"},
                {"role": "assistant", "content": " 8 "},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "add"},
                {"role": "user", "content": "what is 1 plus 1?"},
                {"role": "assistant", "content": "2"},
            ]
        },
    ]
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a trailing blank line
    (d / "b.json").write_text(json.dumps([{"instruction": "add", "input": "6 and 1", "output": "7"}]))
    pq.write_table(pa.Table.from_pylist([{"prompt": "what is 9 plus 0?", "completion": "9"}]), d / "c.parquet")
    return d


def test_prompts_in_any_format_take_references_from_the_responses(tmp_path):
    cfg = load_config(overrides={"train.eval_generate.prompts": str(_write_prompts(tmp_path))})
    prompts = ge.read_prompts(cfg)
    assert [p.reference for p in prompts] == [" 8 ", "2", "7", "9"]
    assert [m["content"] for m in prompts[0].messages] == ["what is 2 plus 3?", "5", "and 4 plus 4?"]
    assert prompts[1].messages[0] == {"role": "system", "content": "add"}
    assert prompts[2].messages == [{"role": "user", "content": "add\n\n6 and 1"}]


def test_a_bad_prompt_row_is_one_sentence_naming_file_and_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    cfg = load_config(overrides={"train.eval_generate.prompts": str(path)})
    with pytest.raises(
        DataError,
        match=rf"train.eval_generate.prompts {path} row 1 is not a prompt with a reference "
        r"answer \(malformed_json",
    ):
        ge.read_prompts(cfg)
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="row 0 has no user turn before its last assistant turn"):
        ge.read_prompts(cfg)


def test_builtin_metrics():
    replies, refs = [" 5\n", "it is 8", "7", ""], ["5", "8", "7 ", "x"]
    assert ge.exact_match(replies, refs) == pytest.approx(2 / 4)
    assert ge.contains(replies, refs) == pytest.approx(3 / 4)
    name, fn = ge.load_metric("contains")
    assert (name, fn) == ("contains", ge.contains)


def test_user_metric_from_a_file_or_a_module(tmp_path):
    (tmp_path / "my_metrics.py").write_text(CUSTOM_METRIC)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("{}\n")
    name, fn = ge.load_metric("my_metrics.py:char_code", str(config_file))  # relative to the config file
    assert name == "char_code" and fn(["ab"], ["x"]) == pytest.approx(_char_code(["ab"]))
    name, fn = ge.load_metric("raysft.pipeline.training.generate_eval:contains")
    assert name == "contains" and fn(["xay"], ["a"]) == 1.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("exact", r" is neither exact_match nor contains nor module:function\."),
        ("no_such_module_xyz:f", r": importing no_such_module_xyz failed \(ModuleNotFoundError"),
        ("raysft.pipeline.training.generate_eval:nope", r".*generate_eval has no function nope\."),
        ("missing.py:f", r": the file .*missing.py does not exist\."),
    ],
)
def test_bad_metric_specs_are_one_sentence(spec, message):
    with pytest.raises(ConfigError, match=rf"train.eval_generate.metric .{spec}.{message}"):
        ge.load_metric(spec)


def test_off_by_default_and_checked_before_any_worker_starts(tmp_path, tiny_model_dir):
    from raysft.pipeline.trainer import preflight

    cfg = load_config(overrides={"model.name_or_path": str(tiny_model_dir), "run.storage_path": str(tmp_path)})
    assert not ge.enabled(cfg) and ge.validation_config(cfg, tmp_path) is None and not ge.due(cfg, 100, True)
    prompts = _write_prompts(tmp_path)
    with pytest.raises(ConfigError, match=r"train.eval_generate.metric 'nomod_xyz:f': importing nomod_xyz failed"):
        preflight(
            cfg.with_overrides(
                {"train.eval_generate.prompts": str(prompts), "train.eval_generate.metric": "nomod_xyz:f"}
            )
        )
    with pytest.raises(DataError, match="The data path .*nowhere.jsonl does not exist"):
        preflight(cfg.with_overrides({"train.eval_generate.prompts": str(tmp_path / "nowhere.jsonl")}))
    (tmp_path / "m.py").write_text(CUSTOM_METRIC)
    (tmp_path / "c.yaml").write_text("train: {eval_generate: {prompts: prompts, metric: m.py:char_code, every: 3}}\n")
    ok = preflight(
        load_config(
            tmp_path / "c.yaml",
            overrides={"model.name_or_path": str(tiny_model_dir), "run.storage_path": str(tmp_path)},
        )
    )
    assert (
        ok.train.eval_generate.prompts == str(prompts)
        and ok.train.eval_generate.metric == f"{tmp_path / 'm.py'}:char_code"
    )
    assert [s for s in range(1, 8) if ge.due(ok, s, s == 7)] == [3, 6, 7]


def test_a_reused_eval_process_swaps_the_adapter_and_equals_a_fresh_load(tmp_path, tiny_model_dir):
    """The eval task keeps the base loaded between checkpoints and swaps only the LoRA weights: the model
    it then evaluates must be exactly the one a fresh load of the new adapter gives."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = load_config(overrides={"model.name_or_path": str(tiny_model_dir), "model.quantization": "none"})
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        model.save_pretrained(tmp_path / f"adapter{seed}")
        adapters.append(tmp_path / f"adapter{seed}")
    ge._LOADED.clear()
    first, _ = ge.load_with_adapter(cfg, adapters[0])
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        before = first(input_ids=ids).logits
        swapped, _ = ge.load_with_adapter(cfg, adapters[1])
        assert swapped is first, "the second eval in the same process loaded the base again"
        got = swapped(input_ids=ids).logits
        ge._LOADED.clear()
        fresh, _ = ge.load_with_adapter(cfg, adapters[1])
        assert fresh is not first
        want = fresh(input_ids=ids).logits
    assert not torch.allclose(before, want)  # the two adapters differ
    assert torch.equal(got, want)
    ge._LOADED.clear()


def test_tune_metric_may_be_the_generation_metric(tmp_path):
    from raysft.pipeline.sweep.space import plan_sweep

    base = {
        "data.train": "t.jsonl",
        "tune.search_space": {"train.lr": [1e-3, 1e-4]},
        "tune.metric": "gen_exact_match",
        "tune.mode": "max",
        "tune.scheduler": "none",
    }
    with pytest.raises(
        ConfigError, match=r"tune.metric 'gen_exact_match' is a generation metric; set train.eval_generate.prompts\."
    ):
        plan_sweep(load_config(overrides=base))
    on = {**base, "train.eval_generate.prompts": str(_write_prompts(tmp_path))}
    assert plan_sweep(load_config(overrides=on)).metric == "gen_exact_match"
    with pytest.raises(ConfigError, match=r"is not what train.eval_generate reports \(gen_contains\)"):
        plan_sweep(load_config(overrides={**on, "train.eval_generate.metric": "contains"}))
    with pytest.raises(ConfigError, match="too late for search_alg optuna"):
        plan_sweep(
            load_config(
                overrides={**on, "tune.search_alg": "optuna", "tune.search_space": {"train.lr": {"choice": [1e-3]}}}
            )
        )


# --- real runs (Ray) -----------------------------------------------------------------------------------


def _gen_lines(run_dir: Path, key: str) -> list[dict]:
    return [m for m in ge.jsonl.read(run_dir / "metrics.jsonl") if key in m]


@pytest.mark.ray
@pytest.mark.slow
def test_exact_match_on_held_out_prompts_at_its_interval(ray_session, tiny_model_dir, tmp_path):
    """4 steps, generation every 2: gen_exact_match at steps 2 and 4 in metrics.jsonl, each the exact match of
    the replies it wrote; the step-4 replies are what the saved adapter generates."""
    from train_fixtures import make_prepared

    from raysft.pipeline.trainer import build_trainer, finish_run, preflight

    prepared = make_prepared(tmp_path / "packed", n_train=48, n_eval=0, per_row=3)
    prompts = _write_prompts(tmp_path)
    cfg = preflight(
        load_config(
            overrides={
                "model.name_or_path": str(tiny_model_dir),
                "model.quantization": "none",
                "model.dtype": "float32",
                "lora.r": 4,
                "lora.dropout": 0.0,
                "train.max_steps": 4,
                "train.lr": 5e-3,
                "train.save_every": 100,
                "train.micro_batch_size": 4,
                "train.logging.tensorboard": False,
                "scaling.num_workers": 1,
                "run.storage_path": str(tmp_path / "runs"),
                "run.name": "gen",
                "run.max_failures": 0,
                "train.eval_generate": {"prompts": str(prompts), "every": 2, "max_new_tokens": 6, "batch_size": 3},
            }
        )
    )
    result = finish_run(cfg, build_trainer(cfg, prepared).fit())
    run_dir = result.run_dir
    lines = _gen_lines(run_dir, "gen_exact_match")
    assert [m["step"] for m in lines] == [2, 4] and all(set(m) == {"step", "gen_exact_match"} for m in lines)
    samples = {s["step"]: s for s in ge.jsonl.read(run_dir / ge.SAMPLES_FILE)}
    assert sorted(samples) == [2, 4]
    for m in lines:
        s = samples[m["step"]]["samples"]
        assert [x["reference"] for x in s] == [" 8 ", "2", "7", "9"]
        assert m["gen_exact_match"] == ge.exact_match([x["reply"] for x in s], [x["reference"] for x in s])
    # Only the generation steps and the end were checkpointed (save_every 100).
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == [
        "checkpoint_000002",
        "checkpoint_000004",
    ]
    # The eval used the checkpoint's adapter: regenerate from the run's final adapter (= step 4's).
    model, tok = ge.load_with_adapter(cfg, result.adapter_path)
    replies = ge.generate(model, tok, ge.read_prompts(cfg), max_new_tokens=6, batch_size=3)
    assert replies == [x["reply"] for x in samples[4]["samples"]]
    assert any(r for r in replies)  # it really generated something


@pytest.mark.ray
@pytest.mark.slow
def test_tune_grid_picks_its_best_trial_by_a_user_generation_metric(shared_sweep):
    """The suite's grid sweep (sweep_fixtures: 2 ranks x 2 learning rates) is judged by gen_char_code (a user
    function in a .py file, mode max): each trial's value is the function applied to its replies, and the sweep's
    best trial is the one with the highest value."""
    import csv

    from sweep_fixtures import METRIC, STEPS, char_code

    sweep = shared_sweep.result
    assert (sweep.metric, sweep.mode) == (METRIC, "max")
    values = {}
    for trial in (shared_sweep.sweep_dir / "trials").iterdir():
        (line,) = _gen_lines(trial, METRIC)  # train.eval_generate.every = max_steps: once, at the end
        (s,) = ge.jsonl.read(trial / ge.SAMPLES_FILE)
        assert line["step"] == s["step"] == STEPS and len(s["samples"]) == 4
        assert line[METRIC] == pytest.approx(char_code([x["reply"] for x in s["samples"]]))
        values[trial.name] = line[METRIC]
    assert len(values) == 4
    best = max(values, key=values.get)
    # The trials differ, and the best one is the only one with its value, so the pick means something.
    assert sorted(values.values())[-2] < values[best], values
    assert sweep.best.trial_id == best
    with open(shared_sweep.sweep_dir / "results.csv") as f:
        table = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert {k: float(r[f"final_{METRIC}"]) for k, r in table.items()} == pytest.approx(values)


def test_the_eval_task_writes_metrics_samples_mlflow_and_wandb_and_records_a_failure(
    tmp_path, tiny_model_dir, monkeypatch, mlflow_server
):
    """validate_checkpoint (what Ray Train runs as the validation task) on a checkpoint folder of step 3: the
    gen_ line, the replies, and the value in a real MLflow server and a W&B offline run; a metric that raises
    is a failures.jsonl line."""
    from ray.train import Checkpoint
    from tracking_fixtures import wandb_history

    from raysft.pipeline.models.load import build_model, save_adapter
    from raysft.pipeline.run_folder import FAILURES_FILE
    from raysft.pipeline.tracking import _client, read_handles, start_tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "runs" / "r"
    cfg = load_config(
        overrides={
            "model.name_or_path": str(tiny_model_dir),
            "model.quantization": "none",
            "model.dtype": "float32",
            "lora.r": 4,
            "train.logging": {
                "tensorboard": False,
                "mlflow": True,
                "wandb": True,
                "mlflow_tracking_uri": mlflow_server.uri,
            },
            "train.eval_generate": {"prompts": str(_write_prompts(tmp_path)), "max_new_tokens": 5},
        }
    )
    start_tracking(cfg, run_dir, fresh=True)
    ckpt = tmp_path / "checkpoint_000003"
    save_adapter(build_model(cfg), ckpt / "adapter")
    out = ge.validate_checkpoint(Checkpoint.from_directory(str(ckpt)), config=cfg.to_dict(), run_dir=str(run_dir))
    (line,) = ge.jsonl.read(run_dir / "metrics.jsonl")
    assert out == line == {"step": 3, "gen_exact_match": out["gen_exact_match"]}
    (samples,) = ge.jsonl.read(run_dir / ge.SAMPLES_FILE)
    assert samples["step"] == 3 and len(samples["samples"]) == 4 and samples["metric"] == "gen_exact_match"
    handles = read_handles(run_dir)
    history = _client(mlflow_server.uri).get_metric_history(handles["mlflow"]["run_id"], "gen_exact_match")
    assert [(m.step, m.value) for m in history] == [(3, out["gen_exact_match"])]
    rows = wandb_history(run_dir, handles["wandb"]["id"])
    assert any(r.get("gen_exact_match") == out["gen_exact_match"] and r.get("_step") == 3 for r in rows), rows

    (tmp_path / "bad.py").write_text("def broken(replies, references):\n    raise ValueError('no score')\n")
    bad = cfg.with_overrides(
        {
            "train.eval_generate.metric": f"{tmp_path / 'bad.py'}:broken",
            "train.logging.mlflow": False,
            "train.logging.wandb": False,
        }
    )
    with pytest.raises(ValueError, match="no score"):
        ge.validate_checkpoint(Checkpoint.from_directory(str(ckpt)), config=bad.to_dict(), run_dir=str(run_dir))
    failures = [e for e in ge.jsonl.read(run_dir / FAILURES_FILE) if e["event"] == "generation_eval_failed"]
    assert [(e["step"], e["error"]) for e in failures] == [(3, "ValueError: no score")]
