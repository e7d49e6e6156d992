"""Tiny tokenizers and models built locally (no downloads) for tests.

`build_tokenizer("chatml" | "llama3")` trains a small byte-level BPE in well under a second and
attaches a stock chat template: ChatML exactly as SmolLM2-Instruct ships it, and the Llama-3
template (which trims message content). `save_tiny_model(dir, template)` writes a randomly
initialised tiny Llama plus that tokenizer, loadable with `from_pretrained(dir)`.
"""

from __future__ import annotations

import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_SPECIALS = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>")),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>"),
    ),
}

_WORDS = (
    "the a an of to in is are was what how many much does do answer question solve step first then "
    "so total each more less than half twice number numbers apples dollars hours minutes days people "
    "user assistant system human gpt you I we he she they it this that because therefore hello hi "
    "please thanks sure here explain write code python function return list sum product add subtract "
    "multiply divide equals result final Natalia sold clips April May altogether"
).split()


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        nums = [str(rng.randint(0, 999)) for _ in range(rng.randint(0, 3))]
        lines.append(" ".join(words + nums) + rng.choice([".", "?", "!", ":", "\n", " #### 42"]))
    return lines


def build_tokenizer(template: str = "chatml", vocab_size: int = 512):
    """A fast tokenizer with offsets, the given stock chat template and its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, roles = _SPECIALS[template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=roles["bos"],
        eos_token=roles["eos"],
        pad_token=roles["pad"],
        additional_special_tokens=[s for s in specials if s not in roles.values()],
    )
    fast.chat_template = CHATML_TEMPLATE if template == "chatml" else LLAMA3_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_tiny_model(directory: str | Path, template: str = "chatml", seed: int = 0, chat_template: bool = True) -> Path:
    """Write a tiny random Llama + tokenizer to `directory` (Hugging Face format, safetensors)."""
    import torch
    from transformers import LlamaForCausalLM

    directory = Path(directory)
    tok = build_tokenizer(template)
    if not chat_template:
        tok.chat_template = None
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id))
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def addition_rows(n: int, answer=lambda a, b: f"{a + b}", seed: int = 0) -> list[dict]:
    """`n` seeded chat rows "what is A plus B?" -> answer(A, B): a task the tiny model can learn in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "add"},
                    {"role": "user", "content": f"what is {a} plus {b}?"},
                    {"role": "assistant", "content": answer(a, b)},
                ]
            }
        )
    return rows


def fp32_cfg(model_dir, **over):
    """A float32, unquantized config of `model_dir` with a small deterministic LoRA (no dropout, no checkpointing)."""
    from raysft.pipeline.config import load_config

    base = {
        "model.name_or_path": str(model_dir),
        "model.quantization": "none",
        "model.dtype": "float32",
        "model.gradient_checkpointing": False,
        "lora.dropout": 0.0,
        "lora.r": 4,
        "lora.alpha": 8,
    }
    return load_config(None, overrides={**base, **over})
