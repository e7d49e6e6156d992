"""Tool-call ids in the form a chat template demands, decided from the template itself.

Mistral v0.3's template raises unless every tool-call id is exactly 9 characters, and the model emits
9 alphanumerics (mistral-common's ids), while most tool-use data carries OpenAI-style ids (`call_` and
24 more). The demand is found by rendering probes, never from the model's name: a template that refuses
a small tool-calling conversation with an OpenAI-style id and renders it with a 9-alphanumeric id demands
that form (`demanded_format`). Then each row's ids that are not in the form are mapped to it
(`ToolIdFormat.rewrite`): deterministically (a hash of the original id), the same way for the assistant's
`tool_calls` ids and the tool messages' `tool_call_id` of one conversation, and never onto another id of
the conversation. The trained tokens then hold the id as the model would emit it.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OPENAI_STYLE_ID = "call_Xq7rT2mB9vK4sLp1Wn8dZ3cF"  # the shape of OpenAI's ids
_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolIdFormat:
    """A tool-call id form a template demands: `length` characters of [A-Za-z0-9]."""

    length: int

    @property
    def description(self) -> str:
        return f"{self.length} alphanumerics"

    def fits(self, call_id: str) -> bool:
        return len(call_id) == self.length and re.fullmatch(r"[A-Za-z0-9]+", call_id) is not None

    def example(self) -> str:
        return (_ALPHABET * self.length)[1 : 1 + self.length]

    def _mapped(self, call_id: str, salt: int) -> str:
        digest = int.from_bytes(hashlib.sha256(f"{call_id}\0{salt}".encode()).digest(), "big")
        out = []
        for _ in range(self.length):
            digest, k = divmod(digest, len(_ALPHABET))
            out.append(_ALPHABET[k])
        return "".join(out)

    def rewrite(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """(messages with every id not in this form mapped to it, how many distinct ids were mapped).

        >>> fmt = ToolIdFormat(9)
        >>> msgs = [{"role": "assistant", "content": "", "tool_calls": [{"id": "call_abc", "function": {}}]},
        ...         {"role": "tool", "content": "1", "tool_call_id": "call_abc"}]
        >>> out, n = fmt.rewrite(msgs)
        >>> new = out[0]["tool_calls"][0]["id"]
        >>> n, fmt.fits(new), out[1]["tool_call_id"] == new, fmt.rewrite(msgs)[0] == out
        (1, True, True, True)
        """
        ids = [c.get("id") for m in messages for c in m.get("tool_calls") or ()]
        ids += [m.get("tool_call_id") for m in messages if m.get("role") == "tool"]
        originals = [i for i in dict.fromkeys(ids) if isinstance(i, str)]
        taken = {i for i in originals if self.fits(i)}
        mapping: dict[str, str] = {}
        for original in originals:
            if original in taken:
                continue
            salt, new = 0, self._mapped(original, 0)
            while new in taken:  # never two ids of one conversation on one new id
                salt += 1
                new = self._mapped(original, salt)
            mapping[original] = new
            taken.add(new)
        if not mapping:
            return messages, 0
        out = []
        for m in messages:
            if m.get("tool_calls"):
                m = {**m, "tool_calls": [{**c, "id": mapping.get(c.get("id"), c.get("id"))} for c in m["tool_calls"]]}
            if m.get("role") == "tool" and m.get("tool_call_id") in mapping:
                m = {**m, "tool_call_id": mapping[m["tool_call_id"]]}
            out.append(m)
        return out, len(mapping)


def _probe(call_id: str) -> list[dict[str, Any]]:
    call = {"id": call_id, "type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}
    return [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "name": "get_time", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."},
    ]


def demanded_format(render: Callable[[list[dict[str, Any]]], str], length: int = 9) -> ToolIdFormat | None:
    """The id form the template behind `render` demands, or None when it takes OpenAI-style ids (or refuses
    tool calls whatever their ids: then rows fail as before, as `template_error`)."""

    def renders(messages: list[dict[str, Any]]) -> bool:
        try:
            render(messages)
        except Exception:  # noqa: BLE001 - a template's raise_exception, or a template without tool support
            return False
        return True

    if renders(_probe(OPENAI_STYLE_ID)):
        return None
    candidate = ToolIdFormat(length)
    return candidate if renders(_probe(candidate.example())) else None
