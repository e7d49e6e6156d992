"""train/step.py without Ray: packed == per-sample (loss and LoRA grads), use_cache regression, TorchEngine step."""

from __future__ import annotations

import random

import pytest
import torch
from tiny import fp32_cfg

from raysft.pipeline.data.schema import IGNORE_INDEX as IGNORE
from raysft.pipeline.models.load import build_model
from raysft.pipeline.training.step import (
    TorchEngine,
    collate,
    eval_loss_sum,
    loss_sum,
    make_optimizer,
    optimizer_step,
)

pytestmark = pytest.mark.smoke  # in `make test-latest`'s canary subset


def random_sample(rng: random.Random, vocab: int, sid: int) -> dict:
    """One sample: a prompt (untrained) and a response (trained); the first token never trained."""
    n_prompt, n_resp = rng.randint(2, 9), rng.randint(1, 12)
    ids = [rng.randrange(3, vocab) for _ in range(n_prompt + n_resp)]
    labels = [IGNORE] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids))), "source_ids": [sid]}


def pack(samples: list[dict]) -> dict:
    row = {"input_ids": [], "labels": [], "position_ids": [], "source_ids": [], "seq_lengths": []}
    for s in samples:
        for k in ("input_ids", "labels", "position_ids", "source_ids"):
            row[k] += s[k]
        row["seq_lengths"].append(len(s["input_ids"]))
    return row


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = build_model(fp32_cfg(tiny_model_dir))
    # Non-zero LoRA B so the adapter changes the output and its gradients are all informative.
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def test_packed_equals_per_sample_loss_and_grads(model):
    rng = random.Random(0)
    samples = [random_sample(rng, 500, i) for i in range(4)]
    n_total = sum(collate([s]).n_trained for s in samples)

    model.zero_grad(set_to_none=True)
    packed = collate([pack(samples)])
    assert packed.n_trained == n_total
    loss_packed = loss_sum(model, packed) / n_total
    loss_packed.backward()
    g_packed = lora_grads(model)

    model.zero_grad(set_to_none=True)
    loss_sep = sum(loss_sum(model, collate([s])) for s in samples) / n_total
    loss_sep.backward()
    g_sep = lora_grads(model)

    assert abs(float(loss_packed) - float(loss_sep)) < 1e-5
    assert g_packed.keys() == g_sep.keys() and len(g_packed) > 0
    for name in g_packed:
        assert torch.allclose(g_packed[name], g_sep[name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_multi_row_micro_batch_equals_one_row_at_a_time(model, layout):
    """A micro-batch of 3 packed rows (kept as separate sequences) gives the loss and LoRA gradients of
    3 one-row micro-batches within 1e-5; "rows" stacks them [3, T_max], "flat" carries cu_seq_lens."""
    rng = random.Random(1)
    rows = [pack([random_sample(rng, 500, 2 * i), random_sample(rng, 500, 2 * i + 1)]) for i in range(3)]
    mb = collate(rows, layout)
    lengths = [len(r["input_ids"]) for r in rows]
    assert mb.n_trained == sum(collate([r]).n_trained for r in rows) and mb.n_tokens == sum(lengths)
    assert mb.source_ids == [0, 1, 2, 3, 4, 5]
    if layout == "rows":
        assert tuple(mb.input_ids.shape) == (3, max(lengths)) and not mb.attn_kwargs
    else:
        assert mb.input_ids.shape[0] == 1 and mb.attn_kwargs["cu_seq_lens_q"].tolist()[-1] == sum(lengths)
        assert len(mb.attn_kwargs["cu_seq_lens_q"]) == 6 + 1  # one segment per packed sample
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    a = loss_sum(model, mb)
    a.backward()
    grads_a = [p.grad.clone() for p in params]
    model.zero_grad()
    b = sum(loss_sum(model, collate([r], layout)) for r in rows)
    b.backward()
    assert abs(float(a) - float(b)) < 1e-5 * max(1.0, abs(float(b)))
    for ga, p in zip(grads_a, params):
        assert torch.allclose(ga, p.grad, atol=1e-5, rtol=1e-5)
    model.zero_grad()


def test_trained_counts_match_collate():
    import pyarrow as pa

    rng = random.Random(3)
    rows = [pack([random_sample(rng, 500, 2 * i), random_sample(rng, 500, 2 * i + 1)]) for i in range(5)]
    rows.append({"input_ids": [], "labels": [], "position_ids": [], "source_ids": []})
    table = pa.Table.from_pylist(rows)
    from raysft.pipeline.training.step import collate_table, trained_counts

    assert trained_counts(table.column("labels")).tolist() == [collate([r]).n_trained for r in rows]
    for layout in ("rows", "flat"):
        mb = collate_table(table, [3, 0, 1], layout)
        ref = collate([rows[3], rows[0], rows[1]], layout)
        assert torch.equal(mb.input_ids, ref.input_ids) and torch.equal(mb.labels, ref.labels)
        assert mb.source_ids == ref.source_ids and mb.n_trained == ref.n_trained


def test_kv_cache_regression_packed_forward_needs_use_cache_false(model):
    """In eval mode the default use_cache=True lets packed samples see each other; ours never does."""
    rng = random.Random(2)
    s1, s2 = random_sample(rng, 500, 0), random_sample(rng, 500, 1)
    mb = collate([pack([s1, s2])])
    model.eval()
    model.config.use_cache = True  # what a stock checkpoint says; our forwards must not depend on it
    with torch.no_grad():
        sep = model(input_ids=collate([s2]).input_ids, use_cache=False).logits[0]
        ours_sum, _ = eval_loss_sum(model, [mb])
        kw = dict(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=None)
        isolated = model(**kw, use_cache=False).logits[0, len(s1["input_ids"]) :]
        leaky = model(**kw, use_cache=True).logits[0, len(s1["input_ids"]) :]
        per_sample = float(loss_sum(model, collate([s1]))) + float(loss_sum(model, collate([s2])))
    model.config.use_cache = False
    model.train()
    assert torch.allclose(isolated, sep, atol=1e-5)
    assert abs(ours_sum - per_sample) < 1e-4
    # If this ever stops failing, transformers changed: the test documents why use_cache=False matters.
    assert (leaky - sep).abs().max() > 1e-3


def test_torch_engine_step_updates_only_lora_and_loss_drops(tiny_model_dir):
    cfg = fp32_cfg(tiny_model_dir, **{"train.lr": 1e-2, "train.warmup_steps": 0, "train.scheduler": "constant"})
    model = build_model(cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt, sched = make_optimizer(model, cfg.train, 10)
    engine = TorchEngine(model, opt, sched, cfg.train.max_grad_norm)
    rng = random.Random(3)
    mbs = [collate([pack([random_sample(rng, 500, i) for i in range(3)])]) for _ in range(2)]
    n = sum(m.n_trained for m in mbs)
    losses = [optimizer_step(engine, mbs, n).loss_sum / n for _ in range(8)]
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name


def test_kernels_path_matches_reference_loss_and_grads(tiny_model_dir):
    """train.kernels: patched model + raysft.kernels.causal_lm_loss_sum == the reference step (fp32)."""
    rng = random.Random(4)
    mb = collate([pack([random_sample(rng, 500, i) for i in range(3)])])
    out = {}
    for kernels in (False, True):
        model = build_model(fp32_cfg(tiny_model_dir, **{"train.kernels": kernels}))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        s = loss_sum(model, mb, kernels=kernels)
        s.backward()
        out[kernels] = (float(s), lora_grads(model))
    assert abs(out[True][0] - out[False][0]) < 1e-4 * max(1.0, abs(out[False][0]))
    for name, g in out[False][1].items():
        assert torch.allclose(out[True][1][name], g, atol=1e-5, rtol=1e-4), name


def test_reported_lr_is_the_rate_of_that_update(tiny_model_dir):
    cfg = fp32_cfg(tiny_model_dir, **{"train.lr": 1e-3, "train.warmup_steps": 2, "train.scheduler": "linear"})
    model = build_model(cfg)
    opt, sched = make_optimizer(model, cfg.train, 6)
    engine = TorchEngine(model, opt, sched)
    mb = collate([random_sample(random.Random(5), 500, 0)])
    lrs = [optimizer_step(engine, [mb], mb.n_trained).lr for _ in range(6)]
    assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[1] == pytest.approx(2e-3 / 3) and lrs[2] == pytest.approx(1e-3)
    assert lrs[3] > lrs[4] > lrs[5] > 0


class SyncCounter:
    """Counts host syncs raysft code asks for: Tensor.item / __float__ / __int__ / __bool__ / tolist / cpu /
    numpy called from raysft's own frames (pipeline/, kernels/), and torch.equal anywhere (the fused CE's
    backward used it). torch's and DeepSpeed's internals are not raysft's to change and are not counted."""

    METHODS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")

    def __init__(self, monkeypatch):
        import sys

        self.calls: list[str] = []

        def ours(depth: int = 2) -> str | None:
            f = sys._getframe(depth)
            path = f.f_code.co_filename.replace("\\", "/")
            if ("/pipeline/" in path or "/kernels/" in path) and "/site-packages/" not in path:
                return f"{path.rsplit('/', 1)[-1]}:{f.f_lineno}"
            return None

        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, _name=name, **k):
                site = ours()
                if site is not None:
                    self.calls.append(f"{_name} at {site}")
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)
        equal = torch.equal

        def counted_equal(*a, **k):
            self.calls.append("torch.equal")
            return equal(*a, **k)

        monkeypatch.setattr(torch, "equal", counted_equal)


@pytest.mark.parametrize("kernels", [False, True, "chunked"])
def test_one_host_sync_per_optimizer_step(tiny_model_dir, monkeypatch, kernels):
    """The loop's step (training/loop.train_step: 3 micro-batches, the step's all-reduce, the preemption flag,
    the grad norm) reads the device once: the loss sums, token counts, notices and grad norm come back together.
    "chunked": kernels off with the loss a GPU takes by default (the PyTorch chunks, step.chunked_by_default)."""
    from raysft.pipeline.training import step as step_module
    from raysft.pipeline.training.loop import train_step

    if kernels == "chunked":
        monkeypatch.setattr(step_module, "chunked_by_default", lambda device: True)
        kernels = False
    cfg = fp32_cfg(tiny_model_dir, **{"train.kernels": kernels})
    model = build_model(cfg)
    opt, sched = make_optimizer(model, cfg.train, 4)
    engine = TorchEngine(model, opt, sched, cfg.train.max_grad_norm)
    rng = random.Random(6)
    mbs = [collate([pack([random_sample(rng, 500, 3 * k + i) for i in range(3)])]) for k in range(3)]
    n = sum(m.n_trained for m in mbs)
    expected = optimizer_step(engine, mbs, n).loss_sum  # warm (the optimizer's state is created here)
    counter = SyncCounter(monkeypatch)
    res = train_step(engine, mbs, n, world=1, kernels=kernels, device=torch.device("cpu"), pending=lambda: None)
    monkeypatch.undo()
    assert len(counter.calls) <= 1, counter.calls
    assert res.tokens == sum(m.n_tokens for m in mbs) and res.notices == 0
    assert res.loss_sum == pytest.approx(expected, rel=0.2) and res.grad_norm > 0
