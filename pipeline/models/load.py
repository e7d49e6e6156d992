"""Model side of QLoRA: load the base (NF4 or plain), attach LoRA, save adapters.

Everything here runs without Ray or DeepSpeed, so a GPU machine with only torch + transformers +
peft + bitsandbytes can load and train through the same code. Weights are read and written as
safetensors only; `trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raysft.pipeline import import_guard
from raysft.pipeline.config import Config, ModelConfig
from raysft.pipeline.errors import ModelError
from raysft.pipeline.models import precision
from raysft.pipeline.models.source import base_model_path


def torch_dtype(name: str):
    """The torch dtype named in a config (model.dtype, compute_dtype, quant_storage)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}[name]


def load_base_model(mcfg: ModelConfig, device: str | None = None):
    """The base causal LM: NF4 4-bit through bitsandbytes, or plain weights in model.dtype.

    NF4 uses double quantization, the configured compute dtype and `bnb_4bit_quant_storage`
    (a float dtype lets ZeRO-3 partition the packed 4-bit weights like any other tensor).
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    mcfg = precision.concrete_model(mcfg, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = base_model_path(mcfg)
    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype(mcfg.dtype),
        # "auto" is resolved by trainer.preflight (training/loop.resolve_attention); unresolved: sdpa
        attn_implementation="sdpa" if mcfg.attn_implementation == "auto" else mcfg.attn_implementation,
        trust_remote_code=mcfg.trust_remote_code,
        use_safetensors=True,
    )
    if mcfg.quantization == "nf4":
        import_bitsandbytes()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=mcfg.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(mcfg.compute_dtype),
            bnb_4bit_quant_storage=torch_dtype(mcfg.quant_storage or mcfg.dtype),
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
    model.config.use_cache = False  # packed rows must never use a KV cache (pipeline/ARCHITECTURE.md)
    return model


def _keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place for its CPU inference kernel.

    On CPUs with AVX512-BF16, an eval-mode no-grad forward of `Linear4bit` rewrites `weight.data`
    into another layout and flags the shared quant_state. Under ZeRO-3 the rewritten data is a
    temporary gather that is thrown away while the flag stays, so every later forward reads the
    weights wrongly (training diverged after the first eval in our tests). One layout, always.
    """
    bnb = import_bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def import_bitsandbytes():
    """bitsandbytes, imported without the hub fetch it makes on some CPUs.

    bitsandbytes 0.50, imported on a CPU with AVX512-BF16, fetches a CPU inference kernel from the Hugging Face hub
    (`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`): remote code at run time where the hub is
    reachable, a WARNING in every worker where it is not, and a kernel raysft switches off anyway
    (`_keep_4bit_layout`). With PyPI's `kernels` hidden for the import, bitsandbytes takes its own fallback; its
    warning about that is dropped. Imported already: returned as it is.
    """
    if "bitsandbytes" not in sys.modules:
        log = logging.getLogger("bitsandbytes.backends.cpu.ops")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with import_guard.hidden("kernels", even_if_imported=True):
                import bitsandbytes  # noqa: F401
        finally:
            log.setLevel(level)
    return sys.modules["bitsandbytes"]


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
    if cfg.model.quantization != "none":
        return get_peft_model(model, peft_cfg)
    with _bitsandbytes_hidden():  # no 4-bit layer to wrap: skip its import (1.7 s of CPU per worker)
        return get_peft_model(model, peft_cfg)


@contextlib.contextmanager
def _bitsandbytes_hidden() -> Iterator[None]:
    """peft's LoRA dispatch imports bitsandbytes whenever it is installed (`peft.tuners.lora.model`, to match its
    quantized layers), ~1.7 s of CPU; a plain base has none of them. For this call only, bitsandbytes looks absent
    to peft (`importlib.util.find_spec` answers None for a `None` entry of sys.modules) and peft's cached answers
    are cleared before and after, so a 4-bit model later in the same process finds it. One already imported is
    left alone (nothing to save)."""
    if "bitsandbytes" in sys.modules:
        yield
        return
    from peft import import_utils  # heavy: peft (already imported by the caller)

    caches = [getattr(import_utils, n, None) for n in ("is_bnb_available", "is_bnb_4bit_available")]
    clears = [c.cache_clear for c in caches if hasattr(c, "cache_clear")]
    for clear in clears:
        clear()
    try:
        with import_guard.hidden("bitsandbytes"):
            yield
    finally:
        for clear in clears:
            clear()


def build_model(cfg: Config, device: str | None = None):
    """Base + LoRA, with the opt-in kernels patched in; what one training worker (or a benchmark) trains."""
    import torch

    torch.manual_seed(cfg.train.seed)  # LoRA init is seeded: every rank starts from the same adapter
    model = attach_lora(load_base_model(cfg.model, device), cfg)
    if cfg.train.kernels:
        from raysft.kernels import patch_model  # Triton, only when train.kernels is on

        patch_model(model)
    return model


def save_adapter(model, directory: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    return directory
