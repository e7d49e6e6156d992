"""Ray Train + DeepSpeed on CPU (gloo): step-split invariance, recovery from a killed worker with exact
resume and exactly-once data, ZeRO-2/ZeRO-3 with a 4-bit base, export, the Python API end to end."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from audit import check_exactly_once
from safetensors.torch import load_file
from train_fixtures import make_prepared

from raysft.pipeline.config import load_config
from raysft.pipeline.run_folder import read_metrics
from raysft.pipeline.trainer import build_trainer, finish_run, preflight

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_SAMPLES = 48  # 16 packed rows of 3 samples; 4 rows per step -> 4 steps per epoch, 2 epochs
ROWS_PER_SHARD = 2  # 8 shards; train.shuffle_window 2 -> 4 windows per epoch, one step each


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(
        tmp_path_factory.mktemp("packed"), n_train=N_SAMPLES, n_eval=9, per_row=3, rows_per_shard=ROWS_PER_SHARD
    )


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def fp32_cfg(model_dir, runs_root, name, workers, micro, accum, **more):
    over = {
        "model.name_or_path": str(model_dir),
        "model.quantization": "none",
        "model.dtype": "float32",
        "lora.dropout": 0.0,
        "lora.r": 4,
        "lora.alpha": 8,
        "train.epochs": 2,
        "train.lr": 5e-3,
        "train.warmup_steps": 1,
        "train.save_every": 2,
        "train.eval_every": 4,
        "train.micro_batch_size": micro,
        "train.grad_accum": accum,
        "train.deepspeed.stage": 2,
        "scaling.num_workers": workers,
        "run.storage_path": str(runs_root),
        "run.name": name,
        "run.max_failures": 0,
    }
    over.update(more)
    return preflight(load_config(None, overrides=over))


def fit(cfg, prepared):
    return finish_run(cfg, build_trainer(cfg, prepared).fit())


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


# The runs compared with the reference run_2w only for their ledger, adapter and eval loss save no checkpoint
# before the last step (what is saved does not change what is trained); run_2w keeps save_every 2, whose
# checkpoints test_metrics_ledger_and_checkpoints, the recovery and the torchrun tests use.
FINAL_CHECKPOINT_ONLY = {"train.save_every": 8}


@pytest.fixture(scope="module")
def run_1w(ray_session, tiny_model_dir, runs_root, prepared):
    """1 worker x 4 rows per micro-batch x accumulation 1."""
    return fit(
        fp32_cfg(tiny_model_dir, runs_root, "w1", workers=1, micro=4, accum=1, **FINAL_CHECKPOINT_ONLY), prepared
    )


@pytest.fixture(scope="module")
def run_2w(ray_session, tiny_model_dir, runs_root, prepared):
    """2 workers x 1 row per micro-batch x accumulation 2 (the uninterrupted reference run)."""
    return fit(fp32_cfg(tiny_model_dir, runs_root, "w2", workers=2, micro=1, accum=2), prepared)


@pytest.fixture(scope="module")
def run_1x4(ray_session, tiny_model_dir, runs_root, prepared):
    """1 worker x accumulation 4 x 1 row per micro-batch."""
    return fit(
        fp32_cfg(tiny_model_dir, runs_root, "w1a4", workers=1, micro=1, accum=4, **FINAL_CHECKPOINT_ONLY), prepared
    )


@pytest.fixture(scope="module")
def run_4w(ray_session, tiny_model_dir, runs_root, prepared):
    """4 workers x accumulation 1 x 1 row per micro-batch."""
    return fit(
        fp32_cfg(tiny_model_dir, runs_root, "w4", workers=4, micro=1, accum=1, **FINAL_CHECKPOINT_ONLY), prepared
    )


def ledger(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_step_split_invariance(run_1w, run_2w, prepared):
    """Same data per step, split differently: the updated LoRA weights agree within 1e-5 (fp32)."""
    assert ledger(run_1w.run_dir) == ledger(run_2w.run_dir)
    # The rows really have unequal trained-token counts (otherwise averaging per rank would also pass).
    import pyarrow.parquet as pq

    from raysft.pipeline.training.step import trained_tokens

    counts = {trained_tokens(r) for r in pq.read_table(prepared.train_dir).column("labels").to_pylist()}
    assert len(counts) > 3
    assert_same_adapter(adapter(run_1w.run_dir), adapter(run_2w.run_dir))
    assert abs(run_1w.metrics["eval_loss"] - run_2w.metrics["eval_loss"]) < 1e-5


def test_order_invariance_1x4x1_2x2x1_4x1x1(run_1x4, run_2w, run_4w):
    """Streaming from shards: workers x grad_accum x micro of 1x4x1, 2x2x1 and 4x1x1 train the same rows per
    step (the ledger) and give the same adapter within 1e-5."""
    assert ledger(run_1x4.run_dir) == ledger(run_2w.run_dir) == ledger(run_4w.run_dir)
    assert_same_adapter(adapter(run_1x4.run_dir), adapter(run_2w.run_dir))
    assert_same_adapter(adapter(run_4w.run_dir), adapter(run_2w.run_dir))
    # Every worker read every shard of each epoch once, through its bounded window (the reader's counters).
    reads = [e for e in events(run_4w.run_dir) if e["event"] == "reader"][-1]["reads"]
    assert sorted((e, s) for e, _, s in reads) == [
        (e, s) for e in (0, 1) for s in range(N_SAMPLES // 3 // ROWS_PER_SHARD)
    ]


def events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


def _torchrun(config: Path, prepared, overrides: list[str], world: int = 2) -> None:
    import torch.multiprocessing as mp
    from dist_workers import torchrun_worker
    from local_processes import free_port

    mp.start_processes(
        torchrun_worker,
        args=(world, free_port(), str(config), str(prepared.train_dir.parent), overrides),
        nprocs=world,
        start_method="spawn",
    )


def test_torchrun_path_gives_the_ray_adapter(run_2w, tiny_model_dir, runs_root, prepared, tmp_path):
    """The same loop without Ray (torch.distributed, gloo, 2 real processes, the same Parquet): the same
    ledger, losses and adapter as the Ray Train run (1e-5); then a lost last checkpoint resumes exactly, at
    another world size: the run is elastic ([1, 2], the global batch of 2 workers), so the ZeRO-2 optimizer
    state written by 2 ranks is re-partitioned to 1, which takes 4 micro-batches per step instead of 2."""
    # Checkpoints at steps 6 and 8 only: the two the assertions and the resume below use.
    cfg = fp32_cfg(tiny_model_dir, runs_root, "torch-w2", workers=[1, 2], micro=1, accum=2, **{"train.save_every": 6})
    config = tmp_path / "torch.yaml"
    config.write_text(cfg.dump_yaml())
    _torchrun(config, prepared, [])
    run_dir = runs_root / "torch-w2"
    assert ledger(run_dir) == ledger(run_2w.run_dir)
    ray_rows, torch_rows = read_metrics(run_2w.run_dir), read_metrics(run_dir)
    assert [r["step"] for r in torch_rows] == list(range(1, 9))
    for a, b in zip(ray_rows, torch_rows):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["trained_tokens"] == b["trained_tokens"]
    assert abs(torch_rows[-1]["eval_loss"] - run_2w.metrics["eval_loss"]) < 1e-5
    assert_same_adapter(adapter(run_dir), adapter(run_2w.run_dir))
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_000006", "checkpoint_000008"]

    # A crash after step 6's checkpoint, and only 1 process comes back: it resumes from step 6 and ends where the
    # full 2-worker run did.
    import shutil

    shutil.rmtree(run_dir / "checkpoint_000008")
    shutil.rmtree(run_dir / "adapter")
    _torchrun(config, prepared, [], world=1)
    assert [(e["world_size"], e["step"], e["grad_accum"]) for e in events(run_dir) if e["event"] == "start"] == [
        (2, 0, 2),
        (1, 6, 4),
    ]
    assert [e["step"] for e in ledger(run_dir)] == list(range(1, 9))
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))
    assert_same_adapter(adapter(run_dir), adapter(run_2w.run_dir))


def test_metrics_ledger_and_checkpoints(run_2w):
    rows = read_metrics(run_2w.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens"} <= r.keys()
    assert all(b["trained_tokens"] > a["trained_tokens"] for a, b in zip(rows, rows[1:]))
    assert "eval_loss" in rows[3] and "eval_ppl" in rows[-1] and "eval_loss" not in rows[2]
    assert rows[-1]["eval_loss"] == pytest.approx(run_2w.metrics["eval_loss"])
    check_exactly_once(ledger(run_2w.run_dir), {0: set(range(N_SAMPLES)), 1: set(range(N_SAMPLES))})
    assert any((run_2w.run_dir / "tensorboard").iterdir())
    ckpts = sorted(p.name for p in run_2w.run_dir.glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_000006", "checkpoint_000008"]  # keep_checkpoints=2
    last = run_2w.run_dir / "checkpoint_000008"
    assert json.loads((last / "state.json").read_text())["step"] == 8
    assert (last / "rng" / "rank0.json").is_file() and (last / "rng" / "rank1.json").is_file()
    assert (last / "adapter" / "adapter_model.safetensors").is_file()


def _registered_checkpoint_step(run_dir: Path) -> int:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["checkpoint_dir_name"].split("_")[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 0


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: dict, gcs_address: str) -> None:
    from ray.util.state import list_actors

    # Kill only once Ray Train's controller has registered a checkpoint (its snapshot names it): a
    # rank returning from report() does not mean the controller has processed that checkpoint yet.
    deadline = time.time() + 240
    while time.time() < deadline and _registered_checkpoint_step(run_dir) < 2:
        time.sleep(0.05)
    actors = list_actors(address=gcs_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    if actors:
        pid = max(a.pid for a in actors)
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid


def test_recovery_from_killed_worker_is_exact(ray_session, tiny_model_dir, runs_root, prepared, run_2w):
    cfg = fp32_cfg(tiny_model_dir, runs_root, "killed", workers=2, micro=1, accum=2, **{"run.max_failures": 1})
    run_dir = runs_root / "killed"
    killed: dict = {}
    killer = threading.Thread(
        target=_kill_a_worker_after_first_checkpoint,
        args=(run_dir, killed, ray_session.get_runtime_context().gcs_address),
        daemon=True,
    )
    killer.start()
    result = fit(cfg, prepared)
    killer.join(timeout=5)
    assert "pid" in killed, "no worker was killed"
    starts = [e for e in events(run_dir) if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["step"] == 0 and starts[1]["step"] >= 2, starts
    # The restarted reader began at the checkpoint's window: it read no shard of an earlier window of that epoch.
    from raysft.pipeline.data.shards import load_index
    from raysft.pipeline.training.reader import ShardOrder

    resumed = starts[1]["step"]
    epoch, row = starts[1]["data_position"]["epoch"], starts[1]["data_position"]["row"]
    order = ShardOrder(tuple(s.rows for s in load_index(str(prepared.train_dir)).shards), seed=0, window=2)
    first_window = int(order.locate(epoch, np.array([row]))[0][0])
    earlier = {s for w in range(first_window) for s in order.window_shards(epoch, w)}
    after = [e for e in events(run_dir) if e["event"] == "reader" and e["start"] == resumed][-1]
    read_this_epoch = [(w, s) for e, w, s in after["reads"] if e == epoch]
    assert read_this_epoch and not [e for e, _, _ in after["reads"] if e < epoch]  # no finished epoch re-read
    assert min(w for w, _ in read_this_epoch) == first_window and not earlier & {s for _, s in read_this_epoch}
    check_exactly_once(ledger(run_dir), {0: set(range(N_SAMPLES)), 1: set(range(N_SAMPLES))})
    assert [e["step"] for e in ledger(run_dir)] == list(range(1, 9))
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))
    assert_same_adapter(adapter(result.run_dir), adapter(run_2w.run_dir))
    assert result.metrics["eval_loss"] == pytest.approx(run_2w.metrics["eval_loss"], abs=1e-5)


def _eval_loss(model, eval_dir) -> float:
    import pyarrow.parquet as pq

    from raysft.pipeline.training.step import collate, eval_loss_sum

    rows = pq.read_table(eval_dir).to_pylist()
    s, n = eval_loss_sum(model, [collate([r]) for r in rows])
    return s / n


def test_export_adapter_reproduces_eval_loss_and_merge_loads(run_2w, prepared, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raysft.pipeline.cli import main

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_2w.adapter_path)
    assert _eval_loss(model, prepared.eval_dir) == pytest.approx(run_2w.metrics["eval_loss"], abs=1e-5)

    assert main(["export", str(run_2w.run_dir), "--merge"]) == 0
    merged_dir = run_2w.run_dir / "merged"
    assert (merged_dir / "model.safetensors").is_file()
    assert not list(merged_dir.glob("*.bin")) and not list(merged_dir.glob("*.pt"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16
    assert _eval_loss(merged.float(), prepared.eval_dir) == pytest.approx(run_2w.metrics["eval_loss"], abs=2e-2)


def _losses_drop(run_dir: Path) -> None:
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.05, losses


def _nf4_overrides(model_dir, runs_root, name, stage):
    return {
        "model.name_or_path": str(model_dir),
        "model.quantization": "nf4",
        "lora.r": 8,
        "lora.alpha": 16,
        "train.max_steps": 8,
        "train.lr": 1e-2,
        "train.warmup_steps": 0,
        "train.save_every": 8,  # the last step's checkpoint only: these tests use its adapter, not a resume
        "train.eval_every": 4,
        "train.deepspeed.stage": stage,
        "scaling.num_workers": 2,
        "run.storage_path": str(runs_root),
        "run.name": name,
        "run.max_failures": 0,
    }


def test_zero3_with_4bit_base_trains_and_shards_the_base(ray_session, tiny_model_dir, runs_root, prepared):
    over = _nf4_overrides(tiny_model_dir, runs_root, "z3", 3)
    cfg = preflight(load_config(None, overrides=over))
    result = fit(cfg, prepared)
    _losses_drop(result.run_dir)
    start = json.loads((result.run_dir / "events.jsonl").read_text().splitlines()[0])
    print("ZeRO-3 base-weight residency on rank 0:", start)
    # ZeRO-3 partitions the packed 4-bit weights (bf16 quant storage): each of 2 ranks holds about half.
    assert start["base_numel_local"] < 0.6 * start["base_numel_full"], start
    assert 0 < start["base4bit_numel_local"] < 0.6 * start["base4bit_numel_full"], start
    # The adapter is gathered from the ZeRO-3 partitions: full shapes, trained values, and it
    # reproduces the run's eval loss on a freshly loaded 4-bit base (bf16 tolerance).
    from peft import PeftModel

    from raysft.pipeline.models.load import load_base_model

    weights = adapter(result.run_dir)
    b = next(v for k, v in weights.items() if "q_proj.lora_B" in k)
    assert b.shape == (64, 8) and b.abs().max() > 0
    model = PeftModel.from_pretrained(load_base_model(cfg.model), result.adapter_path)
    assert _eval_loss(model, prepared.eval_dir) == pytest.approx(result.metrics["eval_loss"], rel=1e-2)


@pytest.mark.ray
def test_a_step_never_waits_for_the_controllers_poll(ray_session, tiny_model_dir, runs_root, prepared, monkeypatch):
    """Ray Train takes a worker's reports from a queue of one, one per controller poll: a report every step capped
    a run at one step per poll (0.93 s a step of the tiny model under raysft's 1 s poll). With a 2 s poll, 16 steps
    of a few ms each now take seconds, not the 30 s the poll would make them; metrics.jsonl still has every step,
    and the run ends at its last step's checkpoint."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")
    cfg = fp32_cfg(tiny_model_dir, runs_root, "no-poll-wait", 2, 1, 1, **{"train.save_every": 1000})
    result = fit(cfg, prepared)
    log = events(result.run_dir)
    start = [e["time"] for e in log if e["event"] == "start"]
    saved = [(e["step"], e["time"]) for e in log if e["event"] == "checkpoint"]
    assert len(start) == 1 and [step for step, _ in saved] == [16], (start, saved)
    assert saved[-1][1] - start[0] < 12, f"16 steps took {saved[-1][1] - start[0]:.1f} s: steps wait for the poll"
    assert [r["step"] for r in read_metrics(result.run_dir)] == list(range(1, 17))


def test_python_api_zero2_4bit_end_to_end(ray_session, tiny_model_dir, runs_root, tmp_path, monkeypatch):
    """raysft.pipeline.train on a chat JSONL through the data plan; no secret reaches the run folder."""
    import random

    from raysft.pipeline import train

    rng = random.Random(0)
    with (tmp_path / "chat.jsonl").open("w") as f:
        for _ in range(40):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"what is {a} plus {b}"},
                            {"role": "assistant", "content": f"the answer is {a + b} #### {a + b}"},
                        ]
                    }
                )
                + "\n"
            )
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken123")
    monkeypatch.setenv("WANDB_API_KEY", "wandbSECRETkey456")
    over = _nf4_overrides(tiny_model_dir, runs_root, "api", 2)
    over.update(
        {
            "data.train": str(tmp_path / "chat.jsonl"),
            "data.eval_split": 0.2,
            "data.max_seq_len": 256,
            "data.cache_dir": str(tmp_path / "cache"),
            "train.max_steps": None,
            "train.epochs": 2,
        }
    )
    result = train(load_config(None, overrides=over))
    assert result.adapter_path == result.run_dir / "adapter" and result.adapter_path.is_dir()
    assert result.metrics["eval_loss"] > 0 and "eval_ppl" in result.metrics
    json.dumps(result.summary())
    _losses_drop(result.run_dir)
    for path in result.run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"SECRETtoken" not in data and b"SECRETkey" not in data, path
    # Weights a user gets are safetensors; no pickle in the adapter.
    assert {p.suffix for p in result.adapter_path.iterdir()} <= {".json", ".safetensors", ".md"}
