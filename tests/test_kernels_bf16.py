"""bf16 numerics of raysft.kernels (training runs in bf16), beside the fp32/fp16 checks of
test_kernels_numerics.py.

The Triton interpreter computes bf16 wrongly on CPU, so the Triton kernels' bf16 numerics are
GPU-marked tests (skipped without CUDA). Each one runs a kernel in bf16, forward and every gradient,
and compares it with its PyTorch reference computed in fp32 on the same (bf16-rounded) inputs and
upstream gradients, with two bounds:
- within bf16 tolerance of that fp32 result (ATOL x max |expected|, RTOL), and
- at most twice the error of the PyTorch reference itself run in bf16, plus one bf16 step of the
  scale (the criterion `tests/benchmarks/bench_kernels.py` applies to timings' runs).

On CPU without the interpreter the functional API runs the PyTorch path, which this CPU computes in
bf16 too (slowly: small shapes), so the same checks run there as plain CPU tests; for the fused loss
that path is its own chunked PyTorch code, not the full-logits reference. The references themselves
are checked in bf16 against transformers' Llama modules, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

BF16 = torch.bfloat16
ATOL, RTOL = 2e-2, 2e-2  # atol relative to max |expected|; bf16 keeps 8 bits of mantissa (2^-8 ~ 0.0039)
BF16_STEP = 2.0**-8

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the Triton interpreter computes bf16 wrongly on CPU"
)


@pytest.fixture
def cpu_reference_path(monkeypatch):
    """The CPU functional API without the Triton interpreter: the PyTorch path."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def run(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], inputs: list[torch.Tensor], upstream):
    """Forward `fn` on fresh leaf copies of `inputs` (cast to the inputs' own dtype), backward with
    `upstream` (one tensor per output, cast to each output's dtype); returns (outputs, input grads)."""
    leaves = [leaf(t) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, upstream))
    total.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def check_bf16(
    what: str,
    ours: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: list[torch.Tensor],
    names: list[str],
    upstream: list[torch.Tensor] | None = None,
) -> None:
    """`ours` on bf16 `inputs` against `reference` in fp32 (same values) and `reference` in bf16."""
    inputs = [t.to(BF16) for t in inputs]
    if upstream is None:
        with torch.no_grad():
            outs = reference(*inputs)
        upstream = [
            torch.randn_like(o, dtype=torch.float32).to(BF16) for o in (outs if isinstance(outs, tuple) else (outs,))
        ]
    got_y, got_g = run(ours, inputs, upstream)
    eager_y, eager_g = run(reference, inputs, upstream)
    exact_y, exact_g = run(reference, [t.float() for t in inputs], [g.float() for g in upstream])
    for i, (got, eager) in enumerate(zip(got_y, eager_y)):
        assert got.dtype == eager.dtype and got.shape == eager.shape, f"{what} output {i}: {got.dtype} {got.shape}"
    for name, got, eager in zip(names, got_g, eager_g):
        assert got is not None and got.dtype == eager.dtype == BF16, f"{what} {name}: gradient dtype"
    labels = [f"output {i}" for i in range(len(got_y))] + names
    for label, got, eager, exact in zip(labels, [*got_y, *got_g], [*eager_y, *eager_g], [*exact_y, *exact_g]):
        exact = exact.float()
        scale = max(exact.abs().max().item(), 1e-6)
        err = (got.float() - exact).abs().max().item()
        eager_err = (eager.float() - exact).abs().max().item()
        torch.testing.assert_close(
            got.float(), exact, atol=ATOL * scale, rtol=RTOL, msg=lambda m, label=label: f"{what} {label}: {m}"
        )
        assert err <= 2 * eager_err + BF16_STEP * scale, (
            f"{what} {label}: max error {err:.3g} vs eager bf16's {eager_err:.3g} (scale {scale:.3g})"
        )


# ----------------------------------------------------------------------------- the four kernels


def check_rms_norm(device: str, shape: tuple[int, ...]) -> None:
    from raysft.kernels import rms_norm, rms_norm_reference

    torch.manual_seed(0)
    x, w = torch.randn(shape, device=device), torch.rand(shape[-1], device=device) + 0.5
    check_bf16(
        f"rms_norm {shape}",
        lambda x, w: rms_norm(x, w, 1e-6),
        lambda x, w: rms_norm_reference(x, w, 1e-6),
        [x, w],
        ["dx", "dw"],
    )


def check_swiglu(device: str, shape: tuple[int, ...]) -> None:
    from raysft.kernels import swiglu, swiglu_reference

    torch.manual_seed(0)
    gate, up = torch.randn(shape, device=device) * 3, torch.randn(shape, device=device)
    check_bf16(f"swiglu {shape}", swiglu, swiglu_reference, [gate, up], ["d_gate", "d_up"])


def packed_cos_sin(batch: int, lengths: list[int], dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as the HF rotary embedding makes them for packed rows (positions restart per sample), in bf16."""
    pos = torch.cat([torch.arange(n) for n in lengths])[None].repeat(batch, 1).to(device)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    emb = torch.cat((pos[..., None].float() * inv,) * 2, dim=-1)
    return emb.cos().to(BF16), emb.sin().to(BF16)


def check_rope(device: str, heads: tuple[int, int], dim: int, lengths: list[int]) -> None:
    from raysft.kernels import apply_rotary, apply_rotary_reference

    torch.manual_seed(0)
    batch, seq = 2, sum(lengths)
    cos, sin = packed_cos_sin(batch, lengths, dim, device)
    # q/k as the attention makes them: transposed views of [B, T, H, D]
    q = torch.randn(batch, seq, heads[0], dim, device=device).to(BF16).transpose(1, 2)
    k = torch.randn(batch, seq, heads[1], dim, device=device).to(BF16).transpose(1, 2)

    def transposed(fn):  # leaves are [B, T, H, D]; the kernel sees the attention's [B, H, T, D] views
        return lambda q, k: fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    check_bf16(
        f"rope heads={heads} dim={dim}",
        transposed(apply_rotary),
        transposed(apply_rotary_reference),
        [q.transpose(1, 2), k.transpose(1, 2)],
        ["dq", "dk"],
    )


def labels_of(n: int, vocab: int, device: str) -> torch.Tensor:
    y = torch.randint(0, vocab, (n,))
    y[::3] = -100
    y[:7] = -100  # a run of ignored rows, as prompts make
    return y.to(device)


def check_fused_linear_cross_entropy(device: str, n: int, hidden: int, vocab: int, reduction: str) -> None:
    from raysft.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference

    torch.manual_seed(0)
    h, w = torch.randn(n, hidden, device=device) * 0.5, torch.randn(vocab, hidden, device=device) * 0.05
    y = labels_of(n, vocab, device)
    check_bf16(
        f"fused_linear_cross_entropy {reduction} N={n} H={hidden} V={vocab}",
        lambda h, w: fused_linear_cross_entropy(h, w, y, reduction=reduction),
        lambda h, w: linear_cross_entropy_reference(h, w, y, reduction=reduction),
        [h, w],
        ["d_hidden", "d_weight"],
        upstream=[torch.tensor(2.0, device=device)],  # a non-unit upstream gradient; the loss is fp32
    )


def check_fused_linear_cross_entropy_lora(device: str, n: int, hidden: int, vocab: int, rank: int) -> None:
    """The low-rank lm_head term's gradients in bf16, with a frozen base weight."""
    from raysft.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference

    torch.manual_seed(1)
    w = (torch.randn(vocab, hidden, device=device) * 0.05).to(BF16)
    y = labels_of(n, vocab, device)

    def with_lora(fn):
        return lambda h, u, b: fn(h, w.to(h.dtype), y, reduction="sum", lora_hidden=u, lora_weight=b)

    check_bf16(
        f"fused_linear_cross_entropy + LoRA N={n} V={vocab} r={rank}",
        with_lora(fused_linear_cross_entropy),
        with_lora(linear_cross_entropy_reference),
        [
            torch.randn(n, hidden, device=device),
            torch.randn(n, rank, device=device),
            torch.randn(vocab, rank, device=device) * 0.1,
        ],
        ["d_hidden", "d_lora_hidden", "d_lora_weight"],
        upstream=[torch.tensor(1.0, device=device)],
    )


# ----------------------------------------------------------------------------- on a GPU: the Triton kernels


def assert_triton_path(device: str) -> None:
    from raysft.kernels.backend import use_triton

    assert use_triton(torch.empty(1, device=device)), "the Triton path does not run on this device"


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(2, 37, 341), (5, 64), (1, 1, 1000), (4, 128, 2048)])
def test_rms_norm_bf16_on_gpu(shape):
    assert_triton_path("cuda")
    check_rms_norm("cuda", shape)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(3, 41, 77), (1, 1030), (2, 5, 1024), (4, 128, 5632)])
def test_swiglu_bf16_on_gpu(shape):
    assert_triton_path("cuda")
    check_swiglu("cuda", shape)


@gpu
@needs_cuda
@pytest.mark.parametrize("heads,dim", [((4, 2), 32), ((3, 3), 22), ((32, 8), 128)])
def test_rope_bf16_on_gpu(heads, dim):
    assert_triton_path("cuda")
    check_rope("cuda", heads, dim, [20, 11, 6])


@gpu
@needs_cuda
@pytest.mark.parametrize("n,hidden,vocab", [(67, 341, 4231), (13, 32, 40009), (512, 576, 49152)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_linear_cross_entropy_bf16_on_gpu(n, hidden, vocab, reduction):
    assert_triton_path("cuda")
    check_fused_linear_cross_entropy("cuda", n, hidden, vocab, reduction)


@gpu
@needs_cuda
def test_fused_linear_cross_entropy_lora_bf16_on_gpu():
    assert_triton_path("cuda")
    check_fused_linear_cross_entropy_lora("cuda", 45, 96, 1031, 5)


# ----------------------------------------------------------------------------- on CPU: the PyTorch path in bf16


def test_rms_norm_bf16_cpu_path(cpu_reference_path):
    check_rms_norm("cpu", (2, 9, 67))


def test_swiglu_bf16_cpu_path(cpu_reference_path):
    check_swiglu("cpu", (3, 41, 77))


def test_rope_bf16_cpu_path(cpu_reference_path):
    check_rope("cpu", (3, 1), 22, [9, 4])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_linear_cross_entropy_bf16_cpu_chunked_path(cpu_reference_path, reduction):
    """The CPU fused loss is its own chunked PyTorch code (logits turned into their gradient in place)."""
    check_fused_linear_cross_entropy("cpu", 29, 48, 1031, reduction)


def test_fused_linear_cross_entropy_lora_bf16_cpu_chunked_path(cpu_reference_path):
    check_fused_linear_cross_entropy_lora("cpu", 21, 32, 257, 4)


def test_references_are_the_hugging_face_modules_in_bf16():
    """The ground truth in bf16 is transformers' own Llama code, bit for bit, forward and gradients."""
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from raysft.kernels import apply_rotary_reference, rms_norm_reference, swiglu_reference

    torch.manual_seed(0)
    x = torch.randn(2, 9, 67).to(BF16)
    norm = LlamaRMSNorm(67, eps=1e-6).to(BF16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(67) + 0.5)
    dy = torch.randn(2, 9, 67).to(BF16)
    (hf_y,), (hf_dx,) = run(norm, [x], [dy])
    (ours_y,), (ours_dx, ours_dw) = run(lambda x, w: rms_norm_reference(x, w, 1e-6), [x, norm.weight], [dy])
    assert torch.equal(hf_y, ours_y) and torch.equal(hf_dx, ours_dx)
    assert torch.equal(norm.weight.grad, ours_dw)

    cos, sin = packed_cos_sin(2, [9, 4], 22, "cpu")
    q, k = torch.randn(2, 3, 13, 22).to(BF16), torch.randn(2, 1, 13, 22).to(BF16)
    up = [torch.randn(2, 3, 13, 22).to(BF16), torch.randn(2, 1, 13, 22).to(BF16)]
    hf = run(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), [q, k], up)
    ours = run(lambda q, k: apply_rotary_reference(q, k, cos, sin), [q, k], up)
    for a, b in zip([*hf[0], *hf[1]], [*ours[0], *ours[1]]):
        assert torch.equal(a, b)

    gate, value = torch.randn(3, 41, 77).to(BF16) * 3, torch.randn(3, 41, 77).to(BF16)
    dy = [torch.randn(3, 41, 77).to(BF16)]
    hf = run(lambda g, u: ACT2FN["silu"](g) * u, [gate, value], dy)
    ours = run(swiglu_reference, [gate, value], dy)
    for a, b in zip([*hf[0], *hf[1]], [*ours[0], *ours[1]]):
        assert torch.equal(a, b)
