"""dtype auto: bf16 where the hardware computes it natively, float32 elsewhere; said once, with its reason."""

from __future__ import annotations

import logging

import pytest
import yaml

from raysft.pipeline import load_config
from raysft.pipeline.models import precision

pytestmark = pytest.mark.smoke  # in `make test-latest`'s canary subset


@pytest.fixture(autouse=True)
def _fresh_said():
    precision._said.clear()
    yield
    precision._said.clear()


def _cfg(*overrides: str):
    given = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}
    return load_config(None, overrides={"model.name_or_path": "x", "data.train": "t.jsonl", **given})


@pytest.mark.parametrize(
    ("native", "chosen", "reason"),
    [
        (False, "float32", "has no native bf16; bf16 would be about 15x slower here"),
        (True, "bfloat16", "computes bf16 natively"),
    ],
)
def test_auto_on_both_cpu_kinds(monkeypatch, caplog, native, chosen, reason):
    caplog.set_level(logging.INFO, logger="raysft")
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: native)
    monkeypatch.setattr(precision, "cpu_name", lambda: "Test CPU 9000")
    cfg = _cfg()
    assert (cfg.model.dtype, cfg.model.compute_dtype) == ("auto", "auto")  # the default
    out = precision.resolve(cfg)
    assert (out.model.dtype, out.model.compute_dtype) == (chosen, chosen)
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"raysft: dtype auto -> {chosen}: this CPU (Test CPU 9000) {reason}."]
    assert caplog.records[0].levelno == logging.INFO
    caplog.clear()
    precision.resolve(cfg)  # said once per process
    assert not caplog.records
    assert precision.describe(cfg) == f"dtype auto -> {chosen}: this CPU (Test CPU 9000) {reason}."


def test_explicit_bfloat16_on_a_cpu_without_it_runs_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(precision, "cpu_name", lambda: "AVX2 box")
    cfg = _cfg("model.dtype=bfloat16", "model.compute_dtype=bfloat16")
    out = precision.resolve(cfg)
    assert (out.model.dtype, out.model.compute_dtype) == ("bfloat16", "bfloat16")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert [r.getMessage() for r in caplog.records] == [
        "raysft: model.dtype and model.compute_dtype bfloat16 on a CPU without native bf16 (AVX2 box) runs about "
        "15x slower than float32; set them to auto (or float32) unless you need bf16 here."
    ]


def test_explicit_dtypes_on_a_native_cpu_need_no_probe(monkeypatch):
    monkeypatch.setattr(precision, "probe", lambda use_gpu: pytest.fail("no probe for explicit float32"))
    cfg = _cfg("model.dtype=float32", "model.compute_dtype=float32")
    assert precision.resolve(cfg) is cfg


def test_gpu_rules():
    cfg = _cfg("scaling.use_gpu=true")
    updates, note, warning = precision.decide(cfg, precision.Capability("cuda", True, "NVIDIA H100"))
    assert updates == {"model.dtype": "bfloat16", "model.compute_dtype": "bfloat16"}
    assert note == "dtype auto -> bfloat16: NVIDIA H100 supports bf16." and warning is None
    updates, note, _ = precision.decide(cfg, precision.Capability("cuda", False, "Tesla T4"))
    assert updates["model.dtype"] == "float32" and note.endswith("Tesla T4 has no bf16.")
    updates, note, _ = precision.decide(cfg, precision.Capability("cuda", True, "the workers' GPUs", probed=False))
    assert updates["model.dtype"] == "bfloat16" and "no GPU on this machine to check" in note


def test_the_probe_answers_on_this_machine():
    """The real probe runs here (whatever this CPU is) and agrees with oneDNN's own answer."""
    import torch

    cap = precision.probe(use_gpu=False)
    assert cap.device == "cpu" and cap.name
    assert cap.bf16_native == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_a_model_loaded_without_resolve_gets_a_concrete_dtype(monkeypatch, tiny_model_dir):
    import torch

    from raysft.pipeline.models.load import load_base_model

    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    cfg = _cfg(f"model.name_or_path={tiny_model_dir}", "model.quantization=none")
    model = load_base_model(cfg.model, device="cpu")
    assert next(model.parameters()).dtype == torch.float32


def test_auto_keeps_float32_at_zero_stage_0_even_with_native_bf16():
    """DeepSpeed accumulates in the model's dtype at stage 0 (an explicit bfloat16 there is refused by preflight)."""
    cfg = _cfg("train.deepspeed.stage=0")
    updates, note, _ = precision.decide(cfg, precision.Capability("cpu", True, "AMX box"))
    assert updates == {"model.dtype": "float32", "model.compute_dtype": "float32"}
    assert note == "dtype auto -> float32: train.deepspeed.stage 0 accumulates gradients in the model's dtype."
