"""The chunked loss (issue 20 item 4): what GPU runs without train.kernels compute instead of full logits.

The PyTorch chunks of `fused_linear_cross_entropy(..., triton=False)` equal the full-logits loss and its
gradients (fp32, several chunk sizes, ignored rows, sum and mean), never allocate a [tokens, vocab] tensor
(every op's output is recorded with a TorchDispatchMode), and `step.loss_sum` takes them by default on
GPUs (`chunked_by_default`, patched here to say "GPU" on this CPU), falling back to full logits, said
once, for an lm_head they cannot represent.
"""

from __future__ import annotations

import importlib
import logging
import random

import pytest
import torch
from tiny import fp32_cfg
from torch.utils._python_dispatch import TorchDispatchMode

from raysft.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference
from raysft.pipeline.training import step as step_module
from raysft.pipeline.training.step import collate, loss_sum, reference_loss_sum

# the module (raysft.kernels' attribute of that name is the function)
flce = importlib.import_module("raysft.kernels.fused_linear_cross_entropy")


class LargestOutputs(TorchDispatchMode):
    """Records the shape of every tensor any op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def labels(n: int, vocab: int, ignored: str, seed: int = 0) -> torch.Tensor:
    y = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    if ignored == "some":
        y[::3] = -100
        y[:5] = -100
    elif ignored == "all":
        y[:] = -100
    return y


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 16, 1000])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chunked_equals_full_logits_loss_and_gradients(monkeypatch, rows_per_chunk, ignored, reduction):
    monkeypatch.setattr(flce, "_chunk_rows", lambda *a, **k: rows_per_chunk)
    torch.manual_seed(0)
    n, hidden, vocab = 53, 37, 811
    h, w = leaf(torch.randn(n, hidden) * 0.5), leaf(torch.randn(vocab, hidden) * 0.1)
    y = labels(n, vocab, ignored)
    loss = fused_linear_cross_entropy(h, w, y, reduction=reduction, triton=False)
    loss.backward(torch.tensor(2.0))  # a non-unit upstream gradient
    hr, wr = leaf(h), leaf(w)
    ref = linear_cross_entropy_reference(hr, wr, y, reduction=reduction)
    (2.0 * ref).backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(h.grad, hr.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-6, rtol=1e-5)
    if ignored == "all":
        assert loss.item() == 0.0 and not h.grad.any()


def test_chunked_loss_never_allocates_tokens_by_vocab():
    """The largest tensor of a chunked forward + backward holds one chunk of logits; the full-logits loss
    (the check's own control) allocates [N, V] several times."""
    n, hidden, vocab = 512, 64, 4099
    h, w = leaf(torch.randn(n, hidden)), leaf(torch.randn(vocab, hidden) * 0.1)
    y = labels(n, vocab, "some")
    largest = {}
    for name, reference in (("chunked", False), ("full", True)):
        with LargestOutputs() as seen:
            fused_linear_cross_entropy(h, w, y, reduction="sum", triton=False, reference=reference).backward()
        largest[name] = max(torch.Size(s).numel() for s in seen.shapes)
        h.grad = w.grad = None
    assert largest["full"] >= n * vocab, largest
    assert largest["chunked"] <= n * vocab // 4, largest  # one chunk (and the [V, H] weight gradient)


# ----------------------------------------------------------------------------- the step's default


def packed_micro_batch(seed: int = 4):
    rng = random.Random(seed)
    rows = []
    for _ in range(2):
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for _ in range(3):
            n_prompt, n_resp = rng.randint(2, 9), rng.randint(1, 12)
            ids = [rng.randrange(3, 500) for _ in range(n_prompt + n_resp)]
            row["input_ids"] += ids
            row["labels"] += [-100] * n_prompt + ids[n_prompt:]
            row["position_ids"] += list(range(len(ids)))
        rows.append(row)
    return collate(rows)


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """`loss_sum` decides as on a GPU (the only thing patched: the device test)."""
    monkeypatch.setattr(step_module, "chunked_by_default", lambda device: True)


def test_gpu_default_is_chunked_and_equals_the_full_logits_step(tiny_model_dir, as_on_a_gpu, monkeypatch):
    """On a GPU without train.kernels the step's loss is the PyTorch chunks: with 8-row chunks no tensor
    wider than 8 rows of logits appears, and loss and LoRA gradients equal the full-logits step's."""
    from raysft.pipeline.models.load import build_model

    monkeypatch.setattr(flce, "_chunk_rows", lambda *a, **k: 8)
    model = build_model(fp32_cfg(tiny_model_dir))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    mb = packed_micro_batch()
    assert mb.n_trained > 16
    with LargestOutputs() as seen:
        chunked = loss_sum(model, mb)
        chunked.backward()
    vocab, weight_t = model.config.vocab_size, (model.config.hidden_size, model.config.vocab_size)
    logit_rows = [torch.Size(s).numel() // vocab for s in seen.shapes if s and s[-1] == vocab and s != weight_t]
    assert logit_rows and max(logit_rows) <= 8, max(logit_rows)  # the full path: [B, T, V]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    full = reference_loss_sum(model, mb.input_ids, mb.position_ids, mb.labels)
    full.backward()
    assert abs(chunked.item() - full.item()) <= 1e-5 * full.item()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_cpu_default_is_full_logits(tiny_model_dir):
    assert step_module.chunked_by_default(torch.device("cuda", 0))
    assert not step_module.chunked_by_default(torch.device("cpu"))


def test_an_lm_head_the_chunks_cannot_represent_falls_back_to_full_logits_said_once(
    tiny_model_dir, as_on_a_gpu, caplog
):
    from raysft.pipeline.models.load import build_model

    model = build_model(fp32_cfg(tiny_model_dir))
    model.get_base_model().config.final_logit_softcapping = 30.0  # Llama ignores it; the fused loss refuses it
    mb = packed_micro_batch()
    with caplog.at_level(logging.WARNING, logger=step_module.__name__):
        losses = [loss_sum(model, mb).item() for _ in range(2)]
    said = [r.getMessage() for r in caplog.records if "full logits" in r.getMessage()]
    assert len(said) == 1 and "soft-caps its logits" in said[0], said
    assert losses[0] == pytest.approx(reference_loss_sum(model, mb.input_ids, mb.position_ids, mb.labels).item())
