"""raysft.kernels: Triton kernels for the QLoRA hot path, their PyTorch references, an opt-in patcher.

Importing this package changes nothing in any other library and loads nothing until a name is used
(PEP 562 lazy attributes); that also keeps it inert when the repository root is on sys.path and
transformers or bitsandbytes probe for the unrelated PyPI package `kernels` and find this folder.
Each op runs as a Triton kernel on CUDA tensors (or on CPU under TRITON_INTERPRET=1) and as its
PyTorch reference otherwise, so one config runs everywhere. `patch_model` swaps RMSNorm, RoPE and the
SwiGLU activation on one model instance (reversibly); `causal_lm_loss_sum` is the packed-row loss
without materialised logits.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "linear_cross_entropy_reference": "fused_linear_cross_entropy",
    "FusedLinearCrossEntropyLoss": "fused_linear_cross_entropy",
    "rms_norm": "rms_norm",
    "rms_norm_reference": "rms_norm",
    "RMSNorm": "rms_norm",
    "apply_rotary": "rope",
    "apply_rotary_reference": "rope",
    "RotaryApply": "rope",
    "swiglu": "swiglu",
    "swiglu_reference": "swiglu",
    "SwiGLUMLP": "swiglu",
    "patch_model": "patch",
    "KernelPatch": "patch",
    "causal_lm_loss_sum": "causal_lm_loss",
    "lm_head_parts": "causal_lm_loss",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS and __name__ == "raysft.kernels":
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
