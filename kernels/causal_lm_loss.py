"""The packed-row training loss of a causal LM without materialising logits.

`causal_lm_loss_sum` runs the model on packed rows ([B, T]; samples kept apart by position_ids
alone, hence attention_mask=None and use_cache=False), keeps the positions
whose shifted label is trained, and sums their cross-entropy with `fused_linear_cross_entropy` on
the lm_head weight. A LoRA adapter on lm_head is included exactly (its low-rank term is an extra
input of the fused loss); anything this cannot represent is refused with a ModelError rather than
silently left untrained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from raysft.pipeline.errors import ModelError

from .fused_linear_cross_entropy import fused_linear_cross_entropy

IGNORE_INDEX = -100


@dataclass
class LMHead:
    """The output projection as the fused loss sees it: a dense weight plus active LoRA adapters."""

    weight: torch.Tensor  # [V, H]
    adapters: list[tuple[nn.Module, nn.Module, nn.Module, float]] = field(default_factory=list)  # dropout, A, B, scale

    def lora_inputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(lora_hidden [N, r], lora_weight [V, r]) such that logits += lora_hidden @ lora_weight.T."""
        if not self.adapters:
            return None, None
        # lora_A runs as a module (its hooks fire); the activation dtype follows PEFT's cast to lora_A's
        low = [scale * lora_a(dropout(hidden.to(lora_a.weight.dtype))) for dropout, lora_a, _, scale in self.adapters]
        return torch.cat(low, dim=-1), torch.cat([lora_b.weight for _, _, lora_b, _ in self.adapters], dim=-1)


def _zero3_partitioned(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The weights DeepSpeed ZeRO-3 holds partitioned (only a gather makes them whole)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if any(p.requires_grad for p in partitioned):
        raise ModelError(
            "the chunked loss cannot train lm_head weights (LoRA on lm_head) under DeepSpeed ZeRO-3; "
            "use train.deepspeed.stage 2, leave lm_head out of lora.target_modules, or set train.kernels: false"
        )
    return partitioned


def _gathered(params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Gather DeepSpeed ZeRO-3 partitioned weights for the fused loss, which reads them outside their
    module's forward. Safe for frozen weights only: the loss finishes all its math in the forward."""
    partitioned = _zero3_partitioned(params)
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed  # heavy, and only under ZeRO-3

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


class _HiddenCapture(nn.Module):
    """Stands in for lm_head during the model's forward: keeps its input (the final hidden states) and
    returns it unchanged, so no logits are computed and, under ZeRO-3, lm_head is not gathered there."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden


def _base_causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_parts(model: nn.Module) -> LMHead:
    """Read lm_head of a plain or PEFT-wrapped causal LM; ModelError for what the fused loss cannot train."""
    head = _base_causal_lm(model).get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no output embeddings (lm_head) for the fused loss")
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # PEFT modules_to_save
        active = [a for a in head.active_adapters if a in head.modules_to_save] if not head.disable_adapters else []
        if len(active) > 1:
            raise ModelError("lm_head has several active modules_to_save copies; train.kernels supports one")
        head = head.modules_to_save[active[0]] if active else head.original_module
    adapters: list[tuple[nn.Module, nn.Module, nn.Module, float]] = []
    if hasattr(head, "lora_A") and hasattr(head, "base_layer"):  # a PEFT LoRA layer
        if not head.disable_adapters and not head.merged:
            for name in head.active_adapters:
                if name not in head.lora_A:
                    continue
                if head.use_dora.get(name, False) or getattr(head, "lora_bias", {}).get(name, False):
                    raise ModelError(
                        f"lm_head carries a DoRA or bias LoRA adapter {name!r} that train.kernels cannot train; "
                        "set train.kernels: false or leave lm_head out of lora.target_modules"
                    )
                adapters.append(
                    (head.lora_dropout[name], head.lora_A[name], head.lora_B[name], float(head.scaling[name]))
                )
        head = head.get_base_layer()
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or weight is None or not weight.is_floating_point():
        # bitsandbytes layers subclass nn.Linear but hold packed integer weights
        raise ModelError(
            f"lm_head is a {type(head).__name__} without a dense float weight (quantized?); set train.kernels: false"
        )
    if head.bias is not None:
        raise ModelError("lm_head has a bias, which the fused cross-entropy does not support; set train.kernels: false")
    if getattr(_base_causal_lm(model).config, "final_logit_softcapping", None):
        raise ModelError(
            "the model soft-caps its logits, which the fused cross-entropy does not support; set train.kernels: false"
        )
    return LMHead(weight, adapters)


def chunked_loss_blocker(model: nn.Module) -> str | None:
    """Why `causal_lm_loss_sum` cannot compute this model's loss (one sentence), or None when it can."""
    try:
        head = lm_head_parts(model)
        _zero3_partitioned([head.weight, *(b.weight for _, _, b, _ in head.adapters)])
    except ModelError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _lm_head_replaced(base: nn.Module) -> Iterator[_HiddenCapture]:
    """lm_head swapped for a `_HiddenCapture` during the forward, restored after (also on error)."""
    head = base.get_output_embeddings()
    capture = _HiddenCapture()
    base.set_output_embeddings(capture)
    try:
        yield capture
    finally:
        base.set_output_embeddings(head)


def causal_lm_loss_sum(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
    trained_index: torch.Tensor | None = None,
    triton: bool | None = None,
    **attn_kwargs,
) -> torch.Tensor:
    """Sum of next-token cross-entropy over the trained tokens of packed rows [B, T] (labels unshifted).

    The model runs through its top-level forward (so DeepSpeed ZeRO-3's per-step trace, which resets
    in the top module's forward hook, completes and prefetching works) with lm_head replaced by a
    capture of its input: no logits are computed there, and under ZeRO-3 lm_head's weight is gathered
    once per call, for the chunked loss (whose backward only scales gradients computed in the forward,
    so it needs no second gather). `attn_kwargs` (cu_seq_lens_q/k, max_length_q/k for flash attention)
    go to attention unchanged. `trained_index`: the flat positions of labels[:, 1:] that carry loss,
    known on the host; only those enter the loss (index_select: no host sync). Without it every
    position enters and ignored ones count 0. `triton`: as in `fused_linear_cross_entropy` (False: the
    PyTorch chunks even on a GPU, for runs without train.kernels).
    """
    if input_ids.dim() != 2 or labels.shape != input_ids.shape or position_ids.shape != input_ids.shape:
        raise ValueError(
            f"expected input_ids, position_ids and labels of one shape [B, T], got {tuple(input_ids.shape)}, "
            f"{tuple(position_ids.shape)}, {tuple(labels.shape)}"
        )
    head = lm_head_parts(model)
    with _lm_head_replaced(_base_causal_lm(model)) as capture:
        model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=None,
            use_cache=False,
            logits_to_keep=0,  # every position reaches the capture
            **attn_kwargs,
        )
    hidden = capture.hidden  # [B, T, H]: the final norm's output, lm_head's input
    if hidden is None:
        raise ModelError(f"{type(model).__name__}'s forward did not call its lm_head; the chunked loss needs it")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    if trained_index is not None:  # only trained positions enter the loss
        h, y = h.index_select(0, trained_index), y.index_select(0, trained_index)
    lora_hidden, lora_weight = head.lora_inputs(h)
    with _gathered([head.weight, *(b.weight for _, _, b, _ in head.adapters)]):
        return fused_linear_cross_entropy(
            h,
            head.weight,
            y,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            lora_hidden=lora_hidden,
            lora_weight=lora_weight,
            triton=triton,
        )
