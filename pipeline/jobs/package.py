"""What a submitted job ships: a staged working_dir (project files, raysft, resolved config) + env vars.

The job's working directory on the cluster is a staged copy of the user's working directory with
everything secret or bulky left out (`.env` files, credentials, keys, virtualenvs, caches, run
outputs, model weights), plus the `raysft` package itself (so the cluster runs the code the user
has here) and the resolved config. Secrets reach the job only as environment variables the user
names with `--env`; nothing is read from `.env` files.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from raysft.pipeline.config import Config, get_dotted, set_dotted
from raysft.pipeline.errors import ConfigError, ClusterError

# Same gitignore-style matcher Ray applies to runtime_env "excludes" (ray is pinned to 2.60.0).
from ray._private.thirdparty.pathspec import PathSpec

JOB_CONFIG_NAME = "raysft_job.yaml"
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # Ray keeps packages in the GCS: big files belong on shared storage

# gitignore syntax; a trailing "/" matches directories only.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    # secrets: dotenv files, cloud credentials, keys, tokens
    ".env", ".env.*", "*.env", ".envrc", ".netrc", ".pypirc", ".git-credentials",
    "credentials", "credentials.*", "*credentials*.json", "*service-account*.json", "*secret*",
    ".aws/", ".azure/", ".gcloud/", ".config/gcloud/", ".ssh/", ".kube/", ".docker/", ".ray/",
    "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*", "id_ecdsa*", "*.token", "auth_token",
    # version control and virtualenvs
    ".git/", ".hg/", ".svn/", ".venv/", "venv/", "virtualenv/", ".conda/", "site-packages/",
    # caches and build products
    "__pycache__/", "*.pyc", "*.pyo", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".cache/",
    ".ipynb_checkpoints/", ".tox/", ".nox/", "*.egg-info/", "build/", "dist/", ".whl/", "node_modules/",
    ".raysft_cache/", ".DS_Store",
    # run outputs, experiment trackers, model weights
    "runs/", "prepared/", "outputs/", "checkpoints/", "wandb/", "mlruns/", "lightning_logs/",
    "ray_results/", ".models/", "*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "*.ckpt",
)

# Config fields that may name local files or folders (rewritten so they resolve on the cluster).
_PATH_FIELDS = ("model.name_or_path", "model.tokenizer", "data.train", "data.eval", "train.deepspeed.config")


@dataclass
class JobPackage:
    """A staged job directory and the runtime_env that ships it."""

    directory: Path
    files: list[str]  # paths relative to `directory` that Ray will upload
    runtime_env: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # one-line warnings for the user


def exclude_spec(root: Path, extra: Iterable[str] = ()) -> PathSpec:
    """Default excludes + the root's .gitignore and .rayignore + the user's own patterns."""
    lines = list(DEFAULT_EXCLUDES)
    for name in (".gitignore", ".rayignore"):
        f = root / name
        if f.is_file():
            lines += f.read_text().splitlines()
    lines += list(extra)
    return PathSpec.from_lines("gitwildmatch", lines)


def upload_files(root: str | os.PathLike, extra_excludes: Iterable[str] = ()) -> list[str]:
    """Relative POSIX paths of the files under `root` a job would ship, sorted; excluded folders are pruned."""
    root = Path(root).resolve()
    spec = exclude_spec(root, extra_excludes)
    kept: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not spec.match_file(prefix + d + "/")
                             and not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            rel = prefix + name
            if not spec.match_file(rel) and os.path.isfile(os.path.join(dirpath, name)):
                kept.append(rel)
    return sorted(kept)


def _raysft_sources() -> dict[str, Path]:
    """The installed raysft halves (editable or not): import name -> source folder."""
    import raysft.kernels
    import raysft.pipeline

    return {"pipeline": Path(raysft.pipeline.__file__).parent, "kernels": Path(raysft.kernels.__file__).parent}


def _ship_paths(cfg: Config, root: Path, shipped: set[str], notes: list[str]) -> dict[str, Any]:
    """The config as a dict with local paths made valid in the job's working directory."""
    data = cfg.to_dict()
    for key in _PATH_FIELDS:
        value = get_dotted(data, key)
        if not isinstance(value, str) or "://" in value:
            continue
        local = Path(cfg.resolve_path(value)).expanduser()
        if not local.exists():
            continue  # a hub id or a path that only exists on the cluster
        local = local.resolve()
        try:
            rel = local.relative_to(root).as_posix()
        except ValueError:
            rel = None
        inside = rel is not None and (rel in shipped or any(f.startswith(rel + "/") for f in shipped))
        if inside:
            set_dotted(data, key, rel)
        else:
            set_dotted(data, key, str(local))
            notes.append(f"{key} is {local}, which is not shipped: it must exist at that path on the cluster's nodes.")
    storage = data["run"]["storage_path"]
    if "://" not in storage and not os.path.isabs(storage):
        notes.append(f"run.storage_path '{storage}' is relative, so runs land in the job's temporary working "
                     "directory on the cluster; use a shared filesystem path or s3://, gs:// for results to keep.")
    return data


def build_job_package(cfg: Config, working_dir: str | os.PathLike, staging: str | os.PathLike,
                      env_names: Iterable[str] = (), extra_excludes: Iterable[str] = ()) -> JobPackage:
    """Stage `working_dir` (filtered), raysft and the resolved config in `staging`; return the runtime_env."""
    import yaml

    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise ConfigError(f"Working directory {root} does not exist.")
    dest = Path(staging)
    dest.mkdir(parents=True, exist_ok=True)
    sources = _raysft_sources()
    # Submitting from a raysft checkout: its pipeline/ and kernels/ travel as raysft/ below; shipped
    # again at the top they would shadow PyPI's `kernels` (which transformers probes) on the job's path.
    own = [f"/{name}/" for name, src in sources.items() if src.resolve().parent == root]
    files = upload_files(root, [*extra_excludes, *own])
    total = 0
    for rel in files:
        total += (root / rel).stat().st_size
        if total > MAX_UPLOAD_BYTES:
            biggest = max(files, key=lambda r: (root / r).stat().st_size)
            raise ClusterError(f"The job's working directory {root} holds over {MAX_UPLOAD_BYTES >> 20} MiB to upload "
                               f"(largest: {biggest}); exclude it with --exclude or put it on shared storage.")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)

    # raysft itself, as a regular package that wins over any install on the cluster's nodes.
    pkg = dest / "raysft"
    if pkg.exists():
        raise ConfigError(f"Working directory {root} has its own 'raysft' folder, which would shadow the shipped package.")
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""raysft, shipped with a Ray job by `raysft submit`."""\n')
    for name, src in sources.items():
        for rel in upload_files(src):
            (pkg / name / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, pkg / name / rel)

    notes: list[str] = []
    data = _ship_paths(cfg, root, set(files), notes)
    (dest / JOB_CONFIG_NAME).write_text(yaml.safe_dump(data, sort_keys=False))

    env_vars = {}
    for name in env_names:
        if name not in os.environ:
            raise ConfigError(f"Environment variable {name} named by --env is not set here.")
        env_vars[name] = os.environ[name]
    runtime_env: dict[str, Any] = {"working_dir": str(dest)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    shipped = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    return JobPackage(directory=dest, files=shipped, runtime_env=runtime_env, notes=notes)
