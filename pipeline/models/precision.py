"""`model.dtype: auto` and `model.compute_dtype: auto`: bf16 where the hardware computes it natively, else float32.

Decided once, on the driver, from a capability probe (never from habit): bf16 on CUDA GPUs that support it and on
CPUs with native bf16 (AVX512-BF16 / AMX, which oneDNN uses); float32 elsewhere. On a CPU without it (AVX2 only:
many laptops and AMD servers) every bf16 matmul takes torch's reference GEMM, about 15x slower than float32 in the
demo (BENCHMARKS.md). One choice covers the storage dtype, the 4-bit layers' compute dtype and the LoRA weights
(PEFT keeps adapters in the base's dtype; DeepSpeed's bf16 mode follows model.dtype). An explicit bfloat16 on such
a CPU runs, with one warning sentence. With `scaling.use_gpu` and no GPU on the driver, the workers' GPUs cannot be
probed here: auto means bf16 (every GPU of the Ampere generation or newer has it).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass

from raysft.pipeline.config import Config, ModelConfig

AUTO = "auto"
CPU_BF16_SLOWDOWN = 15  # the demo's bf16 vs float32 training speed on an AVX2-only CPU (BENCHMARKS.md)


@dataclass(frozen=True)
class Capability:
    """Where the workers compute, and whether bf16 is native there."""

    device: str  # "cuda" or "cpu"
    bf16_native: bool
    name: str  # how to name the hardware in a sentence
    probed: bool = True  # False: a GPU run decided on a driver without a GPU


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass

    return platform.processor() or platform.machine() or "this CPU"


def cpu_bf16_native() -> bool:
    """oneDNN's own test: does this CPU run bf16 matmuls natively (AVX512-BF16 or AMX)?"""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def probe(use_gpu: bool) -> Capability:
    import torch

    if use_gpu:
        if torch.cuda.is_available():
            return Capability("cuda", bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name(0))
        return Capability("cuda", True, "the workers' GPUs", probed=False)
    return Capability("cpu", cpu_bf16_native(), cpu_name())


def decide(cfg: Config, cap: Capability) -> tuple[dict[str, str], str | None, str | None]:
    """(config updates for the `auto` fields, the sentence saying the choice, a warning for an explicit slow bf16)."""
    m = cfg.model
    chosen = "bfloat16" if cap.bf16_native else "float32"
    updates = {f"model.{k}": chosen for k in ("dtype", "compute_dtype") if getattr(m, k) == AUTO}
    note = None
    if updates and chosen == "bfloat16" and cfg.train.deepspeed.stage == 0:
        # DeepSpeed accumulates gradients in the model's dtype at stage 0 (fp32 only at stages 1-3)
        updates = dict.fromkeys(updates, "float32")
        note = "dtype auto -> float32: train.deepspeed.stage 0 accumulates gradients in the model's dtype."
    elif updates:
        if cap.device == "cpu" and not cap.bf16_native:
            why = f"this CPU ({cap.name}) has no native bf16; bf16 would be about {CPU_BF16_SLOWDOWN}x slower here"
        elif cap.device == "cpu":
            why = f"this CPU ({cap.name}) computes bf16 natively"
        elif not cap.probed:
            why = "GPU workers (no GPU on this machine to check; bf16 needs an Ampere-or-newer GPU)"
        elif cap.bf16_native:
            why = f"{cap.name} supports bf16"
        else:
            why = f"{cap.name} has no bf16"
        note = f"dtype auto -> {chosen}: {why}."
    warning = None
    explicit = [k for k in ("dtype", "compute_dtype") if getattr(m, k) == "bfloat16"]
    if explicit and cap.device == "cpu" and not cap.bf16_native:
        keys = " and ".join(f"model.{k}" for k in explicit)
        warning = (
            f"{keys} bfloat16 on a CPU without native bf16 ({cap.name}) runs about {CPU_BF16_SLOWDOWN}x slower than "
            "float32; set them to auto (or float32) unless you need bf16 here."
        )
    return updates, note, warning


_said: set[str] = set()
log = logging.getLogger("raysft")


def resolve(cfg: Config, cap: Capability | None = None) -> Config:
    """The config with concrete dtypes; the choice is logged once per process (INFO), a slow explicit bf16 warned.

    The console of `raysft train` / `demo` shows the same sentence (`describe`) on the terminal; a warning with
    no logging configured reaches stderr (Python's last-resort handler), which the CLI sends to the run's log."""
    if cap is None and not needs_probe(cfg):
        return cfg
    updates, note, warning = decide(cfg, cap or probe(cfg.scaling.use_gpu))
    for text, level in ((note, logging.INFO), (warning, logging.WARNING)):
        if text and text not in _said:
            _said.add(text)
            log.log(level, "raysft: %s", text)
    return cfg.with_overrides(updates) if updates else cfg


def needs_probe(cfg: Config) -> bool:
    m = cfg.model
    return AUTO in (m.dtype, m.compute_dtype) or (not cfg.scaling.use_gpu and "bfloat16" in (m.dtype, m.compute_dtype))


def concrete_model(mcfg: ModelConfig, device: str) -> ModelConfig:
    """A model section with `auto` made concrete for `device` (a caller that loads a model without `resolve`)."""
    auto = [k for k in ("dtype", "compute_dtype") if getattr(mcfg, k) == AUTO]
    if not auto:
        return mcfg
    import torch

    native = torch.cuda.is_bf16_supported() if str(device).startswith("cuda") else cpu_bf16_native()
    return mcfg.model_copy(update={k: "bfloat16" if native else "float32" for k in auto})


def describe(cfg: Config) -> str | None:
    """The sentence `resolve` says for this config (for the console), or None when there is nothing to say."""
    if not needs_probe(cfg):
        return None
    _, note, warning = decide(cfg, probe(cfg.scaling.use_gpu))
    return warning or note
