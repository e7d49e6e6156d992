"""A merged model as one GGUF file, written with the `gguf` package's GGUFWriter (what llama.cpp's
convert_hf_to_gguf.py does, for the architectures raysft trains).

Reused from `gguf`: the Hugging Face -> GGUF tensor names (`get_tensor_name_map`), the Q8_0 / BF16
quantizers (`gguf.quants`), merges, special-token ids, add-BOS/EOS flags and the chat template
(`SpecialVocab`, read from the export's own tokenizer files). Done here: the architecture's hyper-
parameters, the token list with types (and scores for SentencePiece-style vocabularies), the
pre-tokenizer's llama.cpp name, and llama.cpp's row order of the Q/K projections for the Llama
architecture (transformers' GGUF reader undoes it on load, `LlamaTensorProcessor`).

Tensor types follow llama.cpp: 1-D tensors (norms, biases) stay F32; 2-D weights take the requested
type, and Q8_0 falls back to F16 for a weight whose rows are not a multiple of its 32-value block.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from raysft.pipeline.errors import ModelError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face model_type is written: llama.cpp's architecture and whether Q/K rows are permuted."""

    gguf_name: str  # gguf.MODEL_ARCH member name
    permute_qk: bool


# model_type -> how it is written. Mistral is written as llama (what llama.cpp's converter does); SmolLM2 is Llama.
ARCHITECTURES = {
    "llama": Arch("LLAMA", True),
    "mistral": Arch("LLAMA", True),
    "qwen2": Arch("QWEN2", False),
    "qwen3": Arch("QWEN3", False),
    "phi3": Arch("PHI3", False),
}

# The pre-tokenizer split regexes llama.cpp knows by name (tokenizer.ggml.pre).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_BY_SPLIT = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def check_architecture(config) -> Arch:
    """The Arch of a transformers config, or a one-sentence ModelError naming an architecture raysft does not write."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        names = ", ".join(getattr(config, "architectures", None) or [str(model_type)])
        raise ModelError(
            f"GGUF export does not support the architecture {names} (model_type {model_type}); "
            f"supported: {', '.join(sorted(ARCHITECTURES))}."
        )
    scaling = _rope_scaling(config)
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in ("default", "linear", "llama3"):
        raise ModelError(f"GGUF export does not support the rope scaling {kind!r} of this {model_type} model.")
    return ARCHITECTURES[model_type]


def write_gguf(model, tokenizer_dir: str | os.PathLike, path: str | os.PathLike, qtype: str, name: str) -> Path:
    """Write `model` (a merged transformers causal LM) and the tokenizer saved in `tokenizer_dir` to `path`."""
    import gguf

    if qtype not in GGUF_TYPES:
        raise ModelError(f"The GGUF tensor type must be one of {', '.join(GGUF_TYPES)}, not {qtype}.")
    config = model.config
    arch = check_architecture(config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_name]])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hparams(writer, config, arch, qtype)
    _add_tokenizer(writer, Path(tokenizer_dir), config.vocab_size)
    for gguf_name, array, raw in _tensors(model, arch, qtype):
        writer.add_tensor(gguf_name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _rope_scaling(config) -> dict | None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not params:
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind == "default" else params


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hparams(writer, config, arch: Arch, qtype: str) -> None:
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    rotary = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(rotary)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.gguf_name == "PHI3" and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    scaling = _rope_scaling(config)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _permute(w, n_head: int):
    """llama.cpp's Q/K row order for the Llama architecture (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(config):
    """The rope_freqs tensor llama.cpp builds for Llama-3.1-style ("llama3") rope scaling."""
    import numpy as np

    s = _rope_scaling(config)
    dim = _head_dim(config)
    base = _rope_theta(config)
    factor, low, high = float(s.get("factor", 8.0)), float(s.get("low_freq_factor", 1.0)), float(s["high_freq_factor"])
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _tensors(model, arch: Arch, qtype: str):
    """(gguf name, numpy array, raw GGML type or None) for every weight, converted to its GGUF type."""
    import gguf
    import torch

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name], config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    scaling = _rope_scaling(config)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(config), None
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp (and transformers' reader) tie the output to token_embd when it is absent
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(
                f"GGUF export has no llama.cpp name for the tensor {hf_name} of this {config.model_type} model."
            )
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch.permute_qk and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        yield (gguf_name, *_convert(data, qtype))


def _convert(data, qtype: str):
    import gguf
    import numpy as np

    if data.ndim <= 1 or qtype == "f32":
        return np.ascontiguousarray(data, dtype=np.float32), None
    if qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if qtype == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return data.astype(np.float16), None


def _add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """Tokens, types, merges (and scores for SentencePiece-style vocabularies), special ids, chat template."""
    import gguf
    from transformers import AutoTokenizer

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"GGUF export supports BPE tokenizers, not the {model.get('type')} tokenizer in {folder}.")
    tok = AutoTokenizer.from_pretrained(folder)
    byte_fallback = bool(model.get("byte_fallback"))
    vocab = tok.get_vocab()
    added = tok.get_added_vocab()
    specials = set(tok.all_special_tokens)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif text in added or text in specials:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if text in specials else gguf.TokenType.USER_DEFINED)
        elif byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i))  # SentencePiece BPE pieces are ordered by merge rank: a lower id merges first
    if byte_fallback:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer"), folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    probe = tok("a").input_ids  # what the Hugging Face tokenizer adds to plain text, stated explicitly
    special.add_special_token["bos"] = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
    special.add_special_token["eos"] = tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id]
    if special.chat_template is None and tok.chat_template:
        special.chat_template = tok.chat_template
    special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer_name(pre: dict | None, folder: Path) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE pre-tokenizer, from its split rules."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and splits[0] in _PRE_BY_SPLIT:
        return _PRE_BY_SPLIT[splits[0]]
    raise ModelError(
        f"GGUF export does not know the llama.cpp name of the pre-tokenizer in {folder / 'tokenizer.json'} "
        f"({' + '.join(str(k) for k in kinds) or 'none'})."
    )
