"""Where a kernel runs: compiled Triton on CUDA tensors, the Triton interpreter on CPU tensors when
TRITON_INTERPRET=1, the PyTorch reference otherwise, so one config runs on every machine.

Triton is imported with a guard (it is optional on CPU installs). Kernels are wrapped in `Kernel`,
which builds the compiled (`triton.jit`) or interpreted variant on first use for the device at hand,
so the choice is made per call from the tensor's device and the environment at that moment, never
frozen at import time. Triton's own @jit helpers (tl.sum, tl.max, ...) are interpretable only when
TRITON_INTERPRET=1 was set before triton was first imported, so the CPU path also checks that.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

try:  # optional: the references work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None
    tl = SimpleNamespace(constexpr=int)  # only so that kernel annotations evaluate

HAS_TRITON = triton is not None


def interpreter_requested() -> bool:
    """True when the user asked Triton to interpret kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_ready() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1, so its @jit helpers run on the CPU."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def use_triton(tensor: torch.Tensor) -> bool:
    """Run the Triton kernel for `tensor`: on CUDA, or on CPU under TRITON_INTERPRET=1; else the reference."""
    if not HAS_TRITON:
        return False
    if tensor.is_cuda:
        return True
    if tensor.device.type != "cpu" or not interpreter_requested():
        return False
    if not interpreter_ready():
        warnings.warn(
            "TRITON_INTERPRET=1 was set after triton was imported; raysft.kernels uses the PyTorch references",
            stacklevel=3,
        )
        return False
    return True


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class Kernel:
    """A Triton kernel function, launched as `kernel[grid](*args)` on the tensors' device."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Any = None
        self._interpreted: Any = None

    def on(self, device: torch.device) -> Any:
        if device.type == "cpu":
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.jit(self.fn)
        return self._compiled


def kernel(fn: Callable[..., Any]) -> Kernel:
    """Decorator for the kernels of this package (instead of @triton.jit, see the module docstring)."""
    return Kernel(fn)


def num_warps(block: int) -> int:
    """Warps per program for a block of `block` elements per row (the rule Liger-Kernel and Unsloth use)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def num_programs(device: torch.device, n_rows: int) -> int:
    """How many persistent programs to launch for a row loop: one per SM on GPU, a few on CPU."""
    if device.type == "cuda":
        return max(1, min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))
