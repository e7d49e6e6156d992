"""The driver's console: the lines it makes from a run folder (progress with ETA, checkpoints, recoveries),
the tqdm bar on a terminal, and the routing of all other output into the run's log file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from raysft.pipeline.console import Console, PrepareConsole, RunFollower, format_eta


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _step(n: int, **more) -> dict:
    return {"step": n, "loss": 2.0 / n, "lr": 1e-3, "tokens_per_s": 150.0, **more}


def test_follower_shows_plan_steps_eta_checkpoints_and_one_sentence_per_recovery(
    tmp_path,
):
    out = io.StringIO()
    follower = RunFollower(tmp_path, Console(out, bar=False))
    t0 = time.time()
    _append(
        tmp_path / "events.jsonl",
        {
            "time": t0 - 10,
            "event": "start",
            "step": 0,
            "world_size": 2,
            "total_steps": 20,
            "zero_stage": 2,
        },
    )
    for n in (1, 2):
        _append(tmp_path / "metrics.jsonl", _step(n))
    follower.poll()
    _append(tmp_path / "metrics.jsonl", _step(3, eval_loss=1.5))
    (tmp_path / "checkpoint_000003").mkdir()
    _append(
        tmp_path / "failures.jsonl",
        {
            "time": t0,
            "event": "worker_failure",
            "what": "worker rank 1 on node 10.0.0.7 lost (ActorDiedError)",
        },
    )
    follower.poll()
    _append(
        tmp_path / "events.jsonl",
        {"time": t0, "event": "start", "step": 3, "world_size": 2, "total_steps": 20},
    )
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(_step(4)) + "\n" + '{"step": 5, "lo')  # a line still being written
    follower.poll()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  training 20 steps on 2 worker(s) (ZeRO-2)")
    assert lines[1].startswith("  step 1/20  loss 2.0000  lr 1.00e-03  150 tok/s  ETA ")
    assert lines[3].endswith("eval_loss 1.5000 @3") and "step 3/20" in lines[3]
    assert lines[4] == f"  checkpoint saved: step 3 -> {tmp_path / 'checkpoint_000003'}"
    assert lines[5] == (
        "  recovered: worker rank 1 on node 10.0.0.7 lost (ActorDiedError) at step 3; "
        "resumed from step 3 on 2 worker(s)."
    )
    assert "step 4/20" in lines[6] and "eval_loss 1.5000 @3" in lines[6] and len(lines) == 7
    eta = float(lines[1].split("ETA ")[1][:2]) * 60 + float(lines[1].split("ETA ")[1][3:5])
    assert 150 <= eta <= 200  # 10 s for step 1 -> 19 steps left at 10 s each (plus test time)


def test_tqdm_bar_on_a_terminal():
    out = io.StringIO()
    con = Console(out, bar=True)
    for n in range(1, 4):
        con.progress(_step(n), 3, 1.0, (2, 1.25) if n >= 2 else None)
    con.line("checkpoint saved: step 3")
    con.close()
    text = out.getvalue()
    assert "3/3" in text and "eval_loss 1.2500 @2" in text and "checkpoint saved: step 3" in text
    assert format_eta(3725) == "1:02:05" and format_eta(65) == "01:05" and format_eta(None) == "--:--"


def test_prepare_console_stage_lines_and_rows_bar_or_lines():
    """`raysft prepare`'s console: numbered stage lines; the data plan's batches as a rows bar on a terminal
    (closed before the next stage line), as a plain line at most every LINE_EVERY_S elsewhere."""
    for bar in (True, False):
        out = io.StringIO()
        shown = PrepareConsole(Console(out, bar=bar), "data d.jsonl")
        shown.LINE_EVERY_S = 0.0
        shown("inputs", files=2, key="k1")
        shown("inputs", files=2, key="k1")  # resolved again (train's preflight): said once
        shown("run", files=2, actors=1)
        shown("batch", rows=10, tokens=500)
        shown("batch", rows=30, tokens=1500)
        shown("written", out_dir="x")
        shown.stage(3, "written: x")
        lines = [x for x in out.getvalue().replace("\r", "\n").splitlines() if x.strip()]
        stages = [x.split("] ", 1)[1] for x in lines if x.startswith("[prepare")]
        assert stages == [
            "1/3 data d.jsonl: 2 file(s), cache key k1",
            "2/3 tokenizing and packing 2 file(s) with 1 tokenizer actor(s)",
            "3/3 written: x",
        ], lines
        assert shown.ran
        if bar:
            assert any("30 rows" in x and "1500 tokens" in x for x in lines), lines
        else:
            assert "  30 rows, 1500 tokens" in lines, lines


def test_console_session_sends_every_kind_of_output_to_the_log(tmp_path):
    """Python prints, C-level writes and a child process all land in the log; only the console reaches the terminal."""
    code = (
        "import os, subprocess, sys\n"
        "from raysft.pipeline.console import console_session\n"
        f"with console_session({str(tmp_path / 'run' / 'raysft.log')!r}, verbose={{v}}) as c:\n"
        "    print('python line'); sys.stderr.write('stderr line\\n')\n"
        "    os.write(2, b'fd line\\n'); subprocess.run(['echo', 'child line'])\n"
        "    c.line('console line')\n"
        "print('after the session')\n"
    )
    for verbose in (False, True):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "raysft.log").unlink(missing_ok=True)
        res = subprocess.run(
            [sys.executable, "-c", code.replace("{v}", str(verbose))],
            capture_output=True,
            check=False,
            text=True,
            env=os.environ,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        shown = (res.stdout + res.stderr).splitlines()
        log = (tmp_path / "run" / "raysft.log").read_text().splitlines()
        hidden = ["python line", "stderr line", "fd line", "child line"]
        assert sorted(log) == sorted(hidden)
        assert sorted(shown) == sorted(["console line", "after the session"] + (hidden if verbose else []))
