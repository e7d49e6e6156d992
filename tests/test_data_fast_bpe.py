"""The byte-level fast path gives exactly what `tokenizers` gives: ids, offsets, labels and drops.

Each encoder is compared with the same encoder built with `fast_path=False` (every row through
`tokenizers`) on real data (gsm8k, sharegpt), the synthetic rows of every format, and ASCII text
chosen to stress the GPT-2 regex (contractions, whitespace runs, punctuation, digits, special-token
text inside contents), plus non-ASCII text (accents, CJK, Cyrillic, Arabic, emoji split inside a
character). The real Llama-3.1, Qwen2.5 and Qwen3 tokenizers (a `Split` regex + `ByteLevel(use_regex=False)`,
Qwen with NFC) take the same path. Tokenizers outside the fast path's pipeline, text it does not
trust (not NFC, control or format characters) and a fast path that disagrees with `tokenizers` all
fall back to `tokenizers`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, SHARED_TOKENIZERS
from test_data_masks import SYNTHETIC

from raysft.pipeline.data.encode import ChatEncoder
from raysft.pipeline.data.fast_bpe import ByteLevelFastPath
from raysft.pipeline.data.formats import normalise_row
from raysft.pipeline.data.light_tokenizer import TokenizerSpec

TRICKY = [
    "It's what they've said: we'll see, I'd think you're 'quoted' and 'S'T'",
    "tabs\tand\t\tmore\t \n\n\n  three newlines   then spaces   ",
    "trailing spaces   ",
    "   leading spaces",
    "numbers 1234567890 12,345.67 3.14e-10 #### 42",
    "punct!!! ??? ... --- *** (a)[b]{c} <<12/60=0.2>> $5.00 100% a@b.c",
    "windows\r\nline\r\nends\r",
    "content that mentions <|im_end|> and <|im_start|>user and <|eot_id|> literally",
    "x",
    " ",
    "a\n \n b",
    "CamelCaseWords andALLCAPS and snake_case_names and kebab-case-names",
]
UNICODE = [
    "Ja, grüße — 東京 ✓ 😀 and 12345 numbers",
    "naïve café résumé 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Привет мир, как дела?",
    "عربي ١٢٣ text",
    "emoji 👍🏽 skin tone, CJK 中文字符 and ｆｕｌｌｗｉｄｔｈ",
    "It’s “quoted” – dashes … ellipsis",
    "not NFC: e\u0301 (decomposed)",
    "zero\u200bwidth and zwj 👩\u200d💻",
    "nbsp\u00a0and\u3000ideographic space",
]


def _smollm2():
    for folder in ("/tmp/smollm2_tok", os.path.expanduser("~/.cache/raysft/models/smollm2-135m-instruct")):
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(folder)
    pytest.skip("no SmolLM2 tokenizer here (run `raysft models fetch smollm2-135m-instruct`)")


def _shared(family):
    if not SHARED_TOKENIZERS.is_dir():
        pytest.skip(f"real tokenizers not present at {SHARED_TOKENIZERS}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED_TOKENIZERS / family)


def _tokenizer(name, chatml_tokenizer, llama3_tokenizer):
    return {
        "chatml": lambda: chatml_tokenizer,
        "llama3": lambda: llama3_tokenizer,
        "smollm2": _smollm2,
        "llama-3.1": lambda: _shared("llama-3.1-instruct"),
        "qwen2.5": lambda: _shared("qwen2.5-instruct"),
        "qwen3": lambda: _shared("qwen3"),
    }[name]()


def _rows(shared_data: Path) -> list:
    rows = list(SYNTHETIC)
    rows += [{"prompt": t, "completion": u} for t in TRICKY for u in TRICKY[:4]]
    rows += [
        {
            "messages": [
                {"role": "system", "content": TRICKY[1]},
                {"role": "user", "content": TRICKY[7]},
                {"role": "assistant", "content": TRICKY[5]},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": TRICKY[6]},
            ]
        }
    ]
    rows += [{"text": t} for t in TRICKY]
    rows += [{"prompt": t, "completion": u} for t in UNICODE for u in UNICODE[:5]]
    rows += [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": t}]}
        for t in TRICKY
        for u in UNICODE
    ]
    if shared_data is not None:
        with open(shared_data / "gsm8k" / "train.jsonl") as f:
            rows += [json.loads(next(f)) for _ in range(600)]
        rows += json.loads((shared_data / "sharegpt" / "dummy_conversation.json").read_text())
    return rows


def _same(a, b) -> bool:
    if isinstance(a, tuple) != isinstance(b, tuple):
        return False
    if not isinstance(a, tuple):
        return a.reason == b.reason
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.fixture
def shared_or_none():
    """../shared/data when present; the synthetic and tricky rows run either way."""
    return SHARED_DATA if SHARED_DATA.is_dir() else None


@pytest.mark.parametrize("name", ["chatml", "llama3", "smollm2", "llama-3.1", "qwen2.5", "qwen3"])
@pytest.mark.parametrize("train_on", ["responses", "all"])
def test_fast_path_equals_tokenizers(name, train_on, chatml_tokenizer, llama3_tokenizer, shared_or_none):
    tok = _tokenizer(name, chatml_tokenizer, llama3_tokenizer)
    spec = TokenizerSpec.from_hf(tok)
    fast, reference = ChatEncoder(spec, train_on), ChatEncoder(spec, train_on, fast_path=False)
    assert fast.fast is not None and reference.fast is None
    items = [normalise_row(r) for r in _rows(shared_or_none)]
    got, want = fast.encode(items), reference.encode(items)
    assert fast.fast is not None, "the first-rows check must pass for an eligible tokenizer"
    assert all(_same(a, b) for a, b in zip(got, want))
    # Most rows really took the fast path, non-ASCII ones included; text it does not trust did not.
    texts = [fast.render(i.messages) for i in items if i.messages is not None and i.drop_reason is None]
    safe = [fast.fast.safe(t) for t in texts]
    assert sum(safe) > 0.8 * len(texts) and not all(safe)
    assert any(ok and not t.isascii() for t, ok in zip(texts, safe))
    assert not any(ok and ("\u200b" in t or (fast.fast.nfc and "e\u0301" in t)) for t, ok in zip(texts, safe))
    # Offsets are cumulative byte lengths (mapped to characters): token i covers exactly its characters.
    for text in [t for t, ok in zip(texts, safe) if ok and t.isascii()][:30] + [
        t for t, ok in zip(texts, safe) if ok and not t.isascii()
    ][:30]:
        ids = fast.fast.encode(text)
        assert ids == fast.backend.encode(text, add_special_tokens=False).ids
        assert fast.fast.offsets(ids, text) == fast.backend.encode(text, add_special_tokens=False).offsets
        if text.isascii():
            ends = np.cumsum(fast.fast.byte_lengths[ids]).tolist()
            assert list(zip([0] + ends[:-1], ends)) == fast.backend.encode(text, add_special_tokens=False).offsets


def test_only_byte_level_pipelines_take_the_fast_path(chatml_tokenizer):
    from tokenizers import normalizers, processors

    spec = TokenizerSpec.from_hf(chatml_tokenizer)
    config = json.loads(spec.backend_json)

    def variant(**changes) -> dict:
        return {**config, **changes}

    backend = chatml_tokenizer.backend_tokenizer
    assert ByteLevelFastPath.build(backend) is not None
    lowercase = json.loads(normalizers.Lowercase().__getstate__())
    trimming = json.loads(processors.ByteLevel(trim_offsets=True).__getstate__())
    for changed in (
        variant(normalizer=lowercase),
        variant(post_processor=trimming),
        variant(pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}),
        variant(pre_tokenizer={**config["pre_tokenizer"], "add_prefix_space": True}),
        variant(added_tokens=[{**t, "lstrip": True} for t in config["added_tokens"]]),
    ):
        assert ByteLevelFastPath.build(backend, changed) is None
    path = ByteLevelFastPath.build(backend)
    assert path.safe("grüße") and not path.safe("form\x0cfeed") and not path.safe("grüße\x0c")
    assert not path.safe("unit\x1fseparator") and path.safe("tab\tnew\nline\r") and not path.safe("zero\u200bwidth")
    assert not path.safe("line\u2028separator") and not path.safe("private\ue000use")


@pytest.mark.parametrize("family", ["llama-3.1-instruct", "qwen2.5-instruct", "qwen3", "mistral-7b-instruct-v0.3"])
def test_pipeline_config_read_from_components_equals_the_full_json(family):
    """The fast path decides eligibility from the backend's components (cheap), not its whole JSON:
    both must say the same on real tokenizers, or a tokenizers upgrade changed a component's state."""
    if not SHARED_TOKENIZERS.is_dir():
        pytest.skip(f"real tokenizers not present at {SHARED_TOKENIZERS}")
    from tokenizers import Tokenizer

    from raysft.pipeline.data.fast_bpe import pipeline_config

    backend = Tokenizer.from_file(str(SHARED_TOKENIZERS / family / "tokenizer.json"))
    full, read = json.loads(backend.to_str()), pipeline_config(backend)
    for key in ("normalizer", "pre_tokenizer", "post_processor"):
        assert read[key] == full[key], key
    assert read["model"] == {k: full["model"].get(k) for k in read["model"]}
    fields = ("id", "content", "lstrip", "rstrip", "single_word")
    expected = sorted(({k: t[k] for k in fields} for t in full["added_tokens"]), key=lambda t: t["id"])
    assert read["added_tokens"] == expected


def test_a_disagreeing_fast_path_is_caught_and_dropped(chatml_tokenizer, caplog):
    spec = TokenizerSpec.from_hf(chatml_tokenizer)
    broken, reference = ChatEncoder(spec), ChatEncoder(spec, fast_path=False)
    broken.fast.memo[" apples"] = [5]  # a wrong memo entry: the ids would differ from tokenizers'
    items = [normalise_row({"prompt": f"how many apples, {i}?", "completion": f"{i} apples"}) for i in range(40)]
    with caplog.at_level(logging.WARNING):
        got = broken.encode(items)
    assert broken.fast is None and "differs from tokenizers" in caplog.text
    assert all(_same(a, b) for a, b in zip(got, reference.encode(items)))
