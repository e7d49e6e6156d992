"""Masks on the real tokenizers and chat templates in ../shared/tokenizers (Llama-3.1, Qwen2.5, Qwen3,
Mistral v0.3), checked against an independent reference written here.

The reference renders each conversation by hand from the family's documented format as a list of
(text, trained) segments; its text must equal transformers' apply_chat_template, and its labels are
the tokens (from tokenizers' own offsets) that overlap a trained segment. The encoder's samples (the
full conversation, then any turn's own view) must equal the reference's samples token for token.
"""

from __future__ import annotations

import itertools
import json

import pytest

from raysft.pipeline.data.encode import ChatEncoder
from raysft.pipeline.data.formats import normalise_row
from raysft.pipeline.data.schema import IGNORE_INDEX as IGNORE
from raysft.pipeline.data.tokenize import encode_table

FAMILIES = ["llama-3.1-instruct", "qwen2.5-instruct", "qwen3", "mistral-7b-instruct-v0.3"]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
LLAMA_HEAD = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)

_TOKENIZERS: dict = {}


def load(shared_tokenizers, family):
    if family not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[family] = AutoTokenizer.from_pretrained(shared_tokenizers / family)
    return _TOKENIZERS[family]


# ---- the independent reference: each family's format written out by hand -------------------------

Segments = list[tuple[str, bool]]


def ref_llama(msgs) -> list[Segments]:
    system = msgs[0]["content"].strip() if msgs[0]["role"] == "system" else ""
    segs: Segments = [(LLAMA_HEAD + system + "<|eot_id|>", False)]
    for m in msgs[1:] if msgs[0]["role"] == "system" else msgs:
        head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            segs += [(head, False), (m["content"].strip() + "<|eot_id|>", True)]
        else:
            segs.append((head + m["content"].strip() + "<|eot_id|>", False))
    return [segs]


def _chatml(msgs, default_system: str | None, think_last: bool, reasoning: bool = True) -> Segments:
    """ChatML as Qwen writes it. `think_last`: Qwen3's think block before the last answer (reasoning
    rendered there and trained from `<think>` when `reasoning`, else an untrained empty block)."""
    segs: Segments = []
    if msgs[0]["role"] != "system" and default_system:
        segs.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
            continue
        segs.append(("<|im_start|>assistant\n", False))
        if think_last and i == len(msgs) - 1:
            block = (
                f"<think>\n{m.get('reasoning_content', '')}\n</think>\n\n"
                if m.get("reasoning_content")
                else "<think>\n\n</think>\n\n"
            )
            if m.get("reasoning_content") and reasoning:
                segs.append((block + m["content"] + "<|im_end|>", True))
                segs.append(("\n", False))
                continue
            segs.append((block, False))
        segs += [(m["content"] + "<|im_end|>", True), ("\n", False)]
    return segs


def ref_qwen25(msgs) -> list[Segments]:
    return [_chatml(msgs, QWEN_SYSTEM, False)]


def ref_qwen3(msgs, train_on_reasoning: bool = True) -> list[Segments]:
    """Qwen3 drops reasoning from turns before the last user message: with reasoning trained, those
    turns are trained in their own views (the conversation up to them), after the full conversation."""
    plain = [
        {k: v for k, v in m.items() if k != "reasoning_content"} if i < len(msgs) - 1 else m for i, m in enumerate(msgs)
    ]
    full = _chatml(plain, None, True, train_on_reasoning)
    if not train_on_reasoning or not any(m.get("reasoning_content") for m in msgs[:-1]):
        return [full]

    def last_only(segs: Segments) -> Segments:  # the last segment is the newline after the last turn
        return [(t, trained and i >= len(segs) - 2) for i, (t, trained) in enumerate(segs)]

    views = [k for k, m in enumerate(msgs[:-1]) if m["role"] == "assistant"]
    return [last_only(full)] + [last_only(_chatml(msgs[: k + 1], None, True)) for k in views]


def ref_mistral(msgs) -> list[Segments]:
    """Mistral v0.3 puts the system message into the last user turn, so with a system message every
    earlier assistant turn is trained in its own view, where its user turn is the last one."""
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    conv = [m for m in msgs if m["role"] != "system"]

    def render(conv, trained_turns) -> Segments:
        users = sum(m["role"] == "user" for m in conv)
        segs, seen = [("<s>", False)], 0
        for i, m in enumerate(conv):
            if m["role"] == "user":
                seen += 1
                segs.append(
                    (
                        "[INST] " + (system + "\n\n" if seen == users and system else "") + m["content"] + "[/INST]",
                        False,
                    )
                )
            else:
                segs += [(" ", False), (m["content"] + "</s>", i in trained_turns)]
        return segs

    answers = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if not system:
        return [render(conv, set(answers))]
    return [render(conv, {answers[-1]})] + [render(conv[: k + 1], {k}) for k in answers[:-1]]


REFERENCE = {
    "llama-3.1-instruct": ref_llama,
    "qwen2.5-instruct": ref_qwen25,
    "qwen3": ref_qwen3,
    "mistral-7b-instruct-v0.3": ref_mistral,
}


def reference_labels(tok, segs: Segments) -> tuple[str, list[int], list[int]]:
    """Text, ids and labels of a reference sample: a token is trained when it overlaps a trained segment."""
    text, spans, pos = "", [], 0
    for t, trained in segs:
        if trained:
            spans.append((pos, pos + len(t)))
        text, pos = text + t, pos + len(t)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        i if any(s < b and e > a for a, b in spans) else IGNORE
        for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return text, enc["input_ids"], labels


# ---- rows -------------------------------------------------------------------------------------------

ANSWERS = [
    "4",
    "x",
    "Yes",
    "assistant",
    "user",
    "system",
    "INST",
    "think",
    "im_end",
    "Today",
    "header",
    "s",
    "  padded answer \n",
    "Ja, grüße — 東京 ✓ 😀",
    "It is 6.\nDone.",
    "Natalia sold 48/2 = 24 clips.\n#### 72",
]
USERS = [
    "What is 2+2?",
    "say <|im_start|>assistant\n4<|im_end|> please",
    "[INST] x [/INST] and </s> too",
    "<|start_header_id|>assistant<|end_header_id|>\n\nYes<|eot_id|>",
    "<think>\n\n</think>\n\nthink",
    "Schreib grüße auf 東京",
    "Say Yes or No: Yes",
    "repeat: It is 6.\nDone.",
    "answer with the letter x",
]


def chat_rows() -> list[dict]:
    rows = []
    for n, (i, sys) in enumerate(itertools.product(range(len(ANSWERS)), (None, "You are terse. Be brief."))):
        turns = 1 + n % 3
        msgs = [{"role": "system", "content": sys}] if sys else []
        for t in range(turns):
            msgs.append({"role": "user", "content": USERS[(i + 2 * t) % len(USERS)]})
            msgs.append({"role": "assistant", "content": ANSWERS[(i + 5 * t) % len(ANSWERS)]})
        rows.append({"messages": msgs})
    return rows


def trained_segments(ids, labels) -> list[list[int]]:
    out, cur = [], []
    for t, label in zip(list(ids), list(labels)):
        if label != IGNORE:
            assert label == t
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def check_against_reference(tok, encoder, family, row, reference=None):
    item = normalise_row(row)
    assert item.drop_reason is None, item.detail
    (got,) = encoder.encode_views([item])
    assert not isinstance(got, Exception), f"{family}: {got.reason}: {got.detail}"
    want = (reference or REFERENCE[family])(item.messages)
    assert len(got) == len(want), f"{family}: {len(got)} samples, reference {len(want)}"
    for (ids, labels), segs in zip(got, want):
        text, want_ids, want_labels = reference_labels(tok, segs)
        assert ids.tolist() == want_ids
        assert labels.tolist() == want_labels, (
            family,
            [tok.decode(s) for s in trained_segments(ids, labels)],
            [tok.decode(s) for s in trained_segments(want_ids, want_labels)],
        )
    # The reference's full conversation is transformers' own render.
    text, _, _ = reference_labels(tok, want[0])
    assert text == tok.apply_chat_template(item.messages, tokenize=False)
    return got


# ---- acceptance: exact masks on all four families ----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_exact_against_reference(family, shared_tokenizers):
    tok = load(shared_tokenizers, family)
    encoder = ChatEncoder(tok)
    rows = chat_rows()
    views = 0
    for row in rows:
        views += len(check_against_reference(tok, encoder, family, row)) - 1
    # Every assistant turn is trained exactly once over a row's samples.
    for row in rows[:8]:
        (samples,) = encoder.encode_views([normalise_row(row)])
        assert sum(len(trained_segments(*s)) for s in samples) == sum(m["role"] == "assistant" for m in row["messages"])
    multi_with_system = sum(
        1
        for r in rows
        if r["messages"][0]["role"] == "system"
        for _ in range(sum(m["role"] == "assistant" for m in r["messages"]) - 1)
    )
    assert views == (multi_with_system if family.startswith("mistral") else 0)


def test_views_have_ids_of_their_own_and_are_counted(shared_tokenizers, tmp_path):
    """Mistral with a system message: each earlier turn is a view with its own sample id (no id repeats
    in the epoch, as the data ledger requires) and stats.json counts the extra views."""
    import pyarrow.parquet as pq

    from raysft.pipeline.config import load_config
    from raysft.pipeline.data import plan
    from raysft.pipeline.data.sources import VIEW_SHIFT, split_source_id

    rows = [r for r in chat_rows() if r["messages"][0]["role"] == "system"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        {
            "model.name_or_path": str(shared_tokenizers / "mistral-7b-instruct-v0.3"),
            "data.train": str(tmp_path / "t.jsonl"),
            "data.cache_dir": str(tmp_path / "cache"),
        },
    )
    stats = plan.prepare(cfg, tmp_path / "o", use_ray=False)
    extra = sum(sum(m["role"] == "assistant" for m in r["messages"]) - 1 for r in rows)
    assert extra > 0 and stats["extra_views"] == extra == stats["per_source"][0]["extra_views"]
    assert stats["rows_used"] == len(rows) and stats["rows_dropped"] == {}
    ids = [s for r in pq.read_table(tmp_path / "o" / "train").column("source_ids").to_pylist() for s in r]
    assert len(ids) == len(set(ids)) == len(rows) + extra
    assert sorted({split_source_id(s)[1] for s in ids}) == list(range(len(rows)))
    assert sum(1 for s in ids if s >> VIEW_SHIFT) == extra


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_exact_on_shared_data(family, shared_tokenizers, shared_data):
    tok = load(shared_tokenizers, family)
    encoder = ChatEncoder(tok)
    with open(shared_data / "gsm8k" / "train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(40)]
    sharegpt = json.loads((shared_data / "sharegpt" / "dummy_conversation.json").read_text())
    for row in rows + sharegpt[:60]:
        item = normalise_row(row)
        if family.startswith("mistral") and item.messages[0]["role"] != "user":
            continue  # the template refuses conversations that do not start with a user turn
        check_against_reference(tok, encoder, family, {"messages": item.messages})


# ---- acceptance: reasoning on Qwen3 ------------------------------------------------------------------


def reasoning_rows() -> list[dict]:
    rows = []
    for n in range(24):
        msgs = [{"role": "system", "content": "Think first."}] if n % 2 else []
        for t in range(1 + n % 3):
            msgs.append({"role": "user", "content": f"{USERS[(n + t) % len(USERS)]} ({t})"})
            reasoning, answer = (
                f"Let me think about step {t}.\nOK: {n * t}",
                ANSWERS[(n + 3 * t) % len(ANSWERS)].strip() or "ok",
            )
            if n % 4 < 2:
                msgs.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})
            else:
                msgs.append({"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"})
        rows.append({"messages": msgs})
    return rows


@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_reasoning_rows_on_qwen3(train_on_reasoning, shared_tokenizers):
    tok = load(shared_tokenizers, "qwen3")
    encoder = ChatEncoder(tok, train_on_reasoning=train_on_reasoning)
    rows = reasoning_rows()
    items = [normalise_row(r) for r in rows]
    results = encoder.encode_views(items)
    assert not any(isinstance(r, Exception) for r in results), "no reasoning row may be dropped"
    for row, item, samples in zip(rows, items, results):
        check_against_reference(tok, encoder, "qwen3", row, lambda m: ref_qwen3(m, train_on_reasoning))
        decoded = [tok.decode(s) for ids, labels in samples for s in trained_segments(ids, labels)]
        answers = [m for m in item.messages if m["role"] == "assistant"]
        assert len(decoded) == len(answers)  # every assistant turn trained exactly once
        for m in answers:
            hits = [d for d in decoded if d.endswith(m["content"] + "<|im_end|>")]
            assert len(hits) >= 1
            if train_on_reasoning:
                assert any(m["reasoning_content"] in d and d.startswith("<think>") for d in hits)
            else:
                assert not any("<think>" in d or m["reasoning_content"] in d for d in decoded)


def test_reasoning_inline_for_templates_without_a_reasoning_field(shared_tokenizers):
    """Qwen2.5 and Llama do not read reasoning_content: it goes inline, and train_on_reasoning=false
    masks exactly the think block."""
    row = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
        ]
    }
    for family, close in (("qwen2.5-instruct", "<|im_end|>"), ("llama-3.1-instruct", "<|eot_id|>")):
        tok = load(shared_tokenizers, family)
        for flag, want in ((True, "<think>\ntwo and two\n</think>\n\n4" + close), (False, "4" + close)):
            ((ids, labels),) = ChatEncoder(tok, train_on_reasoning=flag).encode([normalise_row(row)])
            assert [tok.decode(s) for s in trained_segments(ids, labels)] == [want]


# ---- acceptance: tool calling on all four ----------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def tool_rows() -> list[dict]:
    def call(i, city, as_string):
        args = {"city": city}
        return {
            "id": f"call{i:05d}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(args) if as_string else args},
        }

    rows = []
    for n, city in enumerate(["Paris", "Tokyo", "Zürich", "Lima"]):
        msgs = [{"role": "system", "content": "Use tools."}] if n % 2 else []
        msgs += [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call(n, city, n % 2 == 0)]},
            {
                "role": "tool",
                "tool_call_id": f"call{n:05d}",
                "name": "get_weather",
                "content": f'{{"c": {n}, "tag": "RESULT{n}"}}',
            },
            {"role": "assistant", "content": f"It is {n} degrees in {city}."},
        ]
        if n >= 2:  # a second round
            msgs += [
                {"role": "user", "content": "And in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [call(10 + n, "Oslo", True)]},
                {"role": "tool", "tool_call_id": f"call{10 + n:05d}", "content": f"RESULTX{n}"},
                {"role": "assistant", "content": "Colder."},
            ]
        rows.append({"messages": msgs, "tools": TOOLS})
    # ShareGPT function calling (function_call / observation turns, tools as a JSON string).
    rows.append(
        {
            "conversations": [
                {"from": "human", "value": "Weather in Rome?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})},
                {"from": "observation", "value": '{"c": 30, "tag": "RESULT9"}'},
                {"from": "gpt", "value": "Hot: 30 degrees."},
            ],
            "tools": json.dumps(TOOLS),
        }
    )
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_rows_kept_calls_trained_results_masked(family, shared_tokenizers):
    tok = load(shared_tokenizers, family)
    encoder = ChatEncoder(tok)
    rows = tool_rows()
    items = [normalise_row(r) for r in rows]
    assert all(i.drop_reason is None for i in items)
    assert items[-1].messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Rome"}}
    assert items[-1].messages[2]["tool_call_id"] == items[-1].messages[1]["tool_calls"][0]["id"]
    results = encoder.encode_views(items)
    kept = [r for r in results if not isinstance(r, Exception)]
    assert len(kept) == len(rows), [(r.reason, r.detail) for r in results if isinstance(r, Exception)]
    for item, samples in zip(items, results):
        decoded = [tok.decode(s) for ids, labels in samples for s in trained_segments(ids, labels)]
        full = tok.apply_chat_template(item.messages, tools=item.tools, tokenize=False)
        assert samples[0][0].tolist() == tok(full, add_special_tokens=False)["input_ids"]
        assert "get_weather" in full and "The weather in a city" in full  # the tools column reached the template
        turns = [m for m in item.messages if m["role"] == "assistant"]
        assert len(decoded) == len(turns)  # every assistant turn trained once
        for m in turns:  # samples list the full conversation first, then views: match turns by content
            if m.get("tool_calls"):
                city = m["tool_calls"][0]["function"]["arguments"]["city"]
                assert any("get_weather" in d and city in d.replace("\\u00fc", "ü") for d in decoded)
            else:
                assert any(d.strip().startswith(m["content"]) for d in decoded)
        results_text = [m["content"] for m in item.messages if m["role"] == "tool"]
        for r in results_text:
            tag = r.split('"tag": "')[-1].rstrip('"}') if "tag" in r else r
            assert tag in full and not any(tag in d for d in decoded), "tool results are never trained"


def openai_style(rows: list[dict]) -> list[dict]:
    """tool_rows with OpenAI-style ids (`call_` + 24 characters), consistent between calls and results."""
    rows = json.loads(json.dumps(rows))
    for row in rows:
        for m in row.get("messages", []):
            for call in m.get("tool_calls") or []:
                call["id"] = f"call_{call['id']}Xq7rT2mB9vK4sLp1Wn"
            if m["role"] == "tool":
                m["tool_call_id"] = f"call_{m['tool_call_id']}Xq7rT2mB9vK4sLp1Wn"
    return rows


def test_openai_style_tool_call_ids_on_mistral_are_mapped_kept_exact_and_counted(shared_tokenizers, tmp_path):
    """Mistral v0.3's template refuses any tool-call id that is not 9 characters. The encoder finds that by
    probing the template (not by the model's name); each row's ids are mapped to 9 alphanumerics, the same in
    the call and its result, so every row is kept; its tokens are the template's render of the mapped
    conversation and its trained tokens exactly the assistant's output with the new id (what the model would
    emit); stats.json counts the mapped ids. Templates that take OpenAI-style ids are left alone."""
    from raysft.pipeline.data.pack import pack_batch
    from raysft.pipeline.data.stats import StatsAccumulator
    from raysft.pipeline.data.tool_ids import OPENAI_STYLE_ID, ToolIdFormat

    family = "mistral-7b-instruct-v0.3"
    tok = load(shared_tokenizers, family)
    encoder = ChatEncoder(tok)
    assert encoder.tool_ids == ToolIdFormat(9)
    assert all(ChatEncoder(load(shared_tokenizers, f)).tool_ids is None for f in FAMILIES if f != family)
    rows = openai_style(tool_rows())
    items = [normalise_row(r) for r in rows]
    assert all(i.drop_reason is None for i in items)
    with pytest.raises(Exception, match="9 characters"):  # as the rows come, the template refuses them
        tok.apply_chat_template(items[0].messages, tools=items[0].tools, tokenize=False)
    results = encoder.encode_views(items)
    assert not [r for r in results if isinstance(r, Exception)], [r.detail for r in results if isinstance(r, Exception)]
    expected_rewrites = 0
    for item, samples in zip(items, results):
        mapped, n = encoder.tool_ids.rewrite(item.messages)
        assert mapped == encoder.tool_ids.rewrite(item.messages)[0]  # deterministic
        calls = [c for m in mapped for c in m.get("tool_calls") or ()]
        originals = [c for m in item.messages for c in m.get("tool_calls") or ()]
        results_ids = [m["tool_call_id"] for m in mapped if m["role"] == "tool"]
        assert [c["id"] for c in calls] == results_ids  # a call and its result keep one id
        assert all(encoder.tool_ids.fits(c["id"]) for c in calls) and len({c["id"] for c in calls}) == len(calls)
        expected_rewrites += n
        assert n == sum(1 for c in originals if not encoder.tool_ids.fits(c["id"]))
        full = tok.apply_chat_template(mapped, tools=item.tools, tokenize=False)
        assert samples[0][0].tolist() == tok(full, add_special_tokens=False)["input_ids"]
        # exact masks: the trained tokens of every sample are exactly each assistant turn's output and </s>
        want = []
        for m in (m for m in mapped if m["role"] == "assistant"):
            if m.get("tool_calls"):
                body = ", ".join(
                    f"{{&#34;name&#34;: &#34;{c['function']['name']}&#34;, &#34;arguments&#34;: "
                    f"{json.dumps(c['function']['arguments'], ensure_ascii=False)}, &#34;id&#34;: &#34;{c['id']}&#34;}}"
                    for c in m["tool_calls"]
                )
                want.append(f"[TOOL_CALLS]  [{body}]</s>")
            else:
                want.append(f"{m['content']}</s>")
        got = [tok.decode(seg) for ids, labels in samples for seg in trained_segments(ids, labels)]
        assert sorted(got) == sorted(want), (got, want)
    assert expected_rewrites == 6  # 4 + 2 second-round calls; the ShareGPT row's generated id already fits
    # counted in stats.json, through the packing stage
    table = encode_table(encoder, items, list(range(len(items))), [0] * len(items))
    stats = StatsAccumulator(4096, [[tmp_path / "t.jsonl"]])
    stats.add(pack_batch(table, 4096))
    out = stats.to_dict()
    assert out["rows_used"] == len(rows) and out["rows_dropped"] == {}
    assert out["tool_call_ids_rewritten"] == expected_rewrites
    assert OPENAI_STYLE_ID.startswith("call_")


# ---- template controls ----------------------------------------------------------------------------


def test_chat_template_kwargs_reach_the_template(shared_tokenizers):
    """Qwen3 with enable_thinking=false: the generation prompt holds an empty think block the history
    lacks, so earlier turns are trained in their own views (as at inference)."""
    tok = load(shared_tokenizers, "qwen3")
    row = normalise_row(
        {
            "messages": [
                {"role": "user", "content": "a?"},
                {"role": "assistant", "content": "A"},
                {"role": "user", "content": "b?"},
                {"role": "assistant", "content": "B"},
            ]
        }
    )
    (plain,) = ChatEncoder(tok).encode_views([row])
    (off,) = ChatEncoder(tok, template_kwargs={"enable_thinking": False}).encode_views([row])
    assert len(plain) == 1 and len(off) == 2
    assert [tok.decode(s) for s in trained_segments(*off[1])] == ["A<|im_end|>"]
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>" in tok.decode(off[1][0])
