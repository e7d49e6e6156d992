"""Checkpoints hold no code and count only when complete: safetensors + JSON engine state with an exact resume
(ZeRO-0/2/3, fp32 and bf16), planted pickles refused without running, manifests, the free-space check."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from local_processes import mounted_tmpfs

from raysft.pipeline.errors import CheckpointError
from raysft.pipeline.training import checkpoint as ck
from raysft.pipeline.training.safe_state import load_tree, save_tree

TESTS = Path(__file__).resolve().parent


ROUNDTRIP_CASES = [(2, "float32", "none"), (3, "float32", "none"), (0, "bfloat16", "none"), (3, "bfloat16", "nf4")]


@pytest.fixture(scope="module")
def roundtrips(tiny_model_dir, tmp_path_factory) -> tuple[dict, str]:
    """checkpoint_roundtrip.py over every case in one fresh process (one DeepSpeed import and gloo group for all):
    {case: its RESULT}, and the process's output for a failure message."""
    out = tmp_path_factory.mktemp("ckpt")
    cases = [f"{stage}:{dtype}:{quantization}" for stage, dtype, quantization in ROUNDTRIP_CASES]
    proc = subprocess.run(
        [sys.executable, str(TESTS / "checkpoint_roundtrip.py"), str(TESTS), str(tiny_model_dir), str(out), *cases],
        capture_output=True,
        check=False,
        text=True,
        timeout=600,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            case, res = line[len("RESULT ") :].split(" ", 1)
            results[case] = json.loads(res)
    return results, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage,dtype,quantization", ROUNDTRIP_CASES)
def test_resume_from_safetensors_state_is_exact(roundtrips, stage, dtype, quantization):
    """DeepSpeed engine state saved by raysft (no torch.save) restores weights, fp32 master, AdamW, schedule;
    the checkpoint holds the LoRA weights and their optimizer state only, nothing of the frozen (or 4-bit) base."""
    results, output = roundtrips
    res = results.get(f"{stage}:{dtype}:{quantization}")
    assert res, output
    assert res["problem"] is None and res["state"]["world_size"] == 1
    assert res["changed"] > 1e-4  # the two steps after the checkpoint really moved the weights
    assert res["diff"] <= 1e-7 and res["lr"][0] == res["lr"][1], res
    # module + adapter (the LoRA weights twice), fp32 master + two AdamW moments: at most 5 per trainable element
    assert res["trainable"] < res["stored"] <= 5 * res["trainable"] + 64 < res["frozen"], res
    assert {Path(f).suffix for f in res["files"]} <= {
        ".safetensors",
        ".json",
        ".yaml",
        ".md",
    }, res["files"]


class _Payload:
    """Unpickling this creates the marker file: what a planted checkpoint file would do on torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": _Payload(marker)}))


def _tiny_checkpoint(directory: Path) -> Path:
    """A complete single-rank checkpoint folder without DeepSpeed: engine-like state, state.json, manifest."""
    files = save_tree(
        {
            "optimizer": {
                "state": {0: {"exp_avg": torch.ones(3)}},
                "param_groups": [{"betas": (0.9, 0.99)}],
            },
            "lr_scheduler": None,
            "global_steps": 2,
        },
        directory / "optim" / "rank0",
    )
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(directory / ck.MODULE_FILE))
    (directory / ck.STATE_FILE).write_text(json.dumps({"step": 2, "world_size": 1}))
    ck.write_manifest(directory, 0, [*files, directory / ck.MODULE_FILE, directory / ck.STATE_FILE])
    return directory


def test_planted_pickle_is_refused_and_never_runs(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "checkpoint_000002")
    assert ck.problem(ckpt) is None
    marker = tmp_path / "pwned"
    for target in (ckpt / "optim" / "rank0.safetensors", ckpt / ck.MODULE_FILE):
        original = target.read_bytes()
        _plant(target, marker)
        # The manifest catches the swap ...
        assert "checksum" in ck.problem(ckpt) or "bytes" in ck.problem(ckpt)
        # ... and an attacker who rewrites the manifest too still gets a refusal, not execution.
        files = [p for p in ckpt.rglob("*") if p.is_file() and "manifest" not in p.parts]
        ck.write_manifest(ckpt, 0, files)
        assert ck.problem(ckpt) is None
        with pytest.raises(CheckpointError, match="never unpickles") as err:
            if target.name == ck.MODULE_FILE:
                ck._load_module_file(target)
            else:
                load_tree(target.with_suffix(""))
        assert "\n" not in str(err.value)
        assert not marker.exists()
        target.write_bytes(original)
        ck.write_manifest(ckpt, 0, files)
    # The payload is live: plain unpickling (what torch.load(weights_only=False) does) would run it.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_state_json_that_is_not_raysft_is_refused(tmp_path):
    save_tree({"a": torch.ones(1)}, tmp_path / "s")
    (tmp_path / "s.json").write_text(json.dumps({"format": "raysft-state-1", "tree": {"object": "os.system"}}))
    with pytest.raises(CheckpointError, match="not a raysft state file"):
        load_tree(tmp_path / "s")
    with pytest.raises(TypeError, match="cannot be stored without pickle"):
        save_tree({"a": object()}, tmp_path / "t")


def test_manifest_finds_truncated_missing_and_foreign_files(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "checkpoint_000002")
    (ckpt / "extra.pt").write_bytes(b"x")
    assert "extra.pt" in ck.problem(ckpt)
    (ckpt / "extra.pt").unlink()
    data = (ckpt / ck.MODULE_FILE).read_bytes()
    (ckpt / ck.MODULE_FILE).write_bytes(data[: len(data) // 2])
    assert "bytes" in ck.problem(ckpt)
    (ckpt / ck.MODULE_FILE).write_bytes(data)
    (ckpt / ck.STATE_FILE).write_text(json.dumps({"step": 2, "world_size": 2}))
    assert "checksum" in ck.problem(ckpt)
    ck.write_manifest(
        ckpt,
        0,
        [p for p in ckpt.rglob("*") if p.is_file() and "manifest" not in p.parts],
    )
    assert ck.problem(ckpt) == "the manifest of rank 1 is missing or unreadable"
    (ckpt / ck.STATE_FILE).write_text("")
    assert "state.json" in ck.problem(ckpt)
    with pytest.raises(CheckpointError, match="not complete"):
        ck.load(None, ckpt, rank=0)


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (root only); skipped where mounting is not allowed."""
    with mounted_tmpfs(tmp_path / "small", "2m") as mnt:
        yield mnt


def test_full_storage_fails_in_one_sentence_before_writing(small_fs):
    (small_fs / "filler").write_bytes(b"\0" * (1 << 20))
    with pytest.raises(CheckpointError) as err:
        ck._check_space(small_fs, 3 << 20, step=4, distributed=False)
    msg = str(err.value)
    assert "MiB free" in msg and "MiB needed" in msg and "checkpoint step 4" in msg and "\n" not in msg
    assert sorted(os.listdir(small_fs)) == ["filler"]


def test_step_of_names():
    assert ck.step_of("/x/checkpoint_000012") == 12 and ck.step_of("checkpoint_000004.set-aside-1") == -1
    assert ck.step_of("") == -1 and ck.step_of(f"checkpoint_{uuid.uuid4().hex}") == -1
