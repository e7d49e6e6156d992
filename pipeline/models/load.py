"""Model side of QLoRA: find and load the base (NF4 or plain), attach LoRA, save and merge adapters.

Everything here runs without Ray or DeepSpeed, so a GPU machine with only torch + transformers +
peft + bitsandbytes can load and train through the same code. Weights are read and written as
safetensors only; `trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from raysft.pipeline.config import Config, ModelConfig
from raysft.pipeline.errors import ModelError

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
RESOLVED_CONFIG = "config.yaml"


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}[name]


def _looks_local(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (absolute, ./, ~, deeper paths, .gguf) is a path."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or name.endswith(".gguf")
        or os.sep != "/" and os.sep in name
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("", "0", "false", "False")


def resolve_model_source(mcfg: ModelConfig, source_file: str | None = None) -> tuple[str, str | None]:
    """Return (directory-or-hub-id, gguf_file) for the base model, or raise a one-sentence ModelError.

    Called on the driver before any worker starts, so a missing model fails fast.
    """
    name = os.path.expanduser(mcfg.name_or_path)
    if source_file and not os.path.isabs(name) and not Path(name).exists():
        candidate = Path(source_file).parent / name
        if candidate.exists():
            name = str(candidate)
    gguf = mcfg.gguf_file
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent.resolve()), path.name
    if path.is_dir():
        if gguf is not None and not (path / gguf).is_file():
            raise ModelError(f"model.gguf_file {gguf} is not in {name}.")
        if gguf is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path.resolve()), ggufs[0]
            raise ModelError(f"model.name_or_path {name} has no config.json (not a Hugging Face model directory).")
        return str(path.resolve()), gguf
    if _looks_local(mcfg.name_or_path):
        raise ModelError(f"model.name_or_path {mcfg.name_or_path} does not exist.")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
        if not isinstance(hit, str):
            raise ModelError(
                f"model.name_or_path {name} is neither a local directory nor in the Hugging Face cache, and the hub is offline."
            )
    return name, gguf


def load_tokenizer(mcfg: ModelConfig, require_chat_template: bool = True):
    """The tokenizer (from model.tokenizer when set); raises when it has no chat template."""
    from transformers import AutoTokenizer

    source, gguf = resolve_model_source(mcfg) if mcfg.tokenizer is None else (mcfg.tokenizer, None)
    kwargs: dict[str, Any] = {"trust_remote_code": mcfg.trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not load a tokenizer from {source}: {str(exc).splitlines()[0]}") from None
    if require_chat_template and not getattr(tok, "chat_template", None):
        raise ModelError(f"The tokenizer of {source} has no chat template; set model.tokenizer to one that has.")
    return tok


def materialize_gguf(directory: str, gguf_file: str, mcfg: ModelConfig, cache_root: str | None = None) -> str:
    """Dequantize a GGUF model once into a Hugging Face safetensors folder and return its path.

    bitsandbytes quantizes from float weights, so the GGUF is converted once (on the driver, through
    `raysft.pipeline.models.fetch.convert_gguf`) and workers load the HF copy.
    """
    from raysft.pipeline.models.fetch import convert_gguf

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


def load_base_model(mcfg: ModelConfig, device: str | None = None):
    """The base causal LM: NF4 4-bit through bitsandbytes, or plain weights in model.dtype.

    NF4 uses double quantization, the configured compute dtype and `bnb_4bit_quant_storage`
    (a float dtype lets ZeRO-3 partition the packed 4-bit weights like any other tensor).
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source, gguf = resolve_model_source(mcfg)
    if gguf:
        source, gguf = materialize_gguf(source, gguf, mcfg), None
    kwargs: dict[str, Any] = dict(
        dtype=_dtype(mcfg.dtype),
        attn_implementation=mcfg.attn_implementation,
        trust_remote_code=mcfg.trust_remote_code,
        use_safetensors=True,
    )
    if mcfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=mcfg.double_quant,
            bnb_4bit_compute_dtype=_dtype(mcfg.compute_dtype),
            bnb_4bit_quant_storage=_dtype(mcfg.quant_storage or mcfg.dtype),
        )
        kwargs["device_map"] = {"": device or ("cuda" if torch.cuda.is_available() else "cpu")}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelError(f"Could not load model.name_or_path {mcfg.name_or_path}: {str(exc).splitlines()[0]}") from None
    if device and mcfg.quantization == "none":
        model.to(device)
    if mcfg.quantization == "nf4":
        _keep_4bit_layout(model)
    model.config.use_cache = False  # packed rows must never use a KV cache (DESIGN.md)
    return model


def _keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place for its CPU inference kernel.

    On CPUs with AVX512-BF16, an eval-mode no-grad forward of `Linear4bit` rewrites `weight.data`
    into another layout and flags the shared quant_state. Under ZeRO-3 the rewritten data is a
    temporary gather that is thrown away while the flag stays, so every later forward reads the
    weights wrongly (training diverged after the first eval in our tests). One layout, always.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model, cfg: Config):
    """Freeze the base, add PEFT LoRA adapters (r, alpha, dropout, targets, rsLoRA, DoRA), set up checkpointing."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = cfg.lora
    peft_cfg = PeftLoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=lcfg.target_modules,
        use_rslora=lcfg.use_rslora,
        use_dora=lcfg.use_dora,
        bias=lcfg.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def build_model(cfg: Config, device: str | None = None):
    """Base + LoRA, with the opt-in kernels patched in; what one training worker (or a benchmark) trains."""
    import torch

    torch.manual_seed(cfg.train.seed)  # LoRA init is seeded: every rank starts from the same adapter
    model = attach_lora(load_base_model(cfg.model, device), cfg)
    if cfg.train.kernels:
        from raysft.kernels import patch_model

        patch_model(model)
    return model


def save_adapter(model, directory: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    return directory


def export_run(run_dir: str | os.PathLike, merge: bool = False, output: str | os.PathLike | None = None) -> Path:
    """`raysft export RUN [--merge]`: copy the adapter, or merge it into the base and save a bf16 model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = Path(run_dir)
    adapter = run / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{run} has no {ADAPTER_DIR}/adapter_config.json (is it a finished raysft run directory?).")
    if not merge:
        if output is None:
            return adapter
        shutil.copytree(adapter, output, dirs_exist_ok=True)
        return Path(output)
    cfg = _run_config(run)
    out = Path(output) if output else run / MERGED_DIR
    source, gguf = resolve_model_source(cfg.model)
    if gguf:
        source = materialize_gguf(source, gguf, cfg.model)
    # Merge into full-precision weights (not the 4-bit ones): the merged model is a plain bf16 model.
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=cfg.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged = merged.to(torch.bfloat16)
    merged.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    try:
        load_tokenizer(cfg.model, require_chat_template=False).save_pretrained(out)
    except ModelError:
        pass  # the merged weights are still usable with the base's tokenizer
    return out


def _run_config(run: Path) -> Config:
    from raysft.pipeline.config import load_config

    path = run / RESOLVED_CONFIG
    if not path.is_file():
        raise ModelError(f"{run} has no {RESOLVED_CONFIG}, so the base model of the run is unknown.")
    return load_config(path)


def adapter_config_base(adapter_dir: str | os.PathLike) -> str | None:
    """The base model path PEFT recorded in an adapter folder."""
    data = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return data.get("base_model_name_or_path")
