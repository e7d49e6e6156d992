"""Run identity: rerunning a run.name resumes, extends or is refused in one sentence naming the keys; run.resume
modes; a refusal changes nothing in the folder; broken Ray snapshots and incomplete checkpoints are set aside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysft.pipeline.config import load_config
from raysft.pipeline.errors import CheckpointError
from raysft.pipeline.training import checkpoint as ck
from raysft.pipeline.training import identity as ri

BASE = {
    "model.name_or_path": "/models/tiny",
    "run.name": "r",
    "train.max_steps": 8,
    "scaling.num_workers": 2,
}


def cfg(**over):
    return load_config(None, overrides={**BASE, **{k.replace("__", "."): v for k, v in over.items()}})


def folder_state(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))
    }


def checkpoint(run_dir: Path, step: int) -> Path:
    d = run_dir / f"checkpoint_{step:06d}"
    d.mkdir(parents=True)
    (d / ck.STATE_FILE).write_text(json.dumps({"step": step, "world_size": 1}))
    ck.write_manifest(d, 0, [d / ck.STATE_FILE])
    return d


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder as a first run of `cfg()` leaves it: run.json, config.yaml, one complete checkpoint."""
    d = tmp_path / "r"
    decision = ri.decide(cfg(), "data-key-1", d, steps_per_epoch=4)
    assert decision.mode == "new" and not d.exists()
    ri.apply(decision, cfg().dump_yaml())
    checkpoint(d, 2)
    return d


def test_same_identity_resumes_from_newest_complete_checkpoint(run_dir):
    d = ri.decide(cfg(), "data-key-1", run_dir, steps_per_epoch=4)
    assert d.mode == "resume" and d.resume_from == str(run_dir / "checkpoint_000002") and not d.notes
    # what may change freely: logging, checkpoint cadence, kernels, the cluster address
    other = cfg(
        train__save_every=3,
        train__eval_every=5,
        train__kernels=True,
        run__address="auto",
        run__max_failures=0,
    )
    assert ri.decide(other, "data-key-1", run_dir, steps_per_epoch=4).mode == "resume"


@pytest.mark.parametrize(
    "over,data_key,named",
    [
        ({}, "data-key-2", "data.prepared_key"),
        ({"model__name_or_path": "/models/other"}, "data-key-1", "model.name_or_path"),
        ({"model__quantization": "none"}, "data-key-1", "model.quantization"),
        ({"lora__r": 8}, "data-key-1", "lora.r"),
        ({"lora__target_modules": ["q_proj"]}, "data-key-1", "lora.target_modules"),
        ({"train__lr": 1e-3}, "data-key-1", "train.lr"),
        ({"train__scheduler": "linear"}, "data-key-1", "train.scheduler"),
        ({"train__seed": 1}, "data-key-1", "train.seed"),
        ({"train__grad_accum": 2}, "data-key-1", "train.global_batch"),
        (
            {"scaling__num_workers": 1, "train__grad_accum": 2},
            "data-key-1",
            "scaling.num_workers",
        ),
        ({"train__deepspeed__stage": 3}, "data-key-1", "train.deepspeed.stage"),
    ],
)
def test_each_differing_key_is_refused_and_nothing_changes(run_dir, over, data_key, named):
    before = folder_state(run_dir)
    with pytest.raises(CheckpointError) as err:
        ri.decide(cfg(**over), data_key, run_dir, steps_per_epoch=4)
    msg = str(err.value)
    assert named in msg and "new run.name" in msg and "\n" not in msg, msg
    assert folder_state(run_dir) == before


def test_longer_run_extends_shorter_is_refused(run_dir):
    d = ri.decide(cfg(train__max_steps=12), "data-key-1", run_dir, steps_per_epoch=4)
    assert d.mode == "extend" and "from 8 to 12 steps" in d.notes[0] and d.record["total_steps"] == 12
    epochs = cfg(train__max_steps=None, train__epochs=3)  # 3 epochs x 4 steps: longer than 8
    assert ri.decide(epochs, "data-key-1", run_dir).mode == "extend"  # steps per epoch from run.json
    with pytest.raises(CheckpointError, match="planned for 8 steps"):
        ri.decide(cfg(train__max_steps=4), "data-key-1", run_dir, steps_per_epoch=4)


def test_resume_modes(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="run.resume is 'never'"):
        ri.decide(cfg(run__resume="never"), "data-key-1", run_dir, steps_per_epoch=4)
    assert ri.decide(cfg(run__resume="never"), "data-key-1", tmp_path / "fresh").mode == "new"
    with pytest.raises(CheckpointError, match="no run named r to resume"):
        ri.decide(cfg(run__resume="must"), "data-key-1", tmp_path / "fresh")
    assert ri.decide(cfg(run__resume="must"), "data-key-1", run_dir).resume_from.endswith("checkpoint_000002")
    (run_dir / "checkpoint_000002" / ck.STATE_FILE).write_text("")  # its only checkpoint is now incomplete
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ri.decide(cfg(run__resume="must"), "data-key-1", run_dir)
    d = ri.decide(cfg(), "data-key-1", run_dir)  # auto: starts over, says why
    assert d.resume_from is None and "skipping checkpoint checkpoint_000002" in d.notes[0]


def test_checkpoints_without_identity_are_refused(tmp_path):
    checkpoint(tmp_path / "old", 2)
    with pytest.raises(CheckpointError, match="no run.json"):
        ri.decide(cfg(), "data-key-1", tmp_path / "old")


def test_truncated_snapshot_and_incomplete_newest_checkpoint_are_set_aside(run_dir, capsys):
    bad = checkpoint(run_dir, 4)
    (bad / ck.STATE_FILE).write_text('{"step": 4, "world')  # a write cut short by a full disk
    (run_dir / ri.RAY_SNAPSHOT).write_text("")
    d = ri.decide(cfg(), "data-key-1", run_dir, steps_per_epoch=4)
    assert d.resume_from == str(run_dir / "checkpoint_000002")
    assert set(d.set_aside) == {bad, run_dir / ri.RAY_SNAPSHOT}
    ri.apply(d, cfg().dump_yaml())
    out = capsys.readouterr().out
    assert "skipping checkpoint checkpoint_000004" in out and "checkpoint_manager_snapshot.json is truncated" in out
    assert not bad.exists() and not (run_dir / ri.RAY_SNAPSHOT).exists()
    assert len(list(run_dir.glob("checkpoint_000004.set-aside-*"))) == 1  # moved, never deleted
    # A snapshot that names the chosen checkpoint is left for Ray to use.
    (run_dir / ri.RAY_SNAPSHOT).write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000002"}})
    )
    assert ri.decide(cfg(), "data-key-1", run_dir).set_aside == []


def test_cli_refuses_a_changed_rerun_before_ray_starts(tiny_model_dir, tmp_path):
    """`raysft train` with another lora.r on an existing run: exit 2, one sentence, folder untouched, no Ray."""
    import subprocess
    import sys

    import yaml

    from raysft.pipeline.data.plan import resolve_inputs
    from raysft.pipeline.run_folder import run_dir_of
    from raysft.pipeline.trainer import preflight

    (tmp_path / "d.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        )
        + "\n"
    )
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model_dir), "quantization": "none"},
                "lora": {"r": 4},
                "data": {"train": str(tmp_path / "d.jsonl")},
                "run": {"name": "cli", "storage_path": str(tmp_path / "runs")},
            }
        )
    )
    first = preflight(load_config(config))
    run = run_dir_of(first)
    ri.apply(ri.decide(first, resolve_inputs(first).key, run), first.dump_yaml())
    checkpoint(run, 2)
    before = folder_state(run)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raysft.pipeline.cli",
            "train",
            str(config),
            "--set",
            "lora.r=8",
            "--set",
            "run.address=127.0.0.1:1",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "lora.r 4 -> 8" in lines[0] and "choose a new run.name" in lines[0], proc.stderr
    assert folder_state(run) == before


def test_an_elastic_run_resumes_at_another_worker_range_with_the_same_global_batch(tmp_path):
    """Elastic checkpoints re-partition to any worker count: the identity holds the global batch, not the count."""
    d = tmp_path / "e"
    first = cfg(scaling__num_workers=[1, 2], train__global_batch_rows=12)  # splits over 1, 2, 3 and 4 workers
    ri.apply(ri.decide(first, "data-key-1", d, steps_per_epoch=4), first.dump_yaml())
    checkpoint(d, 2)
    wider = cfg(scaling__num_workers=[1, 4], train__global_batch_rows=12)
    assert ri.decide(wider, "data-key-1", d, steps_per_epoch=4).mode == "resume"
    for other, named in (
        (cfg(scaling__num_workers=[1, 3], train__global_batch_rows=6), "train.global_batch"),  # another global batch
        (cfg(scaling__num_workers=4, train__global_batch_rows=12), "scaling.num_workers"),  # fixed size: refused
    ):
        with pytest.raises(CheckpointError, match=named):
            ri.decide(other, "data-key-1", d, steps_per_epoch=4)
