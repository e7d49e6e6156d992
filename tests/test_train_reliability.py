"""A full disk, a truncated Ray snapshot and a half-written checkpoint on a real Ray Train run (tmpfs storage):
one sentence, nothing half-saved, then a resume from the last complete checkpoint once there is space again."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from audit import check_exactly_once
from local_processes import mounted_tmpfs
from train_fixtures import make_prepared

from raysft.pipeline.config import load_config
from raysft.pipeline.errors import CheckpointError
from raysft.pipeline.run_folder import read_metrics, run_dir_of
from raysft.pipeline.trainer import build_trainer, finish_run, fit, preflight
from raysft.pipeline.training import checkpoint as ck

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "store", "64m") as mnt:
        yield mnt


def _resize(mnt: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mnt)], check=True)


def _cfg(model_dir, storage, max_steps, **more):
    over = {
        "model.name_or_path": str(model_dir),
        "model.quantization": "none",
        "model.dtype": "float32",
        "lora.dropout": 0.0,
        "lora.r": 4,
        "lora.alpha": 8,
        "train.max_steps": max_steps,
        "train.lr": 5e-3,
        "train.warmup_steps": 1,
        "train.save_every": 2,
        "train.eval_every": 100,
        "train.micro_batch_size": 1,
        "train.grad_accum": 2,
        "scaling.num_workers": 2,
        "run.storage_path": str(storage),
        "run.name": "disk",
        "run.max_failures": 0,
    }
    over.update(more)
    return preflight(load_config(None, overrides=over))


def test_full_disk_then_resume_from_last_good_checkpoint(ray_session, tiny_model_dir, tmpfs, tmp_path, capsys):
    prepared = make_prepared(tmp_path / "packed", n_train=24, n_eval=0, per_row=3)  # 8 rows: 2 steps per epoch
    run_dir = tmpfs / "disk"
    first = _cfg(tiny_model_dir, tmpfs, 2)
    finish_run(first, fit(build_trainer(first, prepared), run_dir_of(first)))
    good = run_dir / "checkpoint_000002"
    assert ck.problem(good) is None

    # A rerun with another LoRA shape is refused before any worker starts, and changes nothing.
    before = sorted((p.relative_to(run_dir).as_posix(), p.stat().st_size) for p in run_dir.rglob("*"))
    with pytest.raises(CheckpointError, match=r"lora.r 4 -> 8"):
        build_trainer(_cfg(tiny_model_dir, tmpfs, 2, **{"lora.r": 8}), prepared)
    assert sorted((p.relative_to(run_dir).as_posix(), p.stat().st_size) for p in run_dir.rglob("*")) == before

    # Extend to 4 steps with the disk (almost) full: the save at step 4 stops in one sentence, before upload.
    longer = _cfg(tiny_model_dir, tmpfs, 4)
    _resize(tmpfs, shutil.disk_usage(tmpfs).used + (1 << 20))
    with pytest.raises(CheckpointError) as err:
        fit(build_trainer(longer, prepared), run_dir_of(longer))
    msg = str(err.value)
    assert "Not enough space" in msg and "MiB free" in msg and "checkpoint step 4" in msg and "\n" not in msg, msg
    assert not (run_dir / "checkpoint_000004").exists() and ck.problem(good) is None

    # What the probe found after a real ENOSPC: a 0-byte Ray snapshot and a half-written newer checkpoint.
    _resize(tmpfs, 64 << 20)
    (run_dir / "checkpoint_manager_snapshot.json").write_bytes(b"")
    partial = run_dir / "checkpoint_000004"
    shutil.copytree(good, partial)
    (partial / ck.STATE_FILE).write_text(json.dumps({"step": 4, "world_size": 2}))
    (partial / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    capsys.readouterr()
    result = finish_run(longer, fit(build_trainer(longer, prepared), run_dir_of(longer)))
    out = capsys.readouterr().out
    assert "skipping checkpoint checkpoint_000004" in out and "checkpoint_manager_snapshot.json is truncated" in out
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]  # events.jsonl also holds the reader's counters
    assert [s["step"] for s in starts][-1] == 2, starts  # resumed from the last complete checkpoint
    ledger = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ledger] == [1, 2, 3, 4]
    check_exactly_once(ledger)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert ck.problem(run_dir / "checkpoint_000004") is None and result.adapter_path.is_dir()
    assert list(run_dir.glob("checkpoint_000004.set-aside-*"))  # the broken one was moved aside, not deleted
