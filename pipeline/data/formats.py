"""Normalise rows of every supported instruction format to one chat form (or plain text).

Formats: OpenAI `messages`, ShareGPT `conversations` (from/value), Alpaca (instruction, input,
output), prompt/completion (strings or message lists; `question`/`answer` read as its alias) and
plain `text`. A row that cannot be normalised is not an exception: it comes back with a drop
reason (counted in stats.json), so one bad line never stops a run unless the config says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

# Drop reasons that mean the input itself is malformed (they count towards data.max_bad_fraction).
BAD_INPUT_REASONS = frozenset(
    {"malformed_json", "not_an_object", "missing_field", "empty_content", "unknown_role",
     "non_string_content", "unknown_format", "no_assistant_turn"}
)

_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system",
}
_CHAT_ROLES = {"system", "user", "assistant"}

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
NORMALISED_SCHEMA = pa.schema(
    [("source_id", pa.int64()), ("split", pa.int8()), ("messages", MESSAGE_TYPE), ("text", pa.string()),
     ("drop_reason", pa.string())]
)


class BadRow(Exception):
    """Raised inside normalisation; carries the drop reason (a stats.json key) and a short detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


@dataclass
class Normalised:
    """One row in chat form (`messages`) or plain text (`text`), or its drop reason."""

    messages: Optional[list[dict[str, str]]] = None
    text: Optional[str] = None
    drop_reason: Optional[str] = None
    detail: Optional[str] = None


def detect_format(row: dict[str, Any]) -> str:
    """The format a row's keys say it is in (first match wins)."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if ("prompt" in row and "completion" in row) or ("question" in row and "answer" in row):
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise BadRow("unknown_format", f"no known format fields among {sorted(row)[:6]}")


def _string(value: Any, field: str, allow_empty: bool = False) -> str:
    if value is None:
        raise BadRow("missing_field", f"'{field}' is missing or null")
    if not isinstance(value, str):
        raise BadRow("non_string_content", f"'{field}' is a {type(value).__name__}, not a string")
    if not allow_empty and not value.strip():
        raise BadRow("empty_content", f"'{field}' is empty")
    return value


def _get(row: dict[str, Any], field: str) -> Any:
    if field not in row or row[field] is None:
        raise BadRow("missing_field", f"'{field}' is missing or null")
    return row[field]


def _chat_list(value: Any, field: str, key_role: str, key_content: str, roles: dict[str, str] | None) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise BadRow("missing_field" if value is None else "non_string_content", f"'{field}' is not a list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise BadRow("non_string_content", f"{field}[{i}] is not an object")
        role = msg.get(key_role)
        if not isinstance(role, str):
            raise BadRow("missing_field", f"{field}[{i}].{key_role} is missing")
        mapped = roles.get(role.lower()) if roles is not None else (role if role in _CHAT_ROLES else None)
        if mapped is None:
            raise BadRow("unknown_role", f"{field}[{i}] has unknown role '{role}'")
        content = _string(msg.get(key_content), f"{field}[{i}].{key_content}", allow_empty=mapped != "assistant")
        out.append({"role": mapped, "content": content})
    return out


def _prompt_completion(row: dict[str, Any]) -> list[dict[str, str]]:
    pkey, ckey = ("prompt", "completion") if "prompt" in row or "completion" in row else ("question", "answer")
    prompt, completion = _get(row, pkey), _get(row, ckey)
    if isinstance(prompt, list):
        messages = _chat_list(prompt, pkey, "role", "content", None)
    else:
        messages = [{"role": "user", "content": _string(prompt, pkey)}]
    if isinstance(completion, list):
        tail = _chat_list(completion, ckey, "role", "content", None)
        if not tail or any(m["role"] != "assistant" for m in tail):
            raise BadRow("unknown_role", f"'{ckey}' must hold assistant messages only")
        messages += tail
    else:
        messages.append({"role": "assistant", "content": _string(completion, ckey)})
    return messages


def normalise_row(row: Any, fmt: str = "auto", system_prompt: str | None = None) -> Normalised:
    """One parsed row (a dict) -> `Normalised`; never raises for bad data."""
    try:
        if not isinstance(row, dict):
            raise BadRow("not_an_object", f"row is a {type(row).__name__}, not an object")
        kind = detect_format(row) if fmt == "auto" else fmt
        if kind == "text":
            return Normalised(text=_string(_get(row, "text"), "text"))
        if kind == "messages":
            messages = _chat_list(_get(row, "messages"), "messages", "role", "content", None)
        elif kind == "sharegpt":
            messages = _chat_list(_get(row, "conversations"), "conversations", "from", "value", _SHAREGPT_ROLES)
        elif kind == "alpaca":
            instruction = _string(_get(row, "instruction"), "instruction")
            extra = row.get("input")
            if extra is not None and not isinstance(extra, str):
                raise BadRow("non_string_content", f"'input' is a {type(extra).__name__}, not a string")
            user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
            messages = [{"role": "user", "content": user},
                        {"role": "assistant", "content": _string(_get(row, "output"), "output")}]
        elif kind == "prompt_completion":
            messages = _prompt_completion(row)
        else:
            raise BadRow("unknown_format", f"unknown format '{kind}'")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("no_assistant_turn", "the conversation has no assistant turn")
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return Normalised(messages=messages)
    except BadRow as bad:
        return Normalised(drop_reason=bad.reason, detail=bad.detail)


def parse_and_normalise(raw: str | None, fmt: str = "auto", system_prompt: str | None = None,
                        read_reason: str | None = None) -> Normalised:
    """A raw JSON text (one line / one element) -> `Normalised`; `read_reason` is a reader's drop."""
    if read_reason is not None:
        return Normalised(drop_reason=read_reason, detail=read_reason)
    try:
        row = json.loads(raw)
    except (TypeError, ValueError) as exc:
        return Normalised(drop_reason="malformed_json", detail=f"not valid JSON ({str(exc)[:60]})")
    return normalise_row(row, fmt, system_prompt)


def normalise_batch(table: pa.Table, fmt: str = "auto", system_prompt: str | None = None) -> pa.Table:
    """Pure stage: read table (source_id, split, row, read_reason) -> NORMALISED_SCHEMA table."""
    rows = table.column("row").to_pylist()
    reasons = table.column("read_reason").to_pylist()
    out = [parse_and_normalise(r, fmt, system_prompt, why) for r, why in zip(rows, reasons)]
    return pa.table(
        {
            "source_id": table.column("source_id"),
            "split": table.column("split"),
            "messages": pa.array([n.messages for n in out], MESSAGE_TYPE),
            "text": pa.array([n.text for n in out], pa.string()),
            "drop_reason": pa.array([n.drop_reason for n in out], pa.string()),
        },
        schema=NORMALISED_SCHEMA,
    )
