"""SwiGLU activation of the Llama MLP: silu(gate) * up, one fused elementwise kernel each way.

Shape as in Liger-Kernel: Triton kernels -> host launchers -> autograd.Function -> functional API ->
nn.Module (an MLP with the Hugging Face names gate_proj / up_proj / down_proj).
Backward, with s = sigmoid(gate): d_gate = dy * up * s * (1 + gate * (1 - s)),  d_up = dy * gate * s.
The forward saves only gate and up (which autograd holds anyway) and recomputes s in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backend import kernel, tl, use_triton

_BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Hugging Face LlamaMLP activation, as the ground truth."""
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- Triton kernels


@kernel
def _swiglu_forward_kernel(GATE, UP, Y, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    gate = tl.load(GATE + offs, mask=mask, other=0.0)
    up = tl.load(UP + offs, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)  # HF rounds silu(gate) to the input dtype first
    y = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@kernel
def _swiglu_backward_kernel(DY, GATE, UP, DGATE, DUP, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    silu = gate * sig
    d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DGATE + offs, d_gate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dy * silu).to(DUP.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host launchers


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = gate.numel()
    if n:
        _swiglu_forward_kernel.on(gate.device)[(-(-n // _BLOCK),)](gate, up, y, n, BLOCK=_BLOCK)
    return y


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy = dy.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_backward_kernel.on(gate.device)[(-(-n // _BLOCK),)](dy, gate, up, d_gate, d_up, n, BLOCK=_BLOCK)
    return d_gate, d_up


# ----------------------------------------------------------------------------- autograd


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.shape != up.shape:
            raise ValueError(f"swiglu needs gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy, gate, up)


# ----------------------------------------------------------------------------- functional API and module


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; Triton on GPU (or under TRITON_INTERPRET=1), else the reference."""
    if use_triton(gate):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


class SwiGLUMLP(nn.Module):
    """Drop-in for LlamaMLP (bias-free gate_proj, up_proj, down_proj; silu activation)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
