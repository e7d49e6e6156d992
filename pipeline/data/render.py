"""A conversation rendered with the tokenizer's own chat template, as samples with the turns each one trains.

A turn's trained text runs from its content (or, when its reasoning is trained or it is tool calls
only, from the end of the generation prompt, `render(messages[:k], add_generation_prompt=True)`) to
the first special token after its last authored piece (masks.py locates the pieces by construction).

A turn is trained inside the full conversation only when the model sees it there as at inference:
the generation-prompt render of the conversation before it is a prefix of the full render, and
every piece to train is rendered. Otherwise (Mistral moving the system message into the last user
turn, Qwen3 stripping reasoning from earlier turns) it is trained in its own view: the
conversation up to that turn, where it is the last turn. Every assistant turn is trained exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from raysft.pipeline.data.formats import BadRow
from raysft.pipeline.data.light_tokenizer import TokenizerSpec, compile_chat_template
from raysft.pipeline.data.masks import Turn, align, cut_at_sentinels, free_sentinel_pair, piece, sentinelled
from raysft.pipeline.data.sources import MAX_VIEWS
from raysft.pipeline.data.tool_ids import demanded_format


@dataclass
class Sample:
    """One rendered text to encode: the row's full conversation (view 0) or one turn's own view."""

    text: str
    turns: list[Turn] | None  # None: train every token (text rows, train_on=all)
    view: int = 0
    plain: bool = False  # a text row (special tokens added, eos appended)


class ChatRenderer:
    """Conversations -> samples (rendered text + the turns to train in it), for one tokenizer's chat template."""

    def __init__(
        self,
        spec: TokenizerSpec,
        train_on: str = "responses",
        train_on_reasoning: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.train_on = train_on
        self.train_on_reasoning = train_on_reasoning
        self.template = compile_chat_template(spec.chat_template) if spec.chat_template else None
        # Templates that read `reasoning_content` (Qwen3) get it as that field; others get it inline.
        self.reasoning_field = bool(spec.chat_template) and "reasoning_content" in spec.chat_template
        self.template_kwargs = {**spec.template_vars, **(template_kwargs or {})}
        # The tool-call id form the template demands (Mistral v0.3: 9 characters), probed once; rows' ids are mapped.
        self.tool_ids = demanded_format(self.render) if self.template is not None else None

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False, tools: list | None = None) -> str:
        # The same variables apply_chat_template passes (templates test `tools is not none`).
        return self.template.render(
            messages=self._template_messages(messages),
            tools=tools,
            documents=None,
            add_generation_prompt=generation_prompt,
            **self.template_kwargs,
        )

    def _template_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages as the template expects them: reasoning as `reasoning_content` for templates that
        read it, else inline as `<think>\n...\n</think>\n\n` before the content."""
        if self.reasoning_field or not any("reasoning_content" in m for m in messages):
            return messages
        out = []
        for m in messages:
            if "reasoning_content" in m:
                m = {k: v for k, v in m.items() if k != "reasoning_content"}
                m["content"] = f"<think>\n{messages[len(out)]['reasoning_content']}\n</think>\n\n{m['content']}"
            out.append(m)
        return out

    def _locate(self, messages: list[dict[str, Any]], tools: list | None) -> tuple[str, dict[str, tuple[int, int]]]:
        """The real render and the character span of every rendered assistant piece in it."""
        text = self.render(messages, tools=tools)
        pair = free_sentinel_pair(json.dumps([messages, tools], ensure_ascii=False))
        if pair is None:
            raise BadRow("template_mismatch", "the row holds every private-use character the mask sentinels can use")
        marked, values = sentinelled(messages, pair)
        spans = align(text, cut_at_sentinels(self.render(marked, tools=tools), pair), values)
        if spans is None:
            raise BadRow(
                "template_mismatch",
                "the rendered template does not hold the assistant contents where its own text leaves room for them",
            )
        return text, spans

    def _turn(
        self,
        k: int,
        messages: list[dict[str, Any]],
        tools: list | None,
        text: str,
        spans: dict[str, tuple[int, int]],
        own: bool,
    ) -> Turn | None:
        """Turn k of `text` to train, or None when it cannot be trained faithfully there (then it gets
        its own view); in its own view (`own`) a turn that cannot be trained is a BadRow."""
        m = messages[k]
        keys = [f"n{k}_{j}" for j in range(len(m.get("tool_calls") or []))]
        if m["content"]:
            keys.insert(0, f"c{k}")
        reasoning = bool(m.get("reasoning_content")) and self.train_on_reasoning
        if reasoning:
            keys.insert(0, f"r{k}")
        missing = [key for key in keys if key not in spans]
        if missing:
            if not own:
                return None
            what = {"r": "reasoning", "c": "content", "n": "tool calls"}[missing[0][0]]
            raise BadRow("template_mismatch", f"the chat template does not render assistant turn {k}'s {what}")
        if not keys:
            raise BadRow("template_mismatch", f"assistant turn {k} has nothing to train")
        from_content = not reasoning and bool(m["content"])
        start = spans[keys[0]][0]
        if not own or not from_content:
            prompt = self.render(messages[:k], generation_prompt=True, tools=tools)
            if not text.startswith(prompt) or len(prompt) > start:
                if not own:
                    return None
                raise BadRow(
                    "template_mismatch", f"the generation prompt before assistant turn {k} is not where the turn starts"
                )
            if not from_content:
                start = len(prompt)
        anchor = max(spans[key][1] for key in keys)
        later = [a for key, (a, _) in spans.items() if int(key[1:].split("_")[0]) > k]
        pieces = [piece(m, key) for key in sorted(keys, key=lambda key: spans[key][0])]
        return Turn(k, start, anchor, min(later, default=len(text)), pieces, from_content)

    def samples(self, messages: list[dict[str, Any]], tools: list | None = None) -> list[Sample]:
        """The samples of one conversation: the full render (training every turn it shows faithfully)
        and one view per other assistant turn."""
        if self.template is None:
            raise BadRow("no_chat_template", "the tokenizer has no chat template")
        if self.train_on == "all":
            return [Sample(self.render(messages, tools=tools), None)]
        text, spans = self._locate(messages, tools)
        last = len(messages) - 1
        turns, views = [], []
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                turn = self._turn(k, messages, tools, text, spans, own=k == last)
                (turns.append(turn) if turn is not None else views.append(k))
        out = [Sample(text, turns)] if turns else []
        if len(out) + len(views) > MAX_VIEWS:  # sample ids number a row's views in 6 bits
            raise BadRow(
                "too_many_views", f"{len(views)} assistant turns need their own view (at most {MAX_VIEWS - 1})"
            )
        for k in views:
            view = messages[: k + 1]
            view_text, view_spans = self._locate(view, tools)
            out.append(Sample(view_text, [self._turn(k, view, tools, view_text, view_spans, own=True)], len(out)))
        return out
