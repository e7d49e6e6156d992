"""Numerics of raysft.kernels on CPU through the Triton interpreter: outputs and every gradient vs the
PyTorch references (odd shapes, fp32 and fp16, ignored and all-ignored rows) and vs Liger-Kernel.

TRITON_INTERPRET=1 must be set before triton is first imported, so the real tests run in a child
pytest process started by `test_numerics_under_triton_interpreter`; in the parent they are skipped
(and nothing in the parent process changes for other tests).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.skipif(INTERPRETED, reason="this is the parent test")
def test_numerics_under_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x", "-W", "ignore"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent,
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\b1 skipped", summary), f"only this parent test may skip in the child: {summary}"


def test_cpu_without_interpreter_uses_references(monkeypatch):
    """Without a GPU and without TRITON_INTERPRET=1 the functional API is the PyTorch reference."""
    from raysft.kernels import backend, rms_norm, rms_norm_reference

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(3, 7), torch.rand(7)
    assert not backend.use_triton(x)
    assert torch.equal(rms_norm(x, w), rms_norm_reference(x, w))


# ----------------------------------------------------------------------------- helpers (child only)

TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (4e-3, 1e-2)}  # (atol relative to max |expected|, rtol)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOL[dtype]
    scale = max(expected.detach().abs().max().item(), 1e-6)
    torch.testing.assert_close(
        actual.detach().float(), expected.detach().float(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def assert_matches_liger(ours, liger, inputs: list[torch.Tensor], grad_names: list[str], dtype: torch.dtype) -> None:
    """Forward + backward (same upstream gradient) through ours and Liger on copies of the same leaf
    inputs; outputs and input gradients must agree."""
    y = ours(*inputs)
    dy = torch.randn_like(y)
    y.backward(dy)
    copies = [leaf(t) for t in inputs]
    yl = liger(*copies)
    expected_y = yl.detach().clone()  # some Liger backwards write their gradients over the saved inputs
    yl.backward(dy.clone())
    assert_close(y, expected_y, dtype, "y vs Liger")
    for t, copy, name in zip(inputs, copies, grad_names):
        assert_close(t.grad, copy.grad, dtype, f"{name} vs Liger")


def assert_triton_path(t: torch.Tensor) -> None:
    from raysft.kernels.backend import use_triton

    assert use_triton(t), "the Triton path did not run (interpreter not active?)"


# ----------------------------------------------------------------------------- RMSNorm


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 37, 341), (5, 64), (1, 1, 1000)])
def test_rms_norm_matches_reference(dtype, shape):
    from raysft.kernels import rms_norm, rms_norm_reference

    torch.manual_seed(0)
    x = leaf(torch.randn(shape).to(dtype))
    w = leaf((torch.rand(shape[-1]) + 0.5).to(dtype))
    assert_triton_path(x)
    y = rms_norm(x, w, 1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr, wr = leaf(x), leaf(w)
    yr = rms_norm_reference(xr, wr, 1e-6)
    yr.backward(dy)
    assert y.dtype == yr.dtype and y.shape == yr.shape
    assert_close(y, yr, dtype, "y")
    assert_close(x.grad, xr.grad, dtype, "dx")
    assert_close(w.grad, wr.grad, dtype, "dw")


@in_child
def test_rms_norm_fp16_input_fp32_weight_promotes_like_hf():
    from raysft.kernels import rms_norm, rms_norm_reference

    x, w = leaf(torch.randn(9, 341).half()), leaf(torch.rand(341) + 0.5)
    y = rms_norm(x, w)
    yr = rms_norm_reference(leaf(x), leaf(w))
    assert y.dtype == yr.dtype == torch.float32
    assert_close(y, yr, torch.float16, "y")
    y.sum().backward()
    assert x.grad.dtype == torch.float16 and w.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- SwiGLU


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 41, 77), (1, 1030), (2, 5, 1024)])
def test_swiglu_matches_reference(dtype, shape):
    from raysft.kernels import swiglu, swiglu_reference

    torch.manual_seed(0)
    gate, up = leaf(torch.randn(shape).to(dtype) * 3), leaf(torch.randn(shape).to(dtype))
    assert_triton_path(gate)
    y = swiglu(gate, up)
    dy = torch.randn_like(y)
    y.backward(dy)
    gr, ur = leaf(gate), leaf(up)
    swiglu_reference(gr, ur).backward(dy)
    assert_close(y, swiglu_reference(gate, up), dtype, "y")
    assert_close(gate.grad, gr.grad, dtype, "d_gate")
    assert_close(up.grad, ur.grad, dtype, "d_up")


# ----------------------------------------------------------------------------- RoPE


def _packed_cos_sin(batch: int, lengths: list[int], dim: int, dtype: torch.dtype, per_batch: bool):
    """cos/sin as the HF rotary embedding makes them for packed rows (positions restart per sample)."""
    pos = torch.cat([torch.arange(n) for n in lengths])[None].repeat(batch if per_batch else 1, 1)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = pos[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,dim,per_batch", [((4, 2), 32, False), ((3, 3), 22, True), ((5, 1), 64, True)])
def test_rope_matches_reference(dtype, heads, dim, per_batch):
    from raysft.kernels import apply_rotary, apply_rotary_reference

    torch.manual_seed(0)
    batch, lengths = 2, [20, 11, 6]  # T = 37, not a power of two
    seq = sum(lengths)
    cos, sin = _packed_cos_sin(batch, lengths, dim, dtype, per_batch)
    # q/k as the attention makes them: transposed views of [B, T, H, D]
    q = leaf(torch.randn(batch, seq, heads[0], dim).to(dtype)).transpose(1, 2)
    k = leaf(torch.randn(batch, seq, heads[1], dim).to(dtype)).transpose(1, 2)
    q.retain_grad(), k.retain_grad()
    assert_triton_path(q)
    qo, ko = apply_rotary(q, k, cos, sin)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    ((qo * dq).sum() + (ko * dk).sum()).backward()
    qr, kr = leaf(q), leaf(k)
    qro, kro = apply_rotary_reference(qr, kr, cos, sin)
    ((qro * dq).sum() + (kro * dk).sum()).backward()
    assert_close(qo, qro, dtype, "q_embed")
    assert_close(ko, kro, dtype, "k_embed")
    assert_close(q.grad, qr.grad, dtype, "dq")
    assert_close(k.grad, kr.grad, dtype, "dk")


# ----------------------------------------------------------------------------- fused linear cross-entropy


def _labels(n: int, vocab: int, ignored: str) -> torch.Tensor:
    y = torch.randint(0, vocab, (n,))
    if ignored == "some":
        y[::3] = -100
        y[:7] = -100  # a run of ignored rows, as prompts make
    elif ignored == "all":
        y[:] = -100
    return y


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_linear_cross_entropy_matches_reference(dtype, ignored, reduction):
    from raysft.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference

    torch.manual_seed(0)
    n, hidden, vocab = 67, 341, 4231  # odd shapes; 67 rows span several chunks
    h = leaf((torch.randn(n, hidden) * 0.5).to(dtype))
    w = leaf((torch.randn(vocab, hidden) * 0.05).to(dtype))
    y = _labels(n, vocab, ignored)
    assert_triton_path(h)
    loss = fused_linear_cross_entropy(h, w, y, reduction=reduction)
    loss.backward(torch.tensor(2.0))  # a non-unit upstream gradient
    hr, wr = leaf(h.float()), leaf(w.float())
    ref = linear_cross_entropy_reference(hr, wr, y, reduction=reduction)
    (2.0 * ref).backward()
    assert loss.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    assert_close(h.grad, hr.grad, dtype, "d_hidden")
    assert_close(w.grad, wr.grad, dtype, "d_weight")
    if ignored == "all":
        assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_linear_cross_entropy_vocab_spanning_several_blocks(dtype):
    """Vocab 10007 > the CPU block of 8192: the online softmax runs over a full and a partial block."""
    from raysft.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference

    torch.manual_seed(5)
    n, hidden, vocab = 13, 32, 10007
    h, w = leaf(torch.randn(n, hidden).to(dtype)), leaf((torch.randn(vocab, hidden) * 0.3).to(dtype))
    y = _labels(n, vocab, "some")
    y[-1] = vocab - 1  # a target in the partial block
    loss = fused_linear_cross_entropy(h, w, y, reduction="mean")
    loss.backward()
    hr, wr = leaf(h.float()), leaf(w.float())
    ref = linear_cross_entropy_reference(hr, wr, y, reduction="mean")
    ref.backward()
    assert abs(loss.item() - ref.item()) <= (1e-5 if dtype == torch.float32 else 2e-3) * abs(ref.item())
    assert_close(h.grad, hr.grad, dtype, "d_hidden")
    assert_close(w.grad, wr.grad, dtype, "d_weight")


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_linear_cross_entropy_lora_term_and_frozen_weight(dtype):
    """The low-rank lm_head term gets exact gradients; a frozen weight gets none and costs no buffer."""
    from raysft.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference

    torch.manual_seed(1)
    n, hidden, vocab, rank = 45, 96, 1031, 5
    h = leaf(torch.randn(n, hidden).to(dtype))
    w = (torch.randn(vocab, hidden) * 0.05).to(dtype)  # frozen base weight
    u, b = leaf(torch.randn(n, rank).to(dtype)), leaf((torch.randn(vocab, rank) * 0.1).to(dtype))
    y = _labels(n, vocab, "some")
    loss = fused_linear_cross_entropy(h, w, y, reduction="sum", lora_hidden=u, lora_weight=b)
    loss.backward()
    hr, ur, br = leaf(h.float()), leaf(u.float()), leaf(b.float())
    linear_cross_entropy_reference(hr, w.float(), y, reduction="sum", lora_hidden=ur, lora_weight=br).backward()
    assert w.grad is None
    assert_close(h.grad, hr.grad, dtype, "d_hidden")
    assert_close(u.grad, ur.grad, dtype, "d_lora_hidden")
    assert_close(b.grad, br.grad, dtype, "d_lora_weight")


@in_child
def test_torch_chunk_step_matches_kernel(monkeypatch):
    """The CPU fallback (PyTorch chunk step) and the Triton kernel give the same loss and gradients."""
    from raysft.kernels import fused_linear_cross_entropy

    torch.manual_seed(2)
    h, w = leaf(torch.randn(50, 341)), leaf(torch.randn(4231, 341) * 0.05)
    y = _labels(50, 4231, "some")
    fused_linear_cross_entropy(h, w, y).backward()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h2, w2 = leaf(h), leaf(w)
    fused_linear_cross_entropy(h2, w2, y).backward()
    assert_close(h.grad, h2.grad, torch.float32, "d_hidden")
    assert_close(w.grad, w2.grad, torch.float32, "d_weight")


# ----------------------------------------------------------------------------- against Liger-Kernel


@pytest.fixture
def liger_in_interpreter(monkeypatch):
    """Run Liger's kernels in Triton 3.9's interpreter: they call `.to()` on float arguments, which the
    interpreter passes as Python floats (the compiler passes fp32 scalars), so floats are wrapped as fp32
    scalars for these comparisons only."""
    pytest.importorskip("liger_kernel")
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    original = interpreter._implicit_cvt

    def convert(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", convert)
    # Liger's RMSNorm calls libdevice's rsqrt, an extern the interpreter cannot run; tl.math.rsqrt is the same op
    import liger_kernel.ops.rms_norm as liger_rms_norm

    monkeypatch.setattr(liger_rms_norm, "rsqrt", lambda x: tl.math.rsqrt(x))


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_linear_cross_entropy_matches_liger(liger_in_interpreter, dtype, reduction):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    from raysft.kernels import fused_linear_cross_entropy

    torch.manual_seed(3)
    n, hidden, vocab = 67, 341, 4231
    h, w = leaf((torch.randn(n, hidden) * 0.5).to(dtype)), leaf((torch.randn(vocab, hidden) * 0.05).to(dtype))
    y = _labels(n, vocab, "some")
    loss = fused_linear_cross_entropy(h, w, y, reduction=reduction)
    loss.backward()
    hl, wl = leaf(h), leaf(w)
    liger = LigerFusedLinearCrossEntropyFunction.apply(hl, wl, y, None, None, -100, 0.0, 0.0, reduction)[0]
    liger.backward()
    assert abs(loss.item() - liger.float().item()) <= (1e-5 if dtype == torch.float32 else 2e-3) * max(
        1.0, abs(loss.item())
    )
    assert_close(h.grad, hl.grad, dtype, "d_hidden vs Liger")
    assert_close(w.grad, wl.grad, dtype, "d_weight vs Liger")


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_matches_liger(liger_in_interpreter, dtype):
    from liger_kernel.ops.rope import LigerRopeFunction

    from raysft.kernels import apply_rotary

    torch.manual_seed(4)
    batch, lengths, dim = 2, [20, 17], 32
    cos, sin = _packed_cos_sin(1, lengths, dim, dtype, per_batch=False)
    q = leaf(torch.randn(batch, 37, 4, dim).to(dtype)).transpose(1, 2)
    k = leaf(torch.randn(batch, 37, 2, dim).to(dtype)).transpose(1, 2)
    q.retain_grad(), k.retain_grad()
    qo, ko = apply_rotary(q, k, cos, sin)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    ((qo * dq).sum() + (ko * dk).sum()).backward()
    ql, kl = leaf(q), leaf(k)
    qlo, klo = LigerRopeFunction.apply(ql, kl, cos, sin)
    ((qlo * dq).sum() + (klo * dk).sum()).backward()
    assert_close(qo, qlo, dtype, "q_embed vs Liger")
    assert_close(ko, klo, dtype, "k_embed vs Liger")
    assert_close(q.grad, ql.grad, dtype, "dq vs Liger")
    assert_close(k.grad, kl.grad, dtype, "dk vs Liger")


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_matches_liger(liger_in_interpreter, dtype):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    from raysft.kernels import rms_norm

    torch.manual_seed(6)
    x, w = leaf(torch.randn(2, 37, 341).to(dtype)), leaf((torch.rand(341) + 0.5).to(dtype))
    assert_matches_liger(
        lambda x, w: rms_norm(x, w, 1e-6),
        lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False),
        [x, w],
        ["dx", "dw"],
        dtype,
    )


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_matches_liger(liger_in_interpreter, dtype):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    from raysft.kernels import swiglu

    torch.manual_seed(7)
    gate, up = leaf(torch.randn(3, 41, 77).to(dtype) * 3), leaf(torch.randn(3, 41, 77).to(dtype))
    assert_matches_liger(swiglu, LigerSiLUMulFunction.apply, [gate, up], ["d_gate", "d_up"], dtype)
