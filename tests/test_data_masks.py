"""Exact response masks: trained tokens decode to each assistant content plus its end-of-turn token.

Runs for every input format on synthetic rows and on ../shared/data (gsm8k as prompt/completion,
sharegpt multi-turn), with the ChatML template (as SmolLM2 ships it) and Llama-3's (which trims).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from raysft.pipeline.data.encode import ChatEncoder
from raysft.pipeline.data.formats import normalise_row
from raysft.pipeline.data.schema import IGNORE_INDEX as IGNORE

pytestmark = pytest.mark.smoke  # in `make test-latest`'s canary subset

EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}

SYNTHETIC = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "It is 6.\nDone."},
        ]
    },
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  hello there  "}]},
    {
        "conversations": [
            {"from": "system", "value": "You answer math."},
            {"from": "human", "value": "Natalia sold clips"},
            {"from": "gpt", "value": "She sold 72 clips.\n#### 72"},
            {"from": "human", "value": "thanks"},
            {"from": "gpt", "value": "You are welcome!"},
        ]
    },
    {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"},
    {"instruction": "Say hello.", "output": "hello"},
    {"prompt": "How many apples?", "completion": "Five apples."},
    {"prompt": [{"role": "user", "content": "Half of 10?"}], "completion": [{"role": "assistant", "content": "5"}]},
    {"question": "How much does she earn?", "answer": "12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10"},
    {"messages": [{"role": "user", "content": "unicode?"}, {"role": "assistant", "content": "Ja, grüße — 東京 ✓"}]},
]


def trained_segments(ids: np.ndarray, labels: np.ndarray) -> list[list[int]]:
    segments, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist()):
        if label != IGNORE:
            assert label == token, "a trained label must equal its input token"
            current.append(token)
        elif current:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return segments


def check_row(tokenizer, template: str, row: dict, encoder: ChatEncoder | None = None) -> None:
    encoder = encoder or ChatEncoder(tokenizer)
    item = normalise_row(row)
    assert item.drop_reason is None, item.detail
    (result,) = encoder.encode([item])
    ids, labels = result
    got = [tokenizer.decode(s) for s in trained_segments(ids, labels)]
    want = []
    for m in item.messages:
        if m["role"] == "assistant":
            content = m["content"].strip() if template == "llama3" else m["content"]
            want.append(content + EOT[template])
    assert got == want
    # Everything outside the trained spans is the rest of the rendered conversation, untouched.
    assert (
        tokenizer.decode(ids)
        == encoder.render(item.messages)
        == tokenizer.apply_chat_template(item.messages, tokenize=False)
    )


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("index", range(len(SYNTHETIC)))
def test_synthetic_rows_every_format(template, index, chatml_tokenizer, llama3_tokenizer):
    tok = chatml_tokenizer if template == "chatml" else llama3_tokenizer
    check_row(tok, template, SYNTHETIC[index])


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_shared_data_gsm8k_and_sharegpt(template, shared_data, chatml_tokenizer, llama3_tokenizer):
    tok = chatml_tokenizer if template == "chatml" else llama3_tokenizer
    encoder = ChatEncoder(tok)
    with open(shared_data / "gsm8k" / "train.jsonl") as f:
        gsm8k = [json.loads(next(f)) for _ in range(150)]
    sharegpt = json.loads((shared_data / "sharegpt" / "dummy_conversation.json").read_text())
    for row in gsm8k + sharegpt[::3]:
        check_row(tok, template, row, encoder)
    # Multi-turn: every gpt turn is trained, nothing else.
    multi = [r for r in sharegpt if len(r["conversations"]) >= 6][0]
    ids, labels = encoder.encode([normalise_row(multi)])[0]
    assert len(trained_segments(ids, labels)) == sum(t["from"] == "gpt" for t in multi["conversations"]) >= 3


def test_text_rows_train_every_token_and_end_with_eos(chatml_tokenizer):
    encoder = ChatEncoder(chatml_tokenizer)
    ids, labels = encoder.encode([normalise_row({"text": "plain pretraining text 42"})])[0]
    assert (labels == ids).all()
    assert chatml_tokenizer.decode(ids) == "plain pretraining text 42<|im_end|>"


def test_train_on_all_trains_the_whole_conversation(llama3_tokenizer):
    encoder = ChatEncoder(llama3_tokenizer, train_on="all")
    ids, labels = encoder.encode([normalise_row(SYNTHETIC[0])])[0]
    assert (labels == ids).all()


def test_template_that_hides_the_response_is_a_counted_drop(chatml_tokenizer):
    encoder = ChatEncoder(chatml_tokenizer)
    # A template that never renders assistant turns: the content cannot be found -> counted drop.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    encoder.template = _compile_jinja_template(
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    (bad,) = encoder.encode([normalise_row({"prompt": "question here", "completion": "an answer"})])
    assert bad.reason == "template_mismatch"


def test_system_prompt_is_added_and_untrained(chatml_tokenizer):
    item = normalise_row({"prompt": "hi", "completion": "hello"}, system_prompt="You are terse.")
    assert item.messages[0] == {"role": "system", "content": "You are terse."}
    ids, labels = ChatEncoder(chatml_tokenizer).encode([item])[0]
    assert [chatml_tokenizer.decode(s) for s in trained_segments(ids, labels)] == ["hello<|im_end|>"]


THINK_TEMPLATE = (  # Qwen3-like: the generation prompt opens an empty think block the history lacks
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% endif %}"
)
ALTERNATE_TEMPLATE = (  # Mistral-like: refuses conversations whose roles do not alternate
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def test_generation_prompt_the_history_lacks_and_echoed_content(chatml_tokenizer):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    encoder = ChatEncoder(chatml_tokenizer)
    encoder.template = _compile_jinja_template(THINK_TEMPLATE)
    row = {
        "messages": [
            {"role": "user", "content": "say 4"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "4"},
            {"role": "assistant", "content": "say"},
        ]
    }
    # The first turn's generation prompt (with the think block) is not in the history: that turn is
    # trained in its own view (the conversation up to it), the last one in the full conversation.
    ((full, view),) = encoder.encode_views([normalise_row(row)])
    assert [chatml_tokenizer.decode(s) for s in trained_segments(*full)] == ["say<|im_end|>"]
    assert [chatml_tokenizer.decode(s) for s in trained_segments(*view)] == ["4<|im_end|>"]


def test_template_refusing_a_row_is_a_counted_drop(chatml_tokenizer):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    encoder = ChatEncoder(chatml_tokenizer)
    encoder.template = _compile_jinja_template(ALTERNATE_TEMPLATE)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "hello"},
        ]
    }
    ok, refused = encoder.encode([normalise_row(good), normalise_row(bad)])
    assert [chatml_tokenizer.decode(s) for s in trained_segments(*ok)] == ["hello<|im_end|>"]
    assert refused.reason == "template_error"


SMOLLM2 = "/tmp/smollm2_tok"  # real SmolLM2 tokenizer (see BENCHMARKS.md), used when present


def _real_or_tiny(name, chatml_tokenizer, llama3_tokenizer):
    if name == "smollm2":
        import os

        if not os.path.isfile(os.path.join(SMOLLM2, "tokenizer.json")):
            pytest.skip(f"no SmolLM2 tokenizer at {SMOLLM2}")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(SMOLLM2), "chatml"
    return (chatml_tokenizer if name == "chatml" else llama3_tokenizer), name


@pytest.mark.parametrize("name", ["chatml", "llama3", "smollm2"])
def test_light_spec_matches_transformers_token_for_token(name, shared_data, chatml_tokenizer, llama3_tokenizer):
    """What the Ray actors run (TokenizerSpec: tokenizers + jinja2, no transformers) gives the same
    render, ids and labels as transformers' own apply_chat_template and tokenizer."""
    import pickle
    import subprocess
    import sys

    from raysft.pipeline.data.light_tokenizer import TokenizerSpec

    tok, template = _real_or_tiny(name, chatml_tokenizer, llama3_tokenizer)
    spec = pickle.loads(pickle.dumps(TokenizerSpec.from_hf(tok)))  # as it reaches an actor
    light = ChatEncoder(spec)
    assert light.special_ids == set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert light.eos_id == tok.eos_token_id
    with open(shared_data / "gsm8k" / "train.jsonl") as f:
        gsm8k = [json.loads(next(f)) for _ in range(60)]
    sharegpt = json.loads((shared_data / "sharegpt" / "dummy_conversation.json").read_text())
    items = [normalise_row(r) for r in SYNTHETIC + gsm8k + sharegpt[::5]]
    items += [normalise_row({"text": "plain text"})]
    items = [i for i in items if i.drop_reason is None]
    for item, got, hf in zip(items, light.encode(items), ChatEncoder(tok).encode(items)):
        assert got[0].tolist() == hf[0].tolist() and got[1].tolist() == hf[1].tolist()
        if item.messages is not None:
            want_text = tok.apply_chat_template(item.messages, tokenize=False)
            assert light.render(item.messages) == want_text
            assert light.render(item.messages, True) == tok.apply_chat_template(
                item.messages, tokenize=False, add_generation_prompt=True
            )
            assert got[0].tolist() == tok(want_text, add_special_tokens=False)["input_ids"]
            if name != "smollm2":  # real merges can pull the newline before a content into its first token
                check_row(tok, template, {"messages": item.messages}, light)
        else:
            assert got[0].tolist()[:-1] == tok(item.text)["input_ids"]
    # The light path really is light: building and using it imports no transformers.
    code = (
        "import pickle, sys; from raysft.pipeline.data.encode import ChatEncoder; "
        "from raysft.pipeline.data.formats import normalise_row; "
        "e = ChatEncoder(pickle.loads(sys.stdin.buffer.read())); "
        "e.encode([normalise_row({'prompt': 'a', 'completion': 'b'})]); "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], input=pickle.dumps(spec), check=True, timeout=120)
