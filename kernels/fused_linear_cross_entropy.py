"""Cross-entropy of `hidden @ weight.T` without materialising the [tokens, vocab] logits.

The tokens are processed in chunks: a chunk's logits [C, V] come from one matmul, a kernel turns them
in place into d loss / d logits (softmax - onehot, scaled; zero on ignored rows) while writing each
row's loss (log-sum-exp minus the target logit, fp32), and two more matmuls fold that chunk into the
gradients of the hidden states and, when it requires grad, the weight. Gradients are therefore
computed in the forward (as in Liger-Kernel) and the backward only scales them by the incoming
gradient. Peak extra memory is one chunk of logits, sized like the hidden states, instead of
logits + log-softmax + their gradient. Softmax statistics and the loss are fp32; the weight gradient
accumulates chunk by chunk in the weight's dtype (each chunk's GEMM accumulates in fp32), as in Liger.

A low-rank side input (`lora_hidden` [N, r], `lora_weight` [V, r]) adds `lora_hidden @ lora_weight.T`
to the logits and receives its gradients: that is how a LoRA adapter on lm_head is trained.

Shape as in Liger-Kernel: Triton kernel -> host launcher -> autograd.Function -> functional API ->
nn.Module. Without a GPU (and without TRITON_INTERPRET=1) the per-chunk step runs in PyTorch, so
CPU runs keep the memory saving.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backend import kernel, next_power_of_2, num_warps, tl, use_triton

_REDUCTIONS = ("mean", "sum")


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **options: Any
) -> torch.Tensor:
    """The ground truth: `fused_linear_cross_entropy(..., reference=True)`, same arguments and checks."""
    return fused_linear_cross_entropy(hidden, weight, labels, **options, reference=True)


def _reference_loss(hidden, weight, labels, ignore_index, reduction, lora_hidden, lora_weight) -> torch.Tensor:
    """Logits + torch cross_entropy in fp32; "mean" over zero kept tokens is 0."""
    logits = hidden @ weight.T
    if lora_hidden is not None:
        logits = logits + lora_hidden @ lora_weight.T
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


# ----------------------------------------------------------------------------- Triton kernel


@kernel
def _cross_entropy_grad_kernel(
    LOGITS, logits_stride, LABELS, LOSS, n_cols, ignore_index, grad_scale, BLOCK: tl.constexpr
):
    """One row: LOSS[row] = lse - logit[y]; LOGITS[row] <- (softmax - onehot(y)) * grad_scale, in place."""
    row = tl.program_id(0).to(tl.int64)
    LOGITS += row * logits_stride
    y = tl.load(LABELS + row)
    if y == ignore_index:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(LOGITS + cols, tl.full([BLOCK], 0.0, LOGITS.dtype.element_ty), mask=cols < n_cols)
        tl.store(LOSS + row, 0.0)
        return
    # pass 1: online max and sum of exponentials (fp32)
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(LOGITS + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target_logit = tl.load(LOGITS + y).to(tl.float32)
    # pass 2: the gradient, written over the logits
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(LOGITS + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(cols == y, p - 1.0, p) * grad_scale
        tl.store(LOGITS + cols, p.to(LOGITS.dtype.element_ty), mask=mask)
    tl.store(LOSS + row, lse - target_logit)


# ----------------------------------------------------------------------------- host side


def _cross_entropy_grad_torch(
    logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, ignore_index: int, grad_scale: float
) -> None:
    """The PyTorch twin of the kernel (same in-place contract), for CPU runs without the interpreter."""
    x = logits.float()
    keep = labels != ignore_index
    safe = torch.where(keep, labels, 0)
    lse = torch.logsumexp(x, dim=-1)
    loss.copy_(torch.where(keep, lse - x.gather(1, safe[:, None]).squeeze(1), 0.0))
    x.sub_(lse[:, None]).exp_()
    x[torch.arange(x.shape[0], device=x.device), safe] -= 1.0
    x.mul_((keep.float() * grad_scale)[:, None])
    logits.copy_(x)


def _chunk_rows(n_rows: int, vocab: int, hidden: int, min_elements: int = 1) -> int:
    """Rows per chunk: the chunk's logits hold about as many elements as the hidden states (Liger's
    rule), and at least `min_elements` (the PyTorch step asks for 2^18 so small hidden sizes do not
    spend their time in per-op overhead)."""
    growth = max(1, -(-vocab // hidden))
    rows = max(-(-n_rows // growth), min_elements // vocab)
    return max(1, min(next_power_of_2(rows), next_power_of_2(n_rows), 4096))


def fused_linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    lora_hidden: torch.Tensor | None,
    lora_weight: torch.Tensor | None,
    need: tuple[bool, bool, bool, bool],
    triton: bool | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Loss (fp32 scalar) and the gradients [hidden, weight, lora_hidden, lora_weight] (None when not needed).
    `triton`: None runs the kernel where it can (`use_triton`), False the PyTorch step on any device."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    n_kept = int((labels != ignore_index).sum()) if reduction == "mean" else 0  # "sum" needs no host sync
    grad_scale = 1.0 / n_kept if (reduction == "mean" and n_kept) else 1.0
    triton_path = use_triton(hidden) if triton is None else (triton and use_triton(hidden))
    rows_per_chunk = _chunk_rows(n_rows, vocab, hidden.shape[1], 1 if triton_path else 1 << 18)
    block = min(next_power_of_2(vocab), 32768 if hidden.is_cuda else 8192)

    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    grads: list[torch.Tensor | None] = [
        torch.empty_like(hidden) if need[0] else None,
        torch.zeros_like(weight) if need[1] else None,
        torch.empty_like(lora_hidden) if (need[2] and lora_hidden is not None) else None,
        torch.zeros_like(lora_weight) if (need[3] and lora_weight is not None) else None,
    ]
    for start in range(0, n_rows, rows_per_chunk):
        end = min(start + rows_per_chunk, n_rows)
        h = hidden[start:end]
        logits = h @ weight.T  # [C, V] in the compute dtype; becomes its own gradient below
        if lora_hidden is not None:
            logits.addmm_(lora_hidden[start:end], lora_weight.T)
        y = labels[start:end]
        if triton_path:
            _cross_entropy_grad_kernel.on(hidden.device)[(end - start,)](
                logits,
                logits.stride(0),
                y,
                loss_rows[start:end],
                vocab,
                ignore_index,
                grad_scale,
                BLOCK=block,
                num_warps=num_warps(block),
            )
        else:
            _cross_entropy_grad_torch(logits, y, loss_rows[start:end], ignore_index, grad_scale)
        if grads[0] is not None:
            torch.mm(logits, weight, out=grads[0][start:end])
        if grads[1] is not None:
            grads[1].addmm_(logits.T, h)
        if grads[2] is not None:
            torch.mm(logits, lora_weight, out=grads[2][start:end])
        if grads[3] is not None:
            grads[3].addmm_(logits.T, lora_hidden[start:end])
        del logits
    loss = loss_rows.sum()
    if reduction == "mean":
        loss = loss / max(n_kept, 1)
    return loss, grads


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, lora_hidden, lora_weight, grad_enabled, triton):
        wants = ctx.needs_input_grad
        need = tuple(grad_enabled and wants[i] for i in (0, 1, 5, 6))
        loss, grads = fused_linear_cross_entropy_forward(
            hidden, weight, labels, ignore_index, reduction, lora_hidden, lora_weight, need, triton
        )
        ctx.grads = grads
        return loss.to(hidden.dtype) if hidden.dtype == torch.float64 else loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy supports one backward per forward (retain_graph is not supported)"
            )
        grads, ctx.grads = ctx.grads, None
        # Scale in place (no extra copies), always: testing grad_loss == 1 first would be a host sync.
        grads = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in grads]
        g_hidden, g_weight, g_lora_hidden, g_lora_weight = grads
        return g_hidden, g_weight, None, None, None, g_lora_hidden, g_lora_weight, None, None


# ----------------------------------------------------------------------------- functional API and module


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    lora_hidden: torch.Tensor | None = None,
    lora_weight: torch.Tensor | None = None,
    reference: bool = False,
    triton: bool | None = None,
) -> torch.Tensor:
    """Cross-entropy of hidden[N, H] @ weight[V, H].T against labels[N] without the full logits.

    reduction "sum" or "mean" (over tokens whose label != ignore_index; 0 when there are none).
    Returns an fp32 scalar. Triton kernel on GPU or under TRITON_INTERPRET=1, PyTorch chunks otherwise;
    `triton=False` takes the PyTorch chunks on every device (the chunked loss of runs without train.kernels);
    `reference=True` computes the full logits + torch cross_entropy instead (the ground truth of the tests).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if (lora_hidden is None) != (lora_weight is None):
        raise ValueError("pass both lora_hidden and lora_weight, or neither")
    if reference:
        return _reference_loss(hidden, weight, labels, ignore_index, reduction, lora_hidden, lora_weight)
    dtype = weight.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    hidden, weight = hidden.to(dtype).contiguous(), weight.to(dtype)
    if lora_hidden is not None:
        lora_hidden, lora_weight = lora_hidden.to(dtype).contiguous(), lora_weight.to(dtype)
    grad_enabled = torch.is_grad_enabled()  # under no_grad (eval) no gradient is computed at all
    with torch.autocast(hidden.device.type, enabled=False):
        return FusedLinearCrossEntropyFunction.apply(
            hidden,
            weight,
            labels.contiguous(),
            ignore_index,
            reduction,
            lora_hidden,
            lora_weight,
            grad_enabled,
            triton,
        )


class FusedLinearCrossEntropyLoss(nn.Module):
    """Module form: loss = module(lm_head_weight, hidden, labels), as Liger's LigerFusedLinearCrossEntropyLoss."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fused_linear_cross_entropy(_input, lin_weight, target, self.ignore_index, self.reduction)
