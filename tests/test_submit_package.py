"""What `raysft submit` would upload: no secrets, virtualenvs, caches or run outputs; the code and config it needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raysft.pipeline.config import load_config
from raysft.pipeline.errors import ConfigError
from raysft.pipeline.jobs.package import JOB_CONFIG_NAME, build_job_package, upload_files
from raysft.pipeline.jobs.submit import entrypoint, job_command

REPO = Path(__file__).resolve().parents[1]

KEEP = ["README.md", "train.yaml", "data/train.jsonl", "src/helper.py", "examples/sweep.yaml"]
DROP = [
    ".env", ".env.production", "conf/prod.env", ".envrc", ".netrc", "credentials.json", "gcp-service-account.json",
    ".aws/credentials", ".ssh/id_rsa", "keys/server.pem", "keys/tls.key", "id_ed25519", ".git/config",
    ".venv/lib/python3.11/site-packages/x.py", "venv/bin/python", "src/__pycache__/helper.cpython-311.pyc",
    ".pytest_cache/v/cache", ".cache/huggingface/hub/model.bin", "runs/tiny/checkpoint_000001/state.pt",
    "prepared/train/part-0.parquet", "wandb/run-1/files.txt", "mlruns/0/meta.yaml", "models/base.safetensors",
    "raysft.egg-info/PKG-INFO", "dist/raysft-0.1.0-py3-none-any.whl", ".ray/auth_token", "my_secrets.yaml",
    "notebooks/big.ckpt", "ignored_by_rayignore/data.txt", "ignored_by_gitignore.log",
]


def make_tree(root: Path) -> Path:
    for rel in KEEP + DROP:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"content of {rel}\n")
    (root / ".rayignore").write_text("ignored_by_rayignore/\n")
    (root / ".gitignore").write_text("*.log\n")
    return root


def test_upload_list_excludes_secrets_envs_caches_and_outputs(tmp_path):
    root = make_tree(tmp_path / "proj")
    files = upload_files(root)
    assert sorted(files) == sorted(KEEP + [".rayignore", ".gitignore"])
    assert upload_files(root, extra_excludes=["examples/"]) == sorted(set(files) - {"examples/sweep.yaml"})


def test_this_repository_ships_small_and_clean():
    files = upload_files(REPO)
    assert "pipeline/jobs/submit.py" in files and "pyproject.toml" in files
    bad = [f for f in files if f.startswith((".venv/", ".git/", "runs/")) or "__pycache__" in f or f.endswith(".pyc")]
    assert not bad
    size = sum((REPO / f).stat().st_size for f in files)
    assert size < 20 * 2**20, f"{size} bytes would be uploaded"


def test_job_package_ships_code_config_and_only_named_secrets(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "proj")
    outside = tmp_path / "models" / "base"
    outside.mkdir(parents=True)
    (root / "train.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(outside)},
        "data": {"train": "data/train.jsonl"},
        "run": {"name": "r", "storage_path": "s3://bucket/runs"},
    }))
    cfg = load_config(root / "train.yaml", overrides=["train.lr=3e-4"])
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value")
    monkeypatch.setenv("UNRELATED_SECRET", "must-not-travel")
    monkeypatch.chdir(tmp_path)  # paths in the config resolve against the config file, not the cwd
    pkg = build_job_package(cfg, root, tmp_path / "stage", env_names=["WANDB_API_KEY"])

    # exactly the kept files, the raysft package that runs the job, and the resolved config
    user_files = [f for f in pkg.files if not f.startswith("raysft/") and f != JOB_CONFIG_NAME]
    assert sorted(user_files) == sorted(KEEP + [".rayignore", ".gitignore"])
    assert "raysft/__init__.py" in pkg.files and "raysft/pipeline/trainer.py" in pkg.files
    assert "raysft/kernels/__init__.py" in pkg.files and not any("__pycache__" in f for f in pkg.files)
    shipped = yaml.safe_load((pkg.directory / JOB_CONFIG_NAME).read_text())
    assert shipped["train"]["lr"] == 3e-4  # overrides are resolved into the shipped config
    assert shipped["data"]["train"] == "data/train.jsonl"  # shipped: relative to the job's directory
    assert shipped["model"]["name_or_path"] == str(outside)  # not shipped: absolute, with a note
    assert any("model.name_or_path" in n for n in pkg.notes)

    # secrets: only the named variable, only as an env var, never written into a shipped file
    assert pkg.runtime_env == {"working_dir": str(pkg.directory), "env_vars": {"WANDB_API_KEY": "wandb-secret-value"}}
    for f in pkg.files:
        text = (pkg.directory / f).read_bytes()
        assert b"wandb-secret-value" not in text and b"hf_do_not_ship" not in text and b"must-not-travel" not in text


def test_submitting_from_this_checkout_ships_raysft_once(tmp_path):
    pkg = build_job_package(load_config(None), REPO, tmp_path / "stage")
    assert "raysft/pipeline/jobs/submit.py" in pkg.files and "raysft/kernels/__init__.py" in pkg.files
    # no top-level kernels/ on the job's sys.path to shadow PyPI's `kernels` package
    assert not any(f.startswith(("kernels/", "pipeline/")) for f in pkg.files)
    assert "pyproject.toml" in pkg.files and not any(f.startswith(".venv/") for f in pkg.files)


def test_named_secret_must_exist_here(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "proj")
    monkeypatch.delenv("RAYSFT_NO_SUCH_VAR", raising=False)
    with pytest.raises(ConfigError, match="RAYSFT_NO_SUCH_VAR"):
        build_job_package(load_config(None), root, tmp_path / "stage", env_names=["RAYSFT_NO_SUCH_VAR"])


def test_relative_storage_path_gets_a_note(tmp_path):
    root = make_tree(tmp_path / "proj")
    pkg = build_job_package(load_config(None), root, tmp_path / "stage")
    assert any("run.storage_path" in n for n in pkg.notes)


def test_entrypoint_runs_train_or_tune():
    plain = load_config(None)
    sweep = plain.with_overrides({"tune.search_space": {"lora.r": [4, 8]}})
    assert job_command(plain, None) == "train" and job_command(sweep, None) == "tune"
    assert job_command(sweep, "train") == "train"
    assert entrypoint("tune", "raysft_job.yaml") == "python -m raysft.pipeline.cli tune raysft_job.yaml"
