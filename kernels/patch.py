"""Opt-in, per-instance, reversible kernel patching of Hugging Face Llama-family causal LMs.

`patch_model(model)` replaces the `forward` of THIS model's RMSNorm, attention (for RoPE) and MLP
(for SwiGLU) modules by instance attributes that call raysft.kernels; classes, module globals and
every other model in the process stay untouched, and `KernelPatch.unpatch()` restores each module's
previous state exactly. Works on plain and PEFT-wrapped models (LoRA layers, a 4-bit base): the
projections are called as they are, only the norm, rotary and activation math changes. Without a
GPU the kernels fall back to their PyTorch references, so a patched model runs anywhere.
"""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from raysft.pipeline.errors import ModelError

from .rms_norm import rms_norm
from .rope import apply_rotary
from .swiglu import swiglu

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_PATCHES: weakref.WeakKeyDictionary[nn.Module, KernelPatch] = weakref.WeakKeyDictionary()
_MISSING = object()


@dataclass
class KernelPatch:
    """What `patch_model` changed on one model, and how to undo it."""

    model: nn.Module
    counts: dict[str, int] = field(default_factory=dict)  # kind -> modules patched
    _saved: list[tuple[nn.Module, Any]] = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        return _PATCHES.get(self.model) is self

    def unpatch(self) -> None:
        """Restore every patched module's own `forward` attribute (or its absence); idempotent."""
        for module, previous in reversed(self._saved):
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        self._saved.clear()
        if _PATCHES.get(self.model) is self:
            del _PATCHES[self.model]

    def __enter__(self) -> KernelPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()


# ----------------------------------------------------------------------------- replacement forwards


def _rms_norm_forward(self: nn.Module, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: nn.Module, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _make_attention_forward(fallback: Callable[..., Any]) -> Callable[..., Any]:
    """Llama/Mistral/Qwen2/Qwen3 attention with apply_rotary; a KV cache (generation) takes `fallback`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is not None or kwargs.get("past_key_values") is not None:
            return fallback(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )
        kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        if getattr(self, "q_norm", None) is not None:  # Qwen3 normalises q and k per head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos, sin)
        eager = sys.modules[type(self).__module__].eager_attention_forward
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        sliding = (
            self.sliding_window if hasattr(self, "sliding_window") else getattr(self.config, "sliding_window", None)
        )
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=sliding,
            **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    return forward


# ----------------------------------------------------------------------------- patching


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight") and hasattr(m, "variance_epsilon")


def _is_attention(m: nn.Module) -> bool:
    return type(m).__name__.endswith("Attention") and all(
        hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    )


def _is_swiglu_mlp(m: nn.Module, hidden_act: str) -> bool:
    return (
        type(m).__name__.endswith("MLP")
        and all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))
        and hidden_act in ("silu", "swish")
    )


def patch_model(model: nn.Module, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True) -> KernelPatch:
    """Swap RMSNorm, RoPE and the SwiGLU activation on this model instance; returns the undo handle."""
    model_type = _model_type(model)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"train.kernels supports model types {', '.join(SUPPORTED_MODEL_TYPES)}, "
            f"not {model_type or type(model).__name__!r}; "
            "set train.kernels: false"
        )
    if model in _PATCHES:
        raise ModelError("this model is already patched with raysft kernels; call unpatch() first")
    hidden_act = getattr(model.config, "hidden_act", "silu")
    patch = KernelPatch(model)

    def swap(module: nn.Module, kind: str, forward: Callable[..., Any]) -> None:
        patch._saved.append((module, module.__dict__.get("forward", _MISSING)))
        module.__dict__["forward"] = types.MethodType(forward, module)
        patch.counts[kind] = patch.counts.get(kind, 0) + 1

    for module in model.modules():
        if rms_norm and _is_rms_norm(module):
            swap(module, "rms_norm", _rms_norm_forward)
        elif rope and _is_attention(module):
            swap(module, "rope", _make_attention_forward(module.forward))
        elif swiglu and _is_swiglu_mlp(module, hidden_act):
            swap(module, "swiglu", _mlp_forward)
    if not patch.counts:
        raise ModelError(f"found no RMSNorm, attention or MLP module to patch in {type(model).__name__}")
    _PATCHES[model] = patch
    return patch
