"""Job submission against a real local Ray head: submit, --wait, status, logs, stop, failures, auth.

The head is the suite's shared one (conftest.ray_head, local_processes.start_head): `ray start --head --block` in
its own session and temp dir, with token authentication, started once for test_storage_s3's submit test and this
module (each `ray start` costs about 20 s on a 2-core machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_processes import free_port

# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def head(ray_head):
    """The suite's shared head (conftest.ray_head): it also ran test_storage_s3's job."""
    return ray_head


def raysft(
    args: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the real `raysft` command line in a fresh process (as a user would)."""
    return subprocess.run(
        [sys.executable, "-m", "raysft.pipeline.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_id_of(proc: subprocess.CompletedProcess) -> str:
    for line in proc.stdout.splitlines():
        if line.startswith("Submitted job "):
            return line.split()[2]
    raise AssertionError(f"no job id in output:\n{proc.stdout}\n{proc.stderr}")


def write_project(root: Path, model_dir: Path | None, storage: Path, rows: int = 24) -> Path:
    """A user's project folder: a config, a small chat data set, and things that must not be shipped."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    with open(root / "data" / "train.jsonl", "w") as f:
        for i in range(rows):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"what is {i} plus {i}?"},
                            {"role": "assistant", "content": f"the answer is {2 * i}."},
                        ]
                    }
                )
                + "\n"
            )
    (root / ".env").write_text("HF_TOKEN=hf_do_not_ship\n")
    (root / "runs").mkdir(exist_ok=True)
    (root / "runs" / "old.txt").write_text("old run output\n")
    cfg = {
        "model": {
            "name_or_path": str(model_dir) if model_dir else "missing-model",
            "quantization": "nf4",
            "compute_dtype": "float32",
            "dtype": "float32",
            "gradient_checkpointing": False,
        },
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": "data/train.jsonl", "max_seq_len": 256, "num_tokenizer_actors": 1},
        "train": {
            "max_steps": 3,
            "save_every": 2,
            "eval_every": 100,
            "deepspeed": {"stage": 0},
            "logging": {"tensorboard": False},
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},  # 2 workers across nodes: test_cluster_multinode.py
        "run": {"name": "tiny-job", "storage_path": str(storage), "max_failures": 0},
    }
    import yaml

    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "tiny.yaml"


# ---------------------------------------------------------------- no cluster needed


def test_unreachable_cluster_is_one_clear_sentence(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    url = f"http://127.0.0.1:{free_port()}"
    for args in (
        ["status", "raysft-x", "--address", url],
        ["logs", "raysft-x", "--address", url],
        ["stop", "raysft-x"],
        ["submit", str(write_project(tmp_path, None, tmp_path / "runs")), "--wait"],
    ):
        if args[0] == "stop":
            env_used = dict(env, RAY_ADDRESS=url)  # RAY_ADDRESS is honoured
        else:
            env_used = env
        proc = raysft(args, env=env_used, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("raysft: error: "), proc.stderr
        if args[0] == "submit":
            assert "No cluster address" in lines[0]
        else:
            assert f"Cannot reach the Ray dashboard at {url}" in lines[0]


def test_bad_config_fails_before_anything_is_submitted(tmp_path):
    cfg = write_project(tmp_path, None, tmp_path / "runs")
    proc = raysft(
        ["submit", str(cfg), "--address", f"http://127.0.0.1:{free_port()}", "--set", "train.lr=-1"],
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "Cannot reach" not in proc.stderr


# ---------------------------------------------------------------- against a real head


@pytest.mark.ray
def test_token_cluster_without_token_is_refused_clearly(head, tmp_path):
    proc = raysft(["status", "raysft-nope", "--address", head.url], env=head.client_env(token=False), timeout=120)
    assert proc.returncode == 2
    assert "requires token authentication" in proc.stderr, proc.stderr
    # Ray's own mode switch works too: RAY_AUTH_MODE=token + the token; and a job that does not exist.
    proc = raysft(["status", "raysft-nope", "--address", head.url], env=head.client_env(mode="token"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"raysft: error: No job raysft-nope on the Ray cluster at {head.url}."


@pytest.mark.ray
def test_failing_job_shows_its_error_and_wait_exits_nonzero(head, tmp_path, tiny_model_dir):
    cfg = write_project(tmp_path / "proj", tiny_model_dir, tmp_path / "runs")
    env = head.client_env()
    proc = raysft(
        ["submit", str(cfg), "--address", head.url, "--wait", "--set", "data.train=data/missing.jsonl"],
        env=env,
        cwd=tmp_path / "proj",
        timeout=300,
    )
    job = job_id_of(proc)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"raysft: error: job {job} failed" in proc.stderr
    assert "missing.jsonl" in proc.stdout  # the streamed logs carry the job's own error sentence

    env["RAY_ADDRESS"] = head.url  # RAY_ADDRESS is honoured by status/logs
    logs = raysft(["logs", job], env=env, timeout=120)
    assert logs.returncode == 0
    assert "raysft: error:" in logs.stdout and "missing.jsonl" in logs.stdout, logs.stdout
    assert "Traceback" not in logs.stdout  # a user error is one sentence, not a stack trace
    status = raysft(["status", job], env=env, timeout=120)
    assert status.returncode == 0 and status.stdout.startswith(f"{job}: FAILED"), status.stdout


@pytest.mark.ray
def test_stop_a_running_job(head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})
    job = client.submit_job(entrypoint="sleep 300")
    env = dict(head.client_env(), RAY_ADDRESS=head.url)
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job)) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    proc = raysft(["stop", job], env=env, timeout=120)
    assert proc.returncode == 0 and f"Job {job} stopped: STOPPED." in proc.stdout, proc.stdout + proc.stderr
    assert raysft(["status", job], env=env, timeout=120).stdout.strip() == f"{job}: STOPPED"
    again = raysft(["stop", job], env=env, timeout=120)
    assert again.returncode == 0 and "had already ended: STOPPED" in again.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_submit_tiny_training_succeeds(head, tmp_path, tiny_model_dir):
    proj = tmp_path / "proj"
    cfg = write_project(proj, tiny_model_dir, tmp_path / "runs")
    env = dict(head.client_env(), RAYSFT_TEST_SECRET="s3cr3t-value")
    proc = raysft(
        ["submit", str(cfg), "--address", head.url, "--wait", "--env", "RAYSFT_TEST_SECRET"],
        env=env,
        cwd=proj,
        timeout=600,
    )
    job = job_id_of(proc)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"Job {job} succeeded." in proc.stdout and f"Dashboard: {head.url}/#/jobs/{job}" in proc.stdout

    # the run landed in run.storage_path with its adapter, metrics and data ledger
    run_dir = tmp_path / "runs" / "tiny-job"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    steps = [json.loads(line)["step"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    env["RAY_ADDRESS"] = head.url
    # status and logs are independent reads of the ended job: two clients at once (each a fresh Python process)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        status = pool.submit(raysft, ["status", job], env=env, timeout=120)
        logs = pool.submit(raysft, ["logs", job, "--follow"], env=env, timeout=120)  # follows a finished job to its end
        status, logs = status.result(), logs.result()
    assert status.stdout.strip() == f"{job}: SUCCEEDED", status.stderr
    assert logs.returncode == 0 and "step 3/3" in logs.stdout

    # what reached the cluster: only the named secret, as an env var; no .env file, no old run outputs
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"}).get_job_info(job)
    shipped = dict(info.runtime_env["env_vars"])
    recovery = {k: shipped.pop(k) for k in list(shipped) if k.startswith("RAY_TRAIN_")}  # pipeline/ray_recovery.py
    assert shipped == {"RAYSFT_TEST_SECRET": "s3cr3t-value"}, recovery
    # This job's package (other tests' jobs ship other packages: only what each config references).
    package = info.runtime_env["working_dir"].rsplit("/", 1)[-1].removesuffix(".zip")
    unpacked = [
        p
        for p in head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*")
        if p.name == package and (p / "tiny.yaml").is_file()
    ]
    assert unpacked, "the job's working directory was not found on the head"
    for d in unpacked:
        names = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
        assert "data/train.jsonl" in names and "raysft_job.yaml" in names and "raysft/pipeline/cli.py" in names
        assert ".env" not in names and not any(n.startswith("runs/") for n in names)
