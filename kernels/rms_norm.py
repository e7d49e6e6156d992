"""RMSNorm (Llama convention): y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), fp32 statistics.

Shape as in Liger-Kernel: Triton kernels -> host launchers -> autograd.Function -> functional API ->
nn.Module with the Hugging Face parameter names (`weight`, `variance_epsilon`). The forward keeps the
per-row rstd so the backward recomputes the normalised row instead of saving it.
Backward: with n = x * rstd and g = dy * w,  dx = rstd * (g - n * mean(g * n)),  dw = sum_rows(dy * n).
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import kernel, next_power_of_2, num_programs, num_warps, tl, use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The Hugging Face LlamaRMSNorm forward, as the ground truth."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


# ----------------------------------------------------------------------------- Triton kernels


@kernel
def _rms_norm_forward_kernel(Y, y_stride, X, x_stride, W, RSTD, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    normed = (x32 * rstd).to(x.dtype)  # HF casts back to the input dtype before the weight
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = normed.to(tl.float32) * w
    tl.store(Y + row * y_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@kernel
def _rms_norm_backward_kernel(
    DY,
    dy_stride,
    X,
    x_stride,
    W,
    RSTD,
    DX,
    dx_stride,
    DW_PARTIAL,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK: tl.constexpr,
):
    # Each program walks a contiguous band of rows and keeps its share of dw in registers (fp32).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.full([BLOCK], 0.0, tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    X += row_start * x_stride
    DY += row_start * dy_stride
    DX += row_start * dx_stride
    for row in range(row_start, row_end):
        x = tl.load(X + cols, mask=mask, other=0.0)
        x32 = x.to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        normed = x32 * rstd
        g = dy * w
        dx = rstd * (g - normed * (tl.sum(g * normed, axis=0) / n_cols))
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * normed.to(x.dtype).to(tl.float32)
        X += x_stride
        DY += dy_stride
        DX += dx_stride
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


# ----------------------------------------------------------------------------- host launchers


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns (y with x's shape, rstd per row in fp32)."""
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        _rms_norm_forward_kernel.on(x.device)[(n_rows,)](
            y,
            y.stride(0),
            x2,
            x2.stride(0),
            weight.contiguous(),
            rstd,
            n_cols,
            eps,
            BLOCK=next_power_of_2(n_cols),
            num_warps=num_warps(next_power_of_2(n_cols)),
        )
    return y.view(*x.shape[:-1], n_cols), rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; returns (dx with x's shape and dtype, dw with weight's dtype)."""
    x2, dy2 = _as_rows(x), _as_rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    programs = num_programs(x.device, n_rows)
    dw_partial = torch.zeros((programs, n_cols), dtype=torch.float32, device=x.device)
    if n_rows:
        rows_per_program = -(-n_rows // programs)
        _rms_norm_backward_kernel.on(x.device)[(programs,)](
            dy2,
            dy2.stride(0),
            x2,
            x2.stride(0),
            weight.contiguous(),
            rstd,
            dx,
            dx.stride(0),
            dw_partial,
            n_rows,
            n_cols,
            rows_per_program,
            BLOCK=next_power_of_2(n_cols),
            num_warps=num_warps(next_power_of_2(n_cols)),
        )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------- autograd


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None


# ----------------------------------------------------------------------------- functional API and module


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension; Triton on GPU (or under TRITON_INTERPRET=1), else the reference."""
    if use_triton(x):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


class RMSNorm(nn.Module):
    """Drop-in for LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm (same parameter names)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
