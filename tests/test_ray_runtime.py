"""raysft's own Ray instance (issue 13 items 6 and 9): where it runs, stale addresses, no orphans, no stale temps.

Every test works under a temporary RAY_TMPDIR (short: Ray's socket paths must stay short), so the real
/tmp/ray/ray_current_cluster and other sessions' clusters are never read, joined or touched; processes are
identified by the marker raysft puts in its Ray processes' environment, never by name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from local_processes import free_port

from raysft.pipeline import ray_orphans
from raysft.pipeline.data import cache

RAYSFT = [sys.executable, "-m", "raysft.pipeline.cli"]


@pytest.fixture
def ray_tmp():
    """A short, private RAY_TMPDIR holding a stale ray_current_cluster (a head that died without `ray stop`)."""
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (root / "ray").mkdir()
    stale = f"127.0.0.1:{free_port()}"
    (root / "ray" / "ray_current_cluster").write_text(stale)
    yield root, stale
    shutil.rmtree(root, ignore_errors=True)


def env_with(ray_tmp: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ray_orphans.MARKER)}
    env.update(RAY_TMPDIR=str(ray_tmp), **more)
    return env


@pytest.fixture(scope="module")
def config(tmp_path_factory, chatml_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("rt")
    chatml_tokenizer.save_pretrained(root / "tok")
    with open(root / "train.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"question": f"what is {i} + {i}", "answer": f"it is {2 * i}"}) + "\n")
    path = root / "cfg.yaml"
    path.write_text(
        f"model: {{name_or_path: {root / 'tok'}}}\n"
        f"data: {{train: {root / 'train.jsonl'}, cache_dir: {root / 'cache'}, max_seq_len: 256, "
        "num_tokenizer_actors: 1}\n"  # one actor: a second only starts up (30 rows are one block)
    )
    return path


def test_a_stale_or_unreachable_address_is_one_sentence_within_30s(config, ray_tmp, tmp_path):
    root, stale = ray_tmp
    for address, source in (
        ("auto", f" (run.address: auto, from {root}/ray/ray_current_cluster)"),
        (stale, " (run.address)"),
    ):
        start = time.monotonic()
        proc = subprocess.run(
            [*RAYSFT, "prepare", str(config), "--set", f"run.address={address}", "--output", str(tmp_path / "out")],
            env=env_with(root),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert time.monotonic() - start < 30
        assert proc.returncode == 2
        *stages, last = proc.stderr.strip().splitlines()  # prepare's console says its stage first, then the sentence
        assert all(line.startswith("[prepare") for line in stages), stages
        assert last == (
            f"raysft: error: Could not reach the Ray cluster at {stale}{source}: nothing answers there "
            "(Connection refused); is the cluster running (a head stopped without `ray stop` leaves a stale address)?"
        )
        assert not (tmp_path / "out").exists()
    (root / "ray" / "ray_current_cluster").unlink()
    proc = subprocess.run(
        [*RAYSFT, "prepare", str(config), "--set", "run.address=auto"],
        env=env_with(root),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "no cluster started with `ray start` is recorded" in proc.stderr


@pytest.mark.ray
def test_unset_address_starts_its_own_instance_never_the_recorded_one(config, ray_tmp, tmp_path):
    """With a stale ray_current_cluster and RAY_ADDRESS both naming a dead head, an unset run.address
    neither hangs nor joins: raysft starts its own instance (its session folder appears under RAY_TMPDIR)."""
    root, stale = ray_tmp
    proc = subprocess.run(
        [*RAYSFT, "prepare", str(config), "--output", str(tmp_path / "out")],
        env=env_with(root, RAY_ADDRESS=stale),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows_read"] == 30
    assert list((root / "ray").glob("session_*"))
    assert (root / "ray" / "ray_current_cluster").read_text() == stale
    assert_quiet_prepare(proc)


RAY_CHATTER = re.compile(
    r"^\[?\d{4}-\d\d-\d\d[ T][\d:,.]+ ?[EWIF] \d+|\bE\d{4} |WARNING|UserWarning|core_worker|raylet|INFO"
)


def assert_quiet_prepare(proc: subprocess.CompletedProcess) -> None:
    """`raysft prepare`'s console (issue 22 item 5): stage lines, the per-source summary, the stats and log paths,
    and stats.json as one line on stdout (not a terminal) in at most 40 lines; none of Ray's start-up chatter
    (token-auth WARNING, core_worker `E` lines, Ray Data UserWarnings, executor INFO lines), which is in the log."""
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) <= 40, "\n".join(lines)
    assert not [line for line in lines if RAY_CHATTER.search(line)], "\n".join(lines)
    console = proc.stderr.splitlines()
    stages = [line.split("] ", 1)[1][:4] for line in console if line.startswith("[prepare")]
    assert stages == ["1/3 ", "2/3 ", "3/3 "], console
    assert any("30 rows read, 30 kept" in line for line in console), console
    log = Path(next(line for line in console if line.startswith("  log ")).split()[-1])
    assert log.is_file() and log.stat().st_size > 0  # Ray's output went there


def test_the_watchdog_kills_what_carries_a_finished_owners_marker():
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    token = ray_orphans.owner_token(owner.pid)
    child = subprocess.Popen(["sleep", "60"], env={**os.environ, ray_orphans.MARKER: token})
    mine = subprocess.Popen(["sleep", "60"], env={**os.environ, ray_orphans.MARKER: ray_orphans.owner_token()})
    orphan = mine
    try:
        assert ray_orphans.marked_processes()[child.pid] == token
        ray_orphans.watch(token, poll_s=0.1, settle_s=0.5)  # returns once the owner ended and its processes are gone
        assert child.wait(timeout=5) == -signal.SIGKILL
        assert owner.wait() == 0
        # The next run's sweep takes a gone owner's processes, not a live owner's (this test's). Only this
        # test's orphan is killed here: other sessions on this machine may have orphans of their own.
        orphan = subprocess.Popen(["sleep", "60"], env={**os.environ, ray_orphans.MARKER: token})
        time.sleep(0.2)
        found = ray_orphans.orphans()
        assert found[orphan.pid] == token and mine.pid not in found
        assert ray_orphans.kill_marked({token}) == [orphan.pid]
        assert orphan.wait(timeout=5) == -signal.SIGKILL and mine.poll() is None
    finally:
        for p in (owner, child, mine, orphan):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_temp_folders_older_than_a_day_are_removed(tmp_path):
    old, fresh = tmp_path / ".tmp-abc-1234", tmp_path / ".tmp-def-5678"
    old_spec = tmp_path / "tokenizers" / "x.123.tmp"
    for d in (old, fresh):
        (d / "train").mkdir(parents=True)
    old_spec.parent.mkdir()
    old_spec.write_text("{}")
    (tmp_path / "keyed-entry").mkdir()
    two_days_ago = time.time() - 2 * 86400
    for p in (old, old_spec, tmp_path / "keyed-entry"):
        os.utime(p, (two_days_ago, two_days_ago))
    assert sorted(cache.remove_stale_temps(tmp_path)) == sorted([old, old_spec])
    assert fresh.is_dir() and (tmp_path / "keyed-entry").is_dir()


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_during_prepare_leaves_no_orphans_after_the_next_run(config, ray_tmp, tmp_path):
    """A real `raysft prepare`, SIGKILLed while its plan runs: its Ray processes (marked with its pid) are gone
    shortly after, its cache temp folder is removed by the next run once a day old, and the next run ends clean."""
    root, _ = ray_tmp
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(300_000):
            f.write(json.dumps({"question": f"what is {i} + {i} " * 5, "answer": f"it is {2 * i} " * 5}) + "\n")
    cache_dir = tmp_path / "cache"
    over = ["--set", f"data.train={big}", "--set", f"data.cache_dir={cache_dir}"]
    proc = subprocess.Popen(
        [*RAYSFT, "prepare", str(config), *over],
        env=env_with(root),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    token = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            token = token or next(
                (t for t in ray_orphans.marked_processes().values() if t.startswith(f"{proc.pid}:")), None
            )
            if token and list(cache_dir.glob(".tmp-*")):  # Ray is up and the plan is writing
                break
            time.sleep(0.2)
        assert proc.poll() is None and token, proc.stderr.read() if proc.poll() is not None else "no Ray processes"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and token in ray_orphans.marked_processes().values():
        time.sleep(0.5)
    assert token not in ray_orphans.marked_processes().values()  # the watchdog ended them with raysft

    (left,) = cache_dir.glob(".tmp-*")
    two_days_ago = time.time() - 2 * 86400
    os.utime(left, (two_days_ago, two_days_ago))
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20)))
    nxt = subprocess.Popen(
        [*RAYSFT, "prepare", str(config), "--set", f"data.train={small}", "--set", f"data.cache_dir={cache_dir}"],
        env=env_with(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = nxt.communicate(timeout=180)
    assert nxt.returncode == 0, err
    assert not left.exists() and not list(cache_dir.glob(".tmp-*"))
    deadline = time.monotonic() + 10  # the next run's own Ray processes end with it too
    while time.monotonic() < deadline and _marked_by(nxt.pid):
        time.sleep(0.5)
    assert not _marked_by(nxt.pid) and not _marked_by(proc.pid)


def _marked_by(pid: int) -> list[int]:
    return [p for p, t in ray_orphans.marked_processes().items() if t.startswith(f"{pid}:")]


@pytest.mark.ray
def test_auto_joins_the_cluster_ray_start_recorded(ray_tmp):
    """run.address: auto joins, on purpose, the head `ray start` recorded in ray_current_cluster (here a real
    head of its own, with token authentication, on free ports). Not the suite's shared head (conftest.ray_head):
    it would idle through test_storage_s3 until its submit test, at about 4 CPU-s a minute, more than its start."""
    from local_processes import start_head

    root, _ = ray_tmp
    head = start_head(num_cpus=1)
    try:
        gcs = head.env["RAY_ADDRESS"]
        (root / "ray" / "ray_current_cluster").write_text(gcs)
        code = (
            "import ray; from raysft.pipeline import ray_runtime; "
            "assert ray_runtime.start('auto', ray_runtime.PREPARE); "
            "print(ray.get_runtime_context().gcs_address); ray_runtime.stop()"
        )
        env = {**head.client_env(mode="token"), "RAY_TMPDIR": str(root)}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1].rsplit(":", 1)[1] == gcs.rsplit(":", 1)[1]  # its GCS port
    finally:
        head.stop()
