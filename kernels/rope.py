"""Rotary position embedding on q and k in the Hugging Face rotate_half convention.

q_embed = q * cos + rotate_half(q) * sin, with rotate_half([x1, x2]) = [-x2, x1] on the two halves of
the head dimension; cos/sin come from the model's rotary embedding for the given position_ids, so
packed rows (positions restarting at every sample) need nothing special here.
Shapes as in `apply_rotary_pos_emb`: q [B, Hq, T, D], k [B, Hk, T, D], cos/sin [B or 1, T, D] (or [T, D]).
One program per (batch, position) rotates every head of q and k; any strides (the usual q/k are
transposed views of [B, T, H, D]) are read as they are, without copies.
Backward is the transpose of the rotation: dq1 = g1 * cos1 + g2 * sin2,  dq2 = g2 * cos2 - g1 * sin1.
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import kernel, next_power_of_2, tl, use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hugging Face `apply_rotary_pos_emb`, as the ground truth."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


# ----------------------------------------------------------------------------- Triton kernel


@kernel
def _rope_kernel(
    Q,
    q_sb,
    q_sh,
    q_st,
    K,
    k_sb,
    k_sh,
    k_st,
    QO,
    qo_sb,
    qo_sh,
    qo_st,
    KO,
    ko_sb,
    ko_sh,
    ko_st,
    COS,
    SIN,
    c_sb,
    c_st,
    seq_len,
    n_q_heads,
    n_k_heads,
    half,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    c_off = b * c_sb + t * c_st
    cos1 = tl.load(COS + c_off + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(COS + c_off + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(SIN + c_off + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(SIN + c_off + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:  # transpose of the rotation: the halves swap their sines, negated
        s1 = -sin2
        s2 = -sin1
    else:
        s1 = sin1
        s2 = sin2
    h = tl.arange(0, BLOCK_H)[:, None]

    q_mask = (h < n_q_heads) & d_mask[None, :]
    q_in = Q + b * q_sb + t * q_st + h * q_sh + d[None, :]
    q1 = tl.load(q_in, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_in + half, mask=q_mask, other=0.0).to(tl.float32)
    q_out = QO + b * qo_sb + t * qo_st + h * qo_sh + d[None, :]
    tl.store(q_out, (q1 * cos1 - q2 * s1).to(QO.dtype.element_ty), mask=q_mask)
    tl.store(q_out + half, (q2 * cos2 + q1 * s2).to(QO.dtype.element_ty), mask=q_mask)

    k_mask = (h < n_k_heads) & d_mask[None, :]
    k_in = K + b * k_sb + t * k_st + h * k_sh + d[None, :]
    k1 = tl.load(k_in, mask=k_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_in + half, mask=k_mask, other=0.0).to(tl.float32)
    k_out = KO + b * ko_sb + t * ko_st + h * ko_sh + d[None, :]
    tl.store(k_out, (k1 * cos1 - k2 * s1).to(KO.dtype.element_ty), mask=k_mask)
    tl.store(k_out + half, (k2 * cos2 + k1 * s2).to(KO.dtype.element_ty), mask=k_mask)


# ----------------------------------------------------------------------------- host launcher


def _cos_sin_3d(cos: torch.Tensor, sin: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """cos/sin as contiguous [Bc, T, D] plus the batch stride to use (0 when shared by the batch)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape[0] not in (1, batch):
        raise ValueError(f"cos/sin batch {cos.shape[0]} does not match q batch {batch}")
    return cos, sin, (0 if cos.shape[0] == 1 else cos.stride(0))


def rope_launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] into new tensors with the same strides."""
    batch, n_q, seq_len, dim = q.shape
    n_k = k.shape[1]
    if dim % 2:
        raise ValueError(f"rotary head dimension must be even, got {dim}")
    cos3, sin3, c_sb = _cos_sin_3d(cos, sin, batch)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel():
        _rope_kernel.on(q.device)[(batch * seq_len,)](
            q,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k,
            k.stride(0),
            k.stride(1),
            k.stride(2),
            qo,
            qo.stride(0),
            qo.stride(1),
            qo.stride(2),
            ko,
            ko.stride(0),
            ko.stride(1),
            ko.stride(2),
            cos3,
            sin3,
            c_sb,
            cos3.stride(1),
            seq_len,
            n_q,
            n_k,
            dim // 2,
            BACKWARD=backward,
            BLOCK_H=next_power_of_2(max(n_q, n_k)),
            BLOCK_D=next_power_of_2(dim // 2),
        )
    return qo, ko


# ----------------------------------------------------------------------------- autograd


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        for name, t in (("q", q), ("k", k)):
            if t.stride(-1) != 1:
                raise ValueError(f"apply_rotary needs {name} with a contiguous last dimension")
        ctx.save_for_backward(cos, sin)
        return rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        gq, gk = rope_launch(dq, dk, cos, sin, backward=True)
        return gq, gk, None, None  # cos/sin come from a frozen buffer: no gradient


# ----------------------------------------------------------------------------- functional API and module


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated as HF `apply_rotary_pos_emb(q, k, cos, sin)`; Triton on GPU or under TRITON_INTERPRET=1."""
    if use_triton(q) and q.dim() == 4 and q.stride(-1) == 1 and k.stride(-1) == 1:
        return RotaryFunction.apply(q, k, cos, sin)
    return apply_rotary_reference(q, k, cos, sin)


class RotaryApply(nn.Module):
    """Module form of `apply_rotary` (no parameters: cos/sin come from the model's rotary embedding)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rotary(q, k, cos, sin)
