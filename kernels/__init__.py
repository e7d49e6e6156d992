"""raysft.kernels: Triton kernels for the QLoRA hot path, their PyTorch references, an opt-in patcher.

Importing this package changes nothing in any other library (triton is imported with a guard, and
nothing is patched). When the repository root is on sys.path, transformers and bitsandbytes probing
for the unrelated PyPI package `kernels` find this folder; under that name it stays empty.
Each op runs as a Triton kernel on CUDA tensors (or on CPU under TRITON_INTERPRET=1) and as its
PyTorch reference otherwise, so one config runs everywhere. `patch_model` swaps RMSNorm, RoPE and the
SwiGLU activation on one model instance (reversibly); `causal_lm_loss_sum` is the packed-row loss
without materialised logits.
"""

from __future__ import annotations

if __name__ == "raysft.kernels":  # not when probed as the PyPI package `kernels` (see above)
    from .causal_lm_loss import causal_lm_loss_sum, lm_head_parts
    from .fused_linear_cross_entropy import (
        FusedLinearCrossEntropyLoss,
        fused_linear_cross_entropy,
        linear_cross_entropy_reference,
    )
    from .patch import KernelPatch, patch_model
    from .rms_norm import RMSNorm, rms_norm, rms_norm_reference
    from .rope import RotaryApply, apply_rotary, apply_rotary_reference
    from .swiglu import SwiGLUMLP, swiglu, swiglu_reference

__all__ = [
    "FusedLinearCrossEntropyLoss",
    "KernelPatch",
    "RMSNorm",
    "RotaryApply",
    "SwiGLUMLP",
    "apply_rotary",
    "apply_rotary_reference",
    "causal_lm_loss_sum",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
    "lm_head_parts",
    "patch_model",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
]
