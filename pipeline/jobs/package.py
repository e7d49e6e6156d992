"""What a submitted job ships, by allow-list: the config, the files it references, raysft and its requirements,
what the user names with --include, and the user's working folder only when asked for (--working-dir).

Never shipped, wherever they are: files matching the credential deny-list (`CREDENTIAL_PATTERNS`,
matched case-insensitively; naming one explicitly is an error), and symlinks whose target leaves
the folder being shipped. A working folder is also filtered by its .gitignore / .rayignore and by
`BULKY_PATTERNS` (virtualenvs, caches, run outputs, model weights). Secrets reach the job only as
environment variables the user names with --env. `raysft submit --dry-run` prints the exact list.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path
from typing import Any

import yaml
from pathspec import PathSpec

from raysft.pipeline import ray_recovery
from raysft.pipeline.config import Config, get_dotted, set_dotted
from raysft.pipeline.errors import ClusterError, ConfigError

JOB_CONFIG_NAME = "raysft_job.yaml"
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # Ray keeps packages in the GCS: big files belong on shared storage

# gitignore syntax, lower case (paths are lower-cased before matching); a trailing "/" matches folders.
CREDENTIAL_PATTERNS: tuple[str, ...] = (
    # dotenv files and shell state
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    ".*_history",
    ".netrc",
    "_netrc",
    # package-manager, database, cloud and tool credentials
    ".npmrc",
    ".yarnrc",
    ".pypirc",
    ".pgpass",
    ".my.cnf",
    ".s3cfg",
    ".boto",
    ".vault-token",
    ".databrickscfg",
    ".git-credentials",
    ".dockercfg",
    "credentials",
    "credentials.*",
    "*credentials*.json",
    "*service-account*.json",
    "*secret*",
    ".aws/",
    ".azure/",
    ".gcloud/",
    ".config/gcloud/",
    ".config/gh/",
    ".kaggle/",
    ".huggingface/",
    ".cache/huggingface/token",
    ".ssh/",
    ".gnupg/",
    ".kube/",
    ".docker/",
    ".ray/",
    ".terraform/",
    "*.tfstate",
    "*.tfstate.*",
    "*.tfvars",
    # tokens
    "token",
    "token.txt",
    "*_token",
    "*_token.txt",
    "*-token",
    "*-token.txt",
    "*.token",
    "hf_token*",
    "auth_token",
    # keys and keystores
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.ppk",
    "*.jks",
    "*.keystore",
    "*.asc",
    "*.gpg",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*_key",
    "deploy_key*",
    "keys/",
    "secrets/",
)
BULKY_PATTERNS: tuple[str, ...] = (
    ".git/",
    ".hg/",
    ".svn/",
    ".venv/",
    "venv/",
    "virtualenv/",
    ".conda/",
    "site-packages/",
    "__pycache__/",
    "*.pyc",
    "*.pyo",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".cache/",
    ".ipynb_checkpoints/",
    ".tox/",
    ".nox/",
    "*.egg-info/",
    "build/",
    "dist/",
    ".whl/",
    "node_modules/",
    ".raysft_cache/",
    ".DS_Store",
    "runs/",
    "prepared/",
    "outputs/",
    "checkpoints/",
    "wandb/",
    "mlruns/",
    "lightning_logs/",
    "ray_results/",
    ".models/",
    "*.safetensors",
    "*.bin",
    "*.gguf",
    "*.pt",
    "*.pth",
    "*.ckpt",
)
_CREDENTIALS = PathSpec.from_lines("gitwildmatch", CREDENTIAL_PATTERNS)

# Config fields naming local files or folders that the job reads and that are shipped with it.
_SHIPPED_FIELDS = (
    "data.train",
    "data.eval",
    "model.tokenizer",
    "train.deepspeed.config",
)
# Base model folders hold weights (too big for a job package): they must exist on the cluster's nodes.
_MODEL_FIELD = "model.name_or_path"


@dataclass
class JobPackage:
    """A staged job directory and the runtime_env that ships it."""

    directory: Path
    files: list[str]  # paths relative to `directory` that Ray will upload, sorted
    runtime_env: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # one-line warnings for the user

    def sizes(self) -> list[tuple[str, int]]:
        return [(f, (self.directory / f).stat().st_size) for f in self.files]


def is_credential(rel: str, is_dir: bool = False) -> bool:
    """Whether a path (relative, POSIX) matches the credential deny-list, case-insensitively."""
    rel = rel.lower()
    return _CREDENTIALS.match_file(rel + "/" if is_dir else rel)


def _ignore_spec(root: Path, extra: Iterable[str], ignore_files: bool) -> PathSpec:
    lines = list(BULKY_PATTERNS)
    for name in (".gitignore", ".rayignore") if ignore_files else ():
        if (root / name).is_file():
            lines += (root / name).read_text().splitlines()
    return PathSpec.from_lines("gitwildmatch", [*lines, *extra])


def walk(
    root: str | os.PathLike,
    extra_excludes: Iterable[str] = (),
    ignore_files: bool = True,
) -> list[str]:
    """Relative POSIX paths of the files under `root` that may ship, sorted: no credentials, nothing bulky, no
    symlink that leaves `root`, no symlinked folder; with `ignore_files`, also not what .gitignore/.rayignore name."""
    root = Path(root).resolve()
    spec = _ignore_spec(root, extra_excludes, ignore_files)
    kept: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not os.path.islink(os.path.join(dirpath, d))
            and not spec.match_file(prefix + d + "/")
            and not is_credential(prefix + d, is_dir=True)
        )
        for name in sorted(filenames):
            rel, full = prefix + name, Path(dirpath) / name
            if spec.match_file(rel) or is_credential(rel) or not full.is_file():
                continue
            if full.is_symlink() and not full.resolve().is_relative_to(root):
                continue  # never ship what a link outside the folder points at
            kept.append(rel)
    return sorted(kept)


def _raysft_sources() -> dict[str, Path]:
    """The installed raysft halves (editable or not): import name -> source folder."""
    # torch (kernels/); only to find the installed source folder
    import raysft.kernels

    return {
        "pipeline": Path(raysft.pipeline.__file__).parent,
        "kernels": Path(raysft.kernels.__file__).parent,
    }


def raysft_requirements() -> list[str]:
    """raysft's own requirements: the checkout's pyproject.toml when running from one, else the installed metadata."""
    pyproject = _raysft_sources()["pipeline"].resolve().parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib  # Python 3.11+; only a checkout has a pyproject.toml to read

        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "raysft":
            return list(project.get("dependencies", []))
    try:
        return [r for r in requires("raysft") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        return []


class _Stage:
    """Files placed into the staging folder, with the upload size limit and the credential rule enforced."""

    def __init__(self, dest: Path):
        self.dest, self.files, self.total = dest, {}, 0

    def add(self, src: Path, rel: str) -> None:
        if rel in self.files:
            return
        self.total += src.stat().st_size
        if self.total > MAX_UPLOAD_BYTES:
            raise ClusterError(
                f"The job package would be over {MAX_UPLOAD_BYTES >> 20} MiB (at {src}); put large files "
                "on shared storage and point the config at them."
            )
        (self.dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, self.dest / rel)
        self.files[rel] = src

    def add_path(self, path: Path, rel: str, what: str) -> None:
        """A file or folder the user or the config named explicitly: folders are walked without following links."""
        if is_credential(path.name, is_dir=path.is_dir()) or is_credential(rel, is_dir=path.is_dir()):
            raise ConfigError(
                f"Refusing to ship {path} ({what}): it looks like a credential file; pass secrets with --env."
            )
        if path.is_dir():
            for sub in walk(path, ignore_files=False):
                self.add(path / sub, f"{rel}/{sub}")
        else:
            self.add(path, rel)


def _relative_to(path: Path, root: Path) -> str | None:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def _ship_path(cfg: Config, key: str, value: Any, root: Path, stage: _Stage, notes: list[str]) -> Any:
    """Ship the local file, folder or glob `value` of config key `key`; return the value valid in the job's folder."""
    if not isinstance(value, str) or "://" in value:
        return value
    spec = os.path.expanduser(cfg.resolve_path(value) or value)
    is_glob = any(ch in spec for ch in "*?[")
    local = Path(spec).resolve() if not is_glob else None
    if (local is None and not glob.glob(spec, recursive=True)) or (local is not None and not local.exists()):
        return value  # a hub id, or a path that only exists on the cluster
    if key == _MODEL_FIELD:
        notes.append(
            f"{key} is {local}, which is not shipped (model weights): "
            "it must exist at that path on the cluster's nodes."
        )
        return str(local)
    if is_glob:
        rel_pattern = _relative_to(Path(os.path.abspath(spec)), root)
        if rel_pattern is None:
            notes.append(
                f"{key} is the glob {spec} outside {root}, which is not shipped: it must exist on the cluster."
            )
            return os.path.abspath(spec)
        for match in sorted(glob.glob(spec, recursive=True)):
            if Path(match).is_file():
                stage.add_path(Path(match).resolve(), Path(os.path.abspath(match)).relative_to(root).as_posix(), key)
        return rel_pattern
    rel = _relative_to(local, root) or f"inputs/{key}/{local.name}"
    stage.add_path(local, rel, key)
    return rel


def _ship_config_paths(cfg: Config, root: Path, stage: _Stage, notes: list[str]) -> dict[str, Any]:
    """Ship every local file or folder the config names; return the config with paths valid in the job's folder."""
    data = cfg.to_dict()
    for key in (*_SHIPPED_FIELDS, _MODEL_FIELD):
        value = get_dotted(data, key)
        if key == "data.train" and isinstance(value, list):  # weighted sources: each one's path
            for i, source in enumerate(value):
                source["path"] = _ship_path(cfg, f"data.train.{i}", source["path"], root, stage, notes)
            continue
        set_dotted(data, key, _ship_path(cfg, key, value, root, stage, notes))
    storage = data["run"]["storage_path"]
    if "://" not in storage and not os.path.isabs(storage):
        notes.append(
            f"run.storage_path '{storage}' is relative, so runs land in the job's temporary working "
            "directory on the cluster; use a shared filesystem path or s3://, gs:// for results to keep."
        )
    return data


def build_job_package(
    cfg: Config,
    staging: str | os.PathLike,
    *,
    working_dir: str | os.PathLike | None = None,
    includes: Iterable[str | os.PathLike] = (),
    env_names: Iterable[str] = (),
    extra_excludes: Iterable[str] = (),
) -> JobPackage:
    """Stage the job's files in `staging` and return the runtime_env that ships them.

    The job's folder mirrors `working_dir` when given, else the config file's folder: files keep their
    paths relative to it; referenced files from elsewhere go to inputs/<config key>/.
    """
    if working_dir is not None:
        root = Path(working_dir).resolve()
        if not root.is_dir():
            raise ConfigError(f"Working directory {root} does not exist.")
    else:
        root = Path(cfg.source).resolve().parent if cfg.source else Path.cwd().resolve()
    dest = Path(staging)
    dest.mkdir(parents=True, exist_ok=True)
    stage = _Stage(dest)
    sources = _raysft_sources()
    if working_dir is not None:
        # Submitting from a raysft checkout: its pipeline/ and kernels/ travel as raysft/ below; shipped
        # again at the top they would shadow PyPI's `kernels` (which transformers probes) on the job's path.
        own = [f"/{name}/" for name, src in sources.items() if src.resolve().parent == root]
        for rel in walk(root, [*extra_excludes, *own, "/raysft/"]):
            stage.add(root / rel, rel)
    if cfg.source and _relative_to(Path(cfg.source).resolve(), root) is not None:
        stage.add_path(
            Path(cfg.source).resolve(),
            _relative_to(Path(cfg.source).resolve(), root),
            "the config file",
        )
    for inc in includes:
        path = Path(inc).expanduser().resolve()
        rel = _relative_to(path, root)
        if not path.exists():
            raise ConfigError(f"--include {inc} does not exist.")
        if rel is None or rel == ".":
            raise ConfigError(
                f"--include {inc} is not inside {root}, the job's folder; move it there or use shared storage."
            )
        stage.add_path(path, rel, "--include")
    notes: list[str] = []
    data = _ship_config_paths(cfg, root, stage, notes)
    (dest / JOB_CONFIG_NAME).write_text(yaml.safe_dump(data, sort_keys=False))

    # raysft itself, as a regular package that wins over any install on the cluster's nodes, and its requirements.
    if (dest / "raysft").exists():
        raise ConfigError(
            f"The job's folder {root} has its own 'raysft' entry, which would shadow the shipped package."
        )
    (dest / "raysft").mkdir()
    (dest / "raysft" / "__init__.py").write_text('"""raysft, shipped with a Ray job by `raysft submit`."""\n')
    (dest / "raysft" / "requirements.txt").write_text("".join(r + "\n" for r in raysft_requirements()))
    for name, src in sources.items():
        for rel in walk(src):
            stage.add(src / rel, f"raysft/{name}/{rel}")

    env_vars = ray_recovery.train_env()  # node-loss recovery in seconds on the cluster too (ray_recovery.py)
    for name in env_names:
        if name not in os.environ:
            raise ConfigError(f"Environment variable {name} named by --env is not set here.")
        env_vars[name] = os.environ[name]
    runtime_env: dict[str, Any] = {"working_dir": str(dest), "env_vars": env_vars}
    shipped = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    return JobPackage(directory=dest, files=shipped, runtime_env=runtime_env, notes=notes)
