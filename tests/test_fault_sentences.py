"""Every probed fault ends in one sentence and a meaningful exit code: 2 bad input, 130 Ctrl-C (issue 13 item 8)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raysft.pipeline import cli
from raysft.pipeline.run_folder import RESOLVED_CONFIG

REPO = Path(__file__).resolve().parents[1]


def write_chat(path: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"what is {a} plus {b}"},
                            {"role": "assistant", "content": f"the answer is {a + b}"},
                        ]
                    }
                )
                + "\n"
            )
    return path


def config_file(tmp_path: Path, model_dir: Path, **more) -> Path:
    cfg = {
        "model": {"name_or_path": str(model_dir), "quantization": "none", "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "train": str(write_chat(tmp_path / "chat.jsonl")),
            "max_seq_len": 128,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"max_steps": 400, "save_every": 2, "eval_every": 1000, "lr": 1e-3, "warmup_steps": 0},
        "scaling": {"num_workers": 1},
        "run": {"name": "probe", "storage_path": str(tmp_path / "runs"), "max_failures": 0},
    }
    for dotted, value in more.items():
        section, key = dotted.split(".", 1)
        cfg.setdefault(section, {})[key] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_sentence(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_deepspeed_json_that_is_not_an_object(tiny_model_dir, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text("[1, 2, 3]")
    cfg = config_file(tmp_path, tiny_model_dir, **{"train.deepspeed": {"config": str(ds)}})
    assert cli.main(["train", str(cfg)]) == 2
    assert one_sentence(capsys) == (
        f"raysft: error: train.deepspeed.config {ds} holds a JSON list, not an object of DeepSpeed settings."
    )


def test_empty_run_name(tiny_model_dir, tmp_path, capsys):
    cfg = config_file(tmp_path, tiny_model_dir)
    assert cli.main(["train", str(cfg), "--set", "run.name="]) == 2
    assert one_sentence(capsys).endswith(
        "has a bad value '': run.name must name a folder under run.storage_path (not empty, not . or ..)."
    )


def test_read_only_run_folder(tiny_model_dir, tmp_path, capsys):
    cfg = config_file(tmp_path, tiny_model_dir)
    run = tmp_path / "runs" / "probe"
    run.mkdir(parents=True)
    mounted = False
    if os.geteuid() == 0:  # root writes through file modes: make the folder a read-only mount instead
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(run)], capture_output=True
            ).returncode
            == 0
        )
        if not mounted:
            pytest.skip("running as root without permission to mount a read-only folder")
    else:
        run.chmod(0o555)
    try:
        assert cli.main(["train", str(cfg)]) == 2
        expected = f"raysft: error: The run folder (run.storage_path/run.name) {run} is not writable."
        assert one_sentence(capsys) == expected
    finally:
        if mounted:
            subprocess.run(["umount", str(run)], check=True)
        run.chmod(0o755)


def _registered_checkpoints(run: Path) -> list[str]:
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        return [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_during_training_then_a_deleted_checkpoint(tiny_model_dir, tmp_path):
    """A real `raysft train`: Ctrl-C (SIGINT to its process group, as a terminal sends it) once two checkpoints
    exist -> exit 130 and one sentence; then with one of them deleted, the rerun -> exit 2 and one sentence."""
    cfg = config_file(tmp_path, tiny_model_dir)
    run = tmp_path / "runs" / "probe"
    command = [sys.executable, "-m", "raysft.pipeline.cli", "train", str(cfg)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while len(_registered_checkpoints(run)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "raysft: interrupted; resume with the same command."
    assert (run / RESOLVED_CONFIG).is_file()

    # The older of the two checkpoints Ray Train's snapshot lists is deleted (the newest stays complete).
    shutil.rmtree(run / min(_registered_checkpoints(run)))
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 2, again.stderr
    assert "Traceback" not in again.stderr, again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"raysft: error: The run folder {run} lists a checkpoint that no longer exists (in "
        "checkpoint_manager_snapshot.json); restore it, or train under a new run.name."
    )


@pytest.mark.ray
def test_bad_rows_and_unreadable_files_through_ray_are_one_sentence(tiny_model_dir, tmp_path):
    """`on_bad_row: error` (raised on the driver) and a file no reader can read (raised in a Ray Data task)
    each end a real `raysft prepare` with their sentence: no Ray traceback below or around it."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(write_chat(tmp_path / "ok.jsonl").read_text() + "{oops\n")
    broken = tmp_path / "broken.arrow"
    broken.write_bytes(b"not an Arrow stream")
    cases = [
        (
            ["--set", f"data.train={bad}", "--set", "data.on_bad_row=error"],
            rf"raysft: error: Bad row in {bad} row 40: malformed_json \(not valid JSON .*\); "
            "data.on_bad_row is error.",
        ),
        (
            ["--set", f"data.train={broken}"],
            rf"raysft: error: Could not read {broken} \(from row 0\): ArrowInvalid: .*",
        ),
    ]
    for overrides, sentence in cases:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "raysft.pipeline.cli",
                "prepare",
                str(config_file(tmp_path, tiny_model_dir)),
                *overrides,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert re.fullmatch(sentence, proc.stderr.strip().splitlines()[-1]), proc.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_that_fails_at_model_load_ends_in_one_sentence(tiny_model_dir, tmp_path):
    """The driver loads only the tokenizer; the worker's model load meets corrupt weights. `raysft train` ends
    with exit 1 and one sentence naming the worker, the cause and the log; the log holds the traceback."""
    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\0" * 64)
    cfg = config_file(tmp_path, broken, **{"train.max_steps": 2})
    proc = subprocess.run(
        [sys.executable, "-m", "raysft.pipeline.cli", "train", str(cfg)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    log = tmp_path / "runs" / "probe" / "raysft.log"
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"raysft: error: Training worker rank 0 failed: \w+: .+ \(the traceback is in {re.escape(str(log))}\)\.", last
    ), proc.stderr
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "load_base_model" in text
