"""What `raysft submit` uploads, by allow-list: the config, what it references, raysft and its requirements,
--include'd paths, and the working folder only on request; never credentials or links leaving the folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysft.pipeline import ray_recovery
from raysft.pipeline.config import load_config
from raysft.pipeline.errors import ConfigError
from raysft.pipeline.jobs.package import (
    JOB_CONFIG_NAME,
    build_job_package,
    walk,
)
from raysft.pipeline.jobs.submit import entrypoint, job_command, local_token

REPO = Path(__file__).resolve().parents[1]

KEEP = [
    "README.md",
    "train.yaml",
    "data/train.jsonl",
    "src/helper.py",
    "examples/sweep.yaml",
]
DROP = [
    ".env",
    ".env.production",
    "conf/prod.env",
    ".envrc",
    ".netrc",
    "credentials.json",
    "gcp-service-account.json",
    ".aws/credentials",
    ".ssh/id_rsa",
    "keys/server.pem",
    "keys/tls.key",
    "id_ed25519",
    ".git/config",
    ".venv/lib/python3.11/site-packages/x.py",
    "venv/bin/python",
    "src/__pycache__/helper.cpython-311.pyc",
    ".pytest_cache/v/cache",
    ".cache/huggingface/hub/model.bin",
    "runs/tiny/checkpoint_000001/state.pt",
    "prepared/train/part-0.parquet",
    "wandb/run-1/files.txt",
    "mlruns/0/meta.yaml",
    "models/base.safetensors",
    "raysft.egg-info/PKG-INFO",
    "dist/raysft-0.1.0-py3-none-any.whl",
    ".ray/auth_token",
    "my_secrets.yaml",
    "notebooks/big.ckpt",
    "ignored_by_rayignore/data.txt",
    "ignored_by_gitignore.log",
]
# Every credential file the probe found in a staged package (issue 13), plus a few relatives.
CREDENTIAL_ZOO = [
    ".npmrc",
    ".pgpass",
    ".s3cfg",
    ".boto",
    ".vault-token",
    ".databrickscfg",
    ".kaggle/kaggle.json",
    ".config/gh/hosts.yml",
    ".huggingface/token",
    "hf_token.txt",
    "token.txt",
    "terraform.tfstate",
    ".bash_history",
    ".zsh_history",
    ".gnupg/pubring.kbx",
    ".gnupg/private-keys-v1.d/k.key",
    ".ENV",
    "keys/deploy_key",
    "putty.ppk",
    "release.jks",
    "conf/.pypirc",
    "deploy/prod.tfstate.backup",
]


def make_tree(root: Path, extra: list[str] = ()) -> Path:
    for rel in [*KEEP, *DROP, *extra]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"content of {rel} hf_do_not_ship\n" if rel not in KEEP else f"content of {rel}\n")
    (root / ".rayignore").write_text("ignored_by_rayignore/\n")
    (root / ".gitignore").write_text("*.log\n!.env\n!token.txt\n")  # a negation cannot re-include a credential
    (root / "train.yaml").write_text(yaml.safe_dump({"data": {"train": "data/train.jsonl"}, "run": {"name": "r"}}))
    return root


def test_working_folder_excludes_credentials_envs_caches_and_outputs(tmp_path):
    root = make_tree(tmp_path / "proj", CREDENTIAL_ZOO)
    files = walk(root)
    assert sorted(files) == sorted(KEEP + [".rayignore", ".gitignore"])
    assert walk(root, extra_excludes=["examples/"]) == sorted(set(files) - {"examples/sweep.yaml"})


def test_symlinks_leaving_the_folder_are_never_followed(tmp_path):
    root = make_tree(tmp_path / "proj")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_secret_material").write_text("PRIVATE hf_do_not_ship\n")
    (outside / "plain.txt").write_text("plain\n")
    os.symlink(outside / "plain.txt", root / "link_to_outside.txt")
    os.symlink(outside, root / "linked_dir")
    os.symlink(root / "README.md", root / "link_inside.md")
    files = walk(root)
    assert "link_inside.md" in files
    assert "link_to_outside.txt" not in files and not any(f.startswith("linked_dir") for f in files)


def test_dry_run_lists_exactly_what_ships_and_no_credential(tmp_path):
    root = make_tree(tmp_path / "proj", CREDENTIAL_ZOO)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("from outside hf_do_not_ship\n")
    os.symlink(outside, root / "link.txt")
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    for extra in ([], ["--working-dir", str(root)]):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "raysft.pipeline.cli",
                "submit",
                str(root / "train.yaml"),
                "--dry-run",
                *extra,
            ],
            capture_output=True,
            check=False,
            text=True,
            cwd=root,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        listed = {line.split(None, 1)[1]: int(line.split(None, 1)[0]) for line in lines[:-1]}
        assert lines[-1].startswith(f"{len(listed)} files, {sum(listed.values())} bytes")
        lowered = {f.lower() for f in listed}
        for cred in [*CREDENTIAL_ZOO, *DROP]:
            assert cred.lower() not in lowered, cred
        assert not any(
            f.startswith(
                (
                    ".gnupg/",
                    ".kaggle/",
                    ".config/",
                    ".huggingface/",
                    "keys/",
                    ".ssh/",
                    ".aws/",
                )
            )
            for f in lowered
        )
        assert "link.txt" not in listed
        assert {
            "train.yaml",
            "data/train.jsonl",
            JOB_CONFIG_NAME,
            "raysft/requirements.txt",
            "raysft/pipeline/cli.py",
            "raysft/kernels/__init__.py",
        } <= set(listed)
        if not extra:  # without --working-dir, the user's other files stay home
            assert "README.md" not in listed and "src/helper.py" not in listed
        else:
            assert {"README.md", "src/helper.py", "examples/sweep.yaml"} <= set(listed)


def test_job_package_ships_code_config_and_only_named_secrets(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "proj")
    outside = tmp_path / "models" / "base"
    outside.mkdir(parents=True)
    ds = tmp_path / "shared" / "ds.json"
    ds.parent.mkdir()
    ds.write_text("{}")
    (root / "train.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(outside)},
                "data": {"train": "data/train.jsonl"},
                "train": {"deepspeed": {"config": str(ds)}},
                "run": {"name": "r", "storage_path": "s3://bucket/runs"},
            }
        )
    )
    cfg = load_config(root / "train.yaml", overrides=["train.lr=3e-4"])
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value")
    monkeypatch.setenv("UNRELATED_SECRET", "must-not-travel")
    monkeypatch.chdir(tmp_path)  # paths in the config resolve against the config file, not the cwd
    pkg = build_job_package(cfg, tmp_path / "stage", env_names=["WANDB_API_KEY"], includes=[root / "src"])

    user_files = [f for f in pkg.files if not f.startswith("raysft/") and f != JOB_CONFIG_NAME]
    assert sorted(user_files) == [
        "data/train.jsonl",
        "inputs/train.deepspeed.config/ds.json",
        "src/helper.py",
        "train.yaml",
    ]
    assert "raysft/__init__.py" in pkg.files and "raysft/pipeline/trainer.py" in pkg.files
    assert "raysft/kernels/__init__.py" in pkg.files and not any("__pycache__" in f for f in pkg.files)
    assert "pathspec>=0.11,<2" in (pkg.directory / "raysft" / "requirements.txt").read_text().split()
    shipped = yaml.safe_load((pkg.directory / JOB_CONFIG_NAME).read_text())
    assert shipped["train"]["lr"] == 3e-4  # overrides are resolved into the shipped config
    assert shipped["data"]["train"] == "data/train.jsonl"  # shipped: relative to the job's directory
    assert shipped["train"]["deepspeed"]["config"] == "inputs/train.deepspeed.config/ds.json"
    assert shipped["model"]["name_or_path"] == str(outside)  # weights are not shipped: absolute, with a note
    assert any("model.name_or_path" in n for n in pkg.notes)

    # secrets: only the named variable, only as an env var, never written into a shipped file
    # and Ray Train's node-loss recovery settings (ray_recovery.py), for the job's controller and workers
    assert pkg.runtime_env == {
        "working_dir": str(pkg.directory),
        "env_vars": {"WANDB_API_KEY": "wandb-secret-value", **ray_recovery.train_env()},
    }
    assert pkg.runtime_env["env_vars"]["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == os.environ.get(
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10"
    )
    for f in pkg.files:
        text = (pkg.directory / f).read_bytes()
        assert b"wandb-secret-value" not in text and b"hf_do_not_ship" not in text and b"must-not-travel" not in text


def test_recovery_settings_ship_with_the_job_and_the_users_own_values_win(tmp_path, monkeypatch):
    """The job's runtime_env carries Ray Train's recovery settings; one set in the submitting shell is shipped
    instead, and the controller's retry budget follows the start timeout in effect (60 s of waiting per failure)."""
    root = make_tree(tmp_path / "proj")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    pkg = build_job_package(load_config(root / "train.yaml"), tmp_path / "s")
    assert pkg.runtime_env["env_vars"] == {
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
    }
    assert ray_recovery.controller_failure_limit(3) == 7  # 8 tries of 30 s: 4 of Ray's 60 s waits
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
    assert ray_recovery.controller_failure_limit(3) == 23 and ray_recovery.controller_failure_limit(0) == 5


def test_naming_a_credential_or_an_outside_path_is_refused(tmp_path):
    root = make_tree(tmp_path / "proj", CREDENTIAL_ZOO)
    cfg = load_config(root / "train.yaml")
    with pytest.raises(ConfigError, match="looks like a credential"):
        build_job_package(cfg, tmp_path / "s1", includes=[root / "keys" / "deploy_key"])
    with pytest.raises(ConfigError, match="looks like a credential"):
        build_job_package(cfg, tmp_path / "s2", includes=[root / ".kaggle"])
    with pytest.raises(ConfigError, match="not inside"):
        build_job_package(cfg, tmp_path / "s3", includes=[tmp_path])
    # an included folder is walked: its credentials stay behind
    pkg = build_job_package(cfg, tmp_path / "s4", includes=[root / "conf"])
    assert not any(f.startswith("conf/") for f in pkg.files)  # conf/ holds only prod.env and .pypirc


def test_submitting_from_this_checkout_ships_raysft_once(tmp_path):
    pkg = build_job_package(load_config(None), tmp_path / "stage", working_dir=REPO)
    assert "raysft/pipeline/jobs/submit.py" in pkg.files and "raysft/kernels/__init__.py" in pkg.files
    # no top-level kernels/ on the job's sys.path to shadow PyPI's `kernels` package
    assert not any(f.startswith(("kernels/", "pipeline/")) for f in pkg.files)
    assert "pyproject.toml" in pkg.files and not any(f.startswith(".venv/") for f in pkg.files)
    assert sum(size for _, size in pkg.sizes()) < 20 * 2**20


def test_named_secret_must_exist_here(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "proj")
    monkeypatch.delenv("RAYSFT_NO_SUCH_VAR", raising=False)
    with pytest.raises(ConfigError, match="RAYSFT_NO_SUCH_VAR"):
        build_job_package(
            load_config(root / "train.yaml"),
            tmp_path / "stage",
            env_names=["RAYSFT_NO_SUCH_VAR"],
        )


def test_relative_storage_path_gets_a_note(tmp_path):
    root = make_tree(tmp_path / "proj")
    pkg = build_job_package(load_config(root / "train.yaml"), tmp_path / "stage")
    assert any("run.storage_path" in n for n in pkg.notes)


def test_token_lookup_follows_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert local_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert local_token() == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert local_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert local_token() == "from-env"


def test_entrypoint_runs_train_or_tune():
    plain = load_config(None)
    sweep = plain.with_overrides({"tune.search_space": {"lora.r": [4, 8]}})
    assert job_command(plain, None) == "train" and job_command(sweep, None) == "tune"
    assert job_command(sweep, "train") == "train"
    assert entrypoint("tune", "raysft_job.yaml") == "python -m raysft.pipeline.cli tune raysft_job.yaml"


def test_weighted_sources_are_each_shipped(tmp_path):
    root = make_tree(tmp_path / "proj")
    other = tmp_path / "elsewhere" / "extra.jsonl"
    other.parent.mkdir()
    other.write_text('{"prompt": "a", "completion": "b"}\n')
    (root / "mix.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"train": [{"path": "data/train.jsonl", "weight": 1}, {"path": str(other), "weight": 3}]},
                "run": {"name": "r", "storage_path": "s3://bucket/runs"},
            }
        )
    )
    pkg = build_job_package(load_config(root / "mix.yaml"), tmp_path / "stage")
    assert "data/train.jsonl" in pkg.files and "inputs/data.train.1/extra.jsonl" in pkg.files
    shipped = yaml.safe_load((pkg.directory / JOB_CONFIG_NAME).read_text())
    assert [s["path"] for s in shipped["data"]["train"]] == ["data/train.jsonl", "inputs/data.train.1/extra.jsonl"]
    assert [s["weight"] for s in shipped["data"]["train"]] == [1, 3]
