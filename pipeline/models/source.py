"""Where a model or tokenizer comes from: a hub id, a local folder, or a GGUF file, online or offline.

The one place that decides "is this a hub id?", reads HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, and
turns a GGUF base into a Hugging Face folder (`base_model_path`). Runs without torch or transformers:
the data plan's driver asks it where the tokenizer lives without importing either.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from raysft.pipeline.config import Config, ModelConfig, resolve_relative
from raysft.pipeline.errors import ModelError

_FALSE = ("", "0", "false", "False")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE switches the Hugging Face hub off."""
    return any(os.environ.get(var, "0") not in _FALSE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_hub_id(name: str) -> bool:
    """A hub id is `name` or `owner/name`; a name that exists on disk, is absolute, starts with `.` or `~`,
    has more than one `/` or ends in `.gguf` is a local path."""
    return not (
        not name
        or os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or not all(name.split("/"))
        or name.lower().endswith(".gguf")
        or (os.sep != "/" and os.sep in name)
        or Path(name).exists()
    )


@dataclass(frozen=True)
class Source:
    """A resolved model or tokenizer location: an absolute local folder (plus a GGUF file in it), or a hub id."""

    location: str
    gguf_file: str | None
    local: bool
    field: str  # the config key it came from, for messages


def locate(name: str, gguf_file: str | None, field: str, source_file: str | None = None) -> Source:
    """Resolve `name` (relative paths against the config file's folder) or raise a one-sentence ModelError.

    A `.gguf` file becomes (its folder, its name); a folder without config.json holding exactly one
    `.gguf` file selects it. A hub id is checked against the local cache when the hub is offline.
    """
    path = Path(resolve_relative(os.path.expanduser(name), source_file))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return Source(str(path.parent.resolve()), path.name, True, field)
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise ModelError(f"model.gguf_file {gguf_file} is not in {path}.")
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            gguf_file = ggufs[0] if len(ggufs) == 1 else None
        return Source(str(path.resolve()), gguf_file, True, field)
    if path.exists():
        raise ModelError(f"{field} {name} is neither a folder nor a .gguf file.")
    if not is_hub_id(name):
        raise ModelError(f"{field} {name} does not exist.")
    return Source(name, gguf_file, False, field)


def _require_cached(src: Source, filename: str) -> None:
    """Offline, a hub id must already be in the Hugging Face cache."""
    if src.local or not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(src.location, filename), str):
        raise ModelError(
            f"{src.field} {src.location} is neither a local directory nor in the Hugging Face cache, "
            "and the hub is offline."
        )


def resolve_model_source(mcfg: ModelConfig, source_file: str | None = None) -> tuple[str, str | None]:
    """Return (directory-or-hub-id, gguf_file) for the base model, or raise a one-sentence ModelError.

    Called on the driver before any worker starts, so a missing model fails fast.
    """
    src = locate(mcfg.name_or_path, mcfg.gguf_file, "model.name_or_path", source_file)
    if src.local and src.gguf_file is None and not (Path(src.location) / "config.json").is_file():
        raise ModelError(f"model.name_or_path {src.location} has no config.json (not a Hugging Face model directory).")
    _require_cached(src, "config.json")
    return src.location, src.gguf_file


def tokenizer_source(cfg: Config) -> Source:
    """Where the tokenizer of `cfg` is: model.tokenizer when set, else the model's own (with its GGUF file)."""
    mcfg = cfg.model
    if mcfg.tokenizer:
        src = locate(mcfg.tokenizer, None, "model.tokenizer", cfg.source)
    else:
        src = locate(mcfg.name_or_path, mcfg.gguf_file, "model.name_or_path", cfg.source)
    _require_cached(src, "tokenizer_config.json")
    return src


def convert_gguf(gguf_path: str | os.PathLike, output: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Load a GGUF checkpoint with transformers, dequantized, and save it as safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    output = Path(output)
    folder, file = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        # dequantize=True: a plain dense model whatever GGUF kernels happen to be installed.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype=getattr(torch, dtype), quantization_config=GgufConfig(dequantize=True)
        )
    except Exception as exc:  # transformers raises many kinds for a bad file
        raise ModelError(
            f"GGUF file {gguf_path} could not be loaded by transformers ({type(exc).__name__}: {exc})."
        ) from None
    if not tokenizer.chat_template:
        raise ModelError(f"GGUF file {gguf_path} carries no chat template (tokenizer.chat_template), which SFT needs.")
    # The GGUF quantizer marks the model as non-serializable; the weights are plain tensors now.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return output


def materialize_gguf(directory: str, gguf_file: str, cache_root: str | None = None) -> str:
    """Dequantize a GGUF model once into a Hugging Face safetensors folder and return its path.

    bitsandbytes quantizes from float weights, so the GGUF is converted once (on the driver, through
    `convert_gguf`) and workers load the HF copy. The copy is keyed by
    the file's path, size and mtime under ~/.cache/raysft/gguf (or `cache_root`).
    """
    src = Path(directory) / gguf_file
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_root or os.path.expanduser("~/.cache/raysft/gguf"))
    out = root / f"{src.stem}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    convert_gguf(src, tmp, dtype="float32")
    try:
        tmp.rename(out)
    except OSError:  # another process published the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def base_model_path(mcfg: ModelConfig, source_file: str | None = None) -> str:
    """The base model as transformers loads it: a local Hugging Face folder (a GGUF converted once) or a hub id."""
    source, gguf = resolve_model_source(mcfg, source_file)
    return materialize_gguf(source, gguf) if gguf else source
