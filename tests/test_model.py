"""pipeline/models/{load,source,tokenizer,export}.py: NF4 / plain loading, LoRA options, adapters as safetensors,
model resolution errors, GGUF, the bf16 merge."""

from __future__ import annotations

import json

import pytest
import torch

from raysft.pipeline.config import load_config
from raysft.pipeline.errors import ConfigError, ModelError
from raysft.pipeline.models.load import build_model, load_base_model, save_adapter
from raysft.pipeline.models.source import materialize_gguf, resolve_model_source
from raysft.pipeline.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.smoke  # in `make test-latest`'s canary subset


def cfg_for(model_dir, **over):
    return load_config(None, overrides={"model.name_or_path": str(model_dir), **over})


def test_nf4_base_is_double_quantized_with_float_storage(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_base_model(
        cfg_for(tiny_model_dir, **{"model.dtype": "bfloat16", "model.compute_dtype": "bfloat16"}).model
    )
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested  # double quantization
    assert q.weight.dtype == torch.bfloat16  # bnb_4bit_quant_storage: ZeRO-3 can partition it
    assert q.compute_dtype == torch.bfloat16
    assert q.support_avx512bf16_for_cpu is False  # no in-place CPU repack at eval (breaks ZeRO-3)
    assert model.config.use_cache is False


def test_quantization_none_loads_plain_weights(tiny_model_dir):
    model = load_base_model(cfg_for(tiny_model_dir, **{"model.quantization": "none", "model.dtype": "float32"}).model)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and q.weight.dtype == torch.float32


def test_lora_on_a_plain_base_skips_bitsandbytes_and_a_4bit_base_still_finds_it(tiny_model_dir):
    """quantization none: peft's LoRA dispatch would import bitsandbytes (1.7 s of CPU per worker) to match 4-bit
    layers there are none of; a fresh interpreter builds a plain LoRA model without it, then a 4-bit one in the
    same process still gets peft's 4-bit LoRA layers (peft's cached answers were cleared)."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from raysft.pipeline.config import load_config\n"
        "from raysft.pipeline.models.load import build_model\n"
        f"over = {{'model.name_or_path': {str(tiny_model_dir)!r}, 'model.dtype': 'float32'}}\n"
        "kinds = lambda m: sorted({type(x).__module__ + '.' + type(x).__name__ for x in m.modules()"
        " if hasattr(x, 'lora_A')})\n"
        "plain = kinds(build_model(load_config(None, {**over, 'model.quantization': 'none'})))\n"
        "bnb = 'bitsandbytes' in sys.modules\n"
        "nf4 = kinds(build_model(load_config(None, {**over, 'model.compute_dtype': 'float32'})))\n"
        "print(json.dumps([plain, bnb, nf4]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    plain, bnb_imported, nf4 = json.loads(out.stdout.splitlines()[-1])
    assert plain == ["peft.tuners.lora.layer.Linear"] and not bnb_imported
    assert nf4 == ["peft.tuners.lora.bnb.Linear4bit"]


_HUB_KERNEL_PROBE = """
import json, logging, sys
import raysft.pipeline  # the import guard: PyPI's kernels, not the checkout's folder (run from the checkout root)
heard = []
class Heard(logging.Handler):
    def emit(self, record):
        heard.append(record.getMessage())
logging.getLogger().addHandler(Heard())
import transformers.activations  # imports PyPI's kernels, as loading any Llama does
import kernels
asked = []
real = kernels.get_kernel
kernels.get_kernel = lambda *a, **k: asked.append(a[0]) or real(*a, **k)  # a spy: the real call still runs
%s
import bitsandbytes.functional as F
print(json.dumps({"native": bool(F.has_avx512bf16()), "asked": asked, "restored": sys.modules["kernels"] is kernels,
                  "warned": [m for m in heard if "kernels-community" in m]}))
"""


@pytest.mark.parametrize("importer", ["raysft", "plain"])
def test_bitsandbytes_is_imported_without_its_hub_kernel_fetch(importer):
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 fetches an inference kernel from the Hugging Face hub as it is
    imported (and warns in every worker where the hub is off). raysft's import_bitsandbytes never asks the hub, says
    nothing, and leaves PyPI's kernels importable; the plain import beside it shows the fetch is real on this CPU."""
    import subprocess
    import sys

    line = "from raysft.pipeline.models.load import import_bitsandbytes; import_bitsandbytes()"
    code = _HUB_KERNEL_PROBE % (line if importer == "raysft" else "import bitsandbytes")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.splitlines()[-1])
    if not seen["native"]:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes fetches no hub kernel here")
    assert seen["restored"]
    if importer == "raysft":
        assert seen["asked"] == [] and seen["warned"] == []
    else:
        assert seen["asked"] == ["kernels-community/quantization-bitsandbytes"]


def test_lora_all_linear_rslora_and_checkpointing(tiny_model_dir):
    cfg = cfg_for(tiny_model_dir, **{"lora.r": 4, "lora.alpha": 8, "lora.use_rslora": True})
    model = build_model(cfg)
    targets = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    assert model.base_model.model.is_gradient_checkpointing


def test_dora_and_explicit_targets(tiny_model_dir):
    cfg = cfg_for(
        tiny_model_dir,
        **{
            "model.quantization": "none",
            "model.dtype": "float32",
            "lora.use_dora": True,
            "lora.target_modules": ["q_proj", "v_proj"],
            "model.gradient_checkpointing": False,
        },
    )
    model = build_model(cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    assert {n.split(".")[-4] for n in names if "lora_A" in n} == {"q_proj", "v_proj"}


def test_adapter_saved_as_safetensors_and_reloads(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = cfg_for(tiny_model_dir, **{"model.quantization": "none", "model.dtype": "float32", "lora.r": 4})
    model = build_model(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    out = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".md") == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), out)
    x = torch.randint(3, 400, (1, 12))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, again(input_ids=x).logits, atol=1e-5)


def test_missing_paths_and_offline_hub_ids_are_one_sentence_errors(tmp_path, monkeypatch):
    cfg = load_config(None)
    for name in [str(tmp_path / "nope"), "./nope", "~/nope/model", "a/b/c", str(tmp_path / "m.gguf")]:
        with pytest.raises(ModelError, match="does not exist") as exc:
            resolve_model_source(cfg.model.model_copy(update={"name_or_path": name}))
        assert "\n" not in str(exc.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="offline"):
        resolve_model_source(cfg.model.model_copy(update={"name_or_path": "someorg/not-cached-model"}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_source(cfg.model.model_copy(update={"name_or_path": str(tmp_path / "empty")}))


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    from tiny import save_tiny_model

    d = save_tiny_model(tmp_path / "m", chat_template=False)
    with pytest.raises(ModelError, match="no chat template"):
        load_tokenizer(cfg_for(d))


def test_trust_remote_code_is_off_by_default(tiny_model_dir, tmp_path):
    """A model folder that asks for custom code does not get it executed unless the config says so."""
    import shutil

    d = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, d)
    marker = tmp_path / "executed"
    (d / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaForCausalLM as EvilModel\n"
    )
    conf = json.loads((d / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(conf))
    cfg = cfg_for(d, **{"model.quantization": "none"})
    assert cfg.model.trust_remote_code is False
    try:
        load_base_model(cfg.model)
    except (ValueError, OSError):
        pass  # refusing is fine too; running the code is not
    assert not marker.exists()


def test_gguf_file_is_converted_once_and_loads(tmp_path):
    from test_fetch import write_tiny_gguf

    path = tmp_path / "tiny.F32.gguf"
    write_tiny_gguf(path)
    mcfg = cfg_for(path, **{"model.quantization": "none", "model.dtype": "float32"}).model
    assert resolve_model_source(mcfg) == (str(tmp_path.resolve()), "tiny.F32.gguf")
    first = materialize_gguf(str(tmp_path), "tiny.F32.gguf", cache_root=str(tmp_path / "cache"))
    assert materialize_gguf(str(tmp_path), "tiny.F32.gguf", cache_root=str(tmp_path / "cache")) == first
    model = load_base_model(mcfg.model_copy(update={"name_or_path": first}))
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] > 0


@pytest.mark.parametrize("dtype, rel_tol", [("bfloat16", 2e-2), ("float32", 1e-5)])
def test_merge_reproduces_base_plus_adapter(tiny_model_dir, tmp_path, dtype, rel_tol):
    """`export --merge` merges each LoRA layer in fp32 and casts once; its logits match base + adapter within the
    export dtype's rounding."""
    from transformers import AutoModelForCausalLM

    from raysft.pipeline.models.export import export_run, merge_adapter
    from raysft.pipeline.run_folder import ADAPTER_DIR, RESOLVED_CONFIG

    cfg = cfg_for(tiny_model_dir, **{"model.quantization": "none", "model.dtype": "float32", "lora.r": 4})
    model = build_model(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    run = tmp_path / "run"
    save_adapter(model, run / ADAPTER_DIR)
    (run / RESOLVED_CONFIG).write_text(cfg.dump_yaml())
    assert {p.dtype for p in merge_adapter(cfg, run / ADAPTER_DIR, dtype).parameters()} == {getattr(torch, dtype)}
    out = export_run(run, merge=True, output=tmp_path / f"merged-{dtype}", dtype=dtype)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == getattr(torch, dtype) and (out / "tokenizer.json").is_file()
    x = torch.randint(3, 400, (2, 16))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(input_ids=x).logits
        got = merged.float()(input_ids=x).logits
    scale = want.abs().max()
    assert (got - want).abs().max() <= rel_tol * scale
    assert (plain - want).abs().max() > 10 * rel_tol * scale  # the adapter matters: an unmerged export would fail


def test_merge_dtype_is_checked(tmp_path):
    from raysft.pipeline.models.export import export_run

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="export dtype must be one of bf16, f16, f32, not int8"):
        export_run(tmp_path, merge=True, dtype="int8")
