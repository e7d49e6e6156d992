"""Bad input fails in one sentence before any worker starts; the plan, ledger, DeepSpeed config and RNG units."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from audit import check_exactly_once, global_rows

from raysft.pipeline.config import load_config
from raysft.pipeline.errors import ClusterError, ConfigError, ModelError
from raysft.pipeline.trainer import preflight, train
from raysft.pipeline.training.checkpoint import rng_state, set_rng_state
from raysft.pipeline.training.engine import deepspeed_config
from raysft.pipeline.training.ledger import Ledger
from raysft.pipeline.training.reader import ShardOrder, StepLayout


def one_sentence(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg
    return msg


def base(tiny_model_dir, tmp_path, **over):
    return load_config(
        None,
        overrides={
            "model.name_or_path": str(tiny_model_dir),
            "data.train": str(tmp_path / "d.jsonl"),
            "run.storage_path": str(tmp_path / "runs"),
            **over,
        },
    )


def test_missing_model_path(tmp_path):
    cfg = load_config(
        None,
        overrides={"model.name_or_path": str(tmp_path / "no-such-model"), "run.storage_path": str(tmp_path / "runs")},
    )
    with pytest.raises(ModelError) as exc:
        train(cfg)
    assert "no-such-model" in one_sentence(exc.value)
    assert not (tmp_path / "runs").exists()


def test_model_without_chat_template(tmp_path):
    from tiny import save_tiny_model

    d = save_tiny_model(tmp_path / "m", chat_template=False)
    with pytest.raises(ModelError) as exc:
        train(base(d, tmp_path))
    assert "chat template" in one_sentence(exc.value)


def test_unwritable_storage_path(tiny_model_dir, tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError) as exc:
        train(base(tiny_model_dir, tmp_path, **{"run.storage_path": str(tmp_path / "afile" / "runs")}))
    assert "run.storage_path" in one_sentence(exc.value)


def test_fp16_and_zero_workers_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="bfloat16"):
        preflight(base(tiny_model_dir, tmp_path, **{"model.dtype": "float16"}))
    with pytest.raises(ConfigError, match="num_workers"):
        preflight(base(tiny_model_dir, tmp_path, **{"scaling.num_workers": 0}))


@pytest.mark.ray
def test_more_workers_than_cluster_cpus_or_gpus(ray_session, tiny_model_dir, tmp_path):
    with pytest.raises(ClusterError) as exc:
        train(base(tiny_model_dir, tmp_path, **{"scaling.num_workers": 64}))
    assert "64" in one_sentence(exc.value) and "CPUs" in str(exc.value)
    with pytest.raises(ClusterError) as exc:
        train(base(tiny_model_dir, tmp_path, **{"scaling.num_workers": 1, "scaling.use_gpu": True}))
    assert "GPUs" in one_sentence(exc.value)
    # Nothing was prepared or started: the data file does not even exist.
    assert not (tmp_path / "d.jsonl").exists() and not list((tmp_path / "runs").glob("*"))


def test_cli_prints_one_sentence_and_exits_2(tmp_path, capsys):
    from raysft.pipeline.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name_or_path": str(tmp_path / "gone")}}))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysft: error:") and "gone" in err and "\n" not in err


def test_step_layout_and_order_cover_every_kept_row_once_per_epoch():
    layout = StepLayout(n_rows=23, rows_per_step=12, epochs=2)
    assert layout.steps_per_epoch == 1 and layout.left_out_per_epoch == 11
    order = ShardOrder((7, 9, 11, 8, 15), seed=7, window=2)
    layout = StepLayout(n_rows=order.n_rows, rows_per_step=12, epochs=3)  # 50 rows, 4 steps, 2 left out
    for epoch in range(3):
        seen = []
        for s in range(epoch * layout.steps_per_epoch, (epoch + 1) * layout.steps_per_epoch):
            e, first = layout.position(s)
            assert e == epoch
            seen += global_rows(order, e, np.arange(first, first + 12)).tolist()
        assert len(seen) == len(set(seen)) == 48
    assert not np.array_equal(global_rows(order, 0, np.arange(50)), global_rows(order, 1, np.arange(50)))
    assert StepLayout(50, 12, max_steps=20).total_steps == 20


def test_ledger_rewind_and_exactly_once_check(tmp_path):
    ledger = Ledger(tmp_path / "samples.jsonl")
    for step in range(1, 5):
        ledger.append(step, (step - 1) // 2, [2 * step, 2 * step + 1])
    copy = tmp_path / "ckpt.jsonl"
    copy.write_text(ledger.path.read_text())
    ledger.append(5, 2, [99])
    ledger.rewind(2, source=copy)
    assert [e["step"] for e in ledger.entries()] == [1, 2]
    check_exactly_once(ledger.entries(), {0: {2, 3, 4, 5}})
    ledger.append(2, 0, [6])
    with pytest.raises(AssertionError):
        check_exactly_once(ledger.entries())


def test_deepspeed_config_owns_batching_and_precision(tiny_model_dir, tmp_path):
    cfg = base(
        tiny_model_dir,
        tmp_path,
        **{
            "train.micro_batch_size": 2,
            "train.grad_accum": 3,
            "train.deepspeed.stage": 3,
            "train.deepspeed.offload_optimizer": True,
            "train.deepspeed.offload_params": True,
            "model.dtype": "bfloat16",
        },
    )
    ds = deepspeed_config(cfg, world_size=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        2,
        3,
        24,
    )
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    user = {
        "fp16": {"enabled": True},
        "train_batch_size": "auto",
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "optimizer": {"type": "Adam"},
        "gradient_clipping": 0.5,
    }
    ds = deepspeed_config(cfg, world_size=1, user_json=user)
    assert "fp16" not in ds and "optimizer" not in ds and ds["train_batch_size"] == 6
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["gradient_clipping"] == 0.5
    json.dumps(ds)


def test_import_deepspeed_leaves_out_its_autotuners_mlflow_import(tmp_path):
    """engine.import_deepspeed: DeepSpeed loads without the mlflow import its autotuner makes (seconds of CPU per
    worker), and leaves no trace that would keep mlflow from importing later (rank 0's tracking). A fresh
    interpreter: this one may hold either package already."""
    pytest.importorskip("mlflow")
    code = (
        "import sys\n"
        "from raysft.pipeline.training.engine import import_deepspeed\n"
        "import_deepspeed()\n"
        "from deepspeed.autotuning import autotuner\n"
        "print('mlflow' in sys.modules, autotuner.has_mlflow)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "False"], out.stdout


def test_rng_state_roundtrip_is_json():
    state = json.loads(json.dumps(rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_user_deepspeed_json_is_checked_and_resolved(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        preflight(base(tiny_model_dir, tmp_path, **{"train.deepspeed.config": str(tmp_path / "ds.json")}))
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg = preflight(base(tiny_model_dir, tmp_path, **{"train.deepspeed.config": str(tmp_path / "ds.json")}))
    assert cfg.train.deepspeed.config == str((tmp_path / "ds.json").resolve())
    assert cfg.run.storage_path == str((tmp_path / "runs").resolve())


def test_preflight_checks_the_tokenizer_through_its_cached_spec(tiny_model_dir, tmp_path):
    """The driver's preflight checks the tokenizer (found, fast, chat template) through the data plan's cached
    spec: once it is cached, a fresh driver's preflight imports no transformers (~3 s of CPU per run)."""
    over = {
        "model.name_or_path": str(tiny_model_dir),
        "data.train": str(tmp_path / "d.jsonl"),
        "data.cache_dir": str(tmp_path / "cache"),
        "run.storage_path": str(tmp_path / "runs"),
    }
    preflight(load_config(None, overrides=over))  # builds the spec through transformers, with its checks
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1
    code = (
        "import sys; from raysft.pipeline.config import load_config; from raysft.pipeline.trainer import preflight; "
        f"preflight(load_config(None, overrides={over!r})); print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["False"], out.stdout + out.stderr[-2000:]
