"""Normalise rows of every supported instruction format to one chat form (or plain text).

Formats: OpenAI `messages`, ShareGPT `conversations` (from/value), Alpaca (instruction, input,
output), prompt/completion (strings or message lists; `question`/`answer` read as its alias) and
plain `text`. A row that cannot be normalised is not an exception: it comes back with a drop
reason (counted in stats.json), so one bad line never stops a run unless the config says so.

Tool calling: assistant `tool_calls` (OpenAI form; `arguments` a JSON string or an object, always
handed to templates as an object), `tool` messages (`tool_call_id`, `name`), a row-level `tools`
list of JSON schemas (or a JSON string of one), and ShareGPT's `function_call` / `observation`
turns. Reasoning: an assistant `reasoning_content` field, or `<think>...</think>` leading the
content, becomes the message's `reasoning_content` (the content keeps only the answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Drop reasons that mean the input itself is malformed (they count towards data.max_bad_fraction).
BAD_INPUT_REASONS = frozenset(
    {
        "malformed_json",
        "not_an_object",
        "missing_field",
        "empty_content",
        "unknown_role",
        "non_string_content",
        "unknown_format",
        "no_assistant_turn",
        "bad_tool_call",
    }
)

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
_CHAT_ROLES = {"system", "user", "assistant", "tool"}
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


class BadRow(Exception):
    """Raised inside normalisation; carries the drop reason (a stats.json key) and a short detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


@dataclass
class Normalised:
    """One row in chat form (`messages`, with `tools` when the row declares any) or plain text
    (`text`), or its drop reason. Messages hold `role` and `content`, and where the row has them
    `reasoning_content`, `tool_calls` (assistant), `tool_call_id` and `name` (tool)."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    drop_reason: str | None = None
    detail: str | None = None
    tools: list[Any] | None = None


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


def _split_reasoning(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a content that opens with `<think>...</think>`; (None, content) otherwise."""
    head = content.lstrip()
    if not head.startswith(_THINK_OPEN) or _THINK_CLOSE not in head:
        return None, content
    reasoning, answer = head[len(_THINK_OPEN) :].split(_THINK_CLOSE, 1)
    return reasoning.strip("\n"), answer.lstrip("\n")


def _arguments(value: Any, where: str) -> Any:
    """A tool call's arguments as an object (a JSON string is parsed; templates expect objects)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRow("bad_tool_call", f"{where}.arguments is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRow("bad_tool_call", f"{where}.arguments is a {type(value).__name__}, not an object")
    return value


def _tool_calls(value: Any, where: str, first_id: int) -> list[dict[str, Any]]:
    """OpenAI-form tool calls; also accepts bare {name, arguments} objects (ShareGPT function_call).
    A call without an id gets `callNNNNN` (9 alphanumerics, the form Mistral's template requires)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRow("bad_tool_call", f"{where} is not a non-empty list of tool calls")
    out = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise BadRow("bad_tool_call", f"{at} is not an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRow("bad_tool_call", f"{at} has no function name")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = f"call{first_id + j:05d}"
        args = fn.get("arguments", fn.get("parameters"))
        out.append(
            {"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": _arguments(args, at)}}
        )
    return out


def _chat_list(
    value: Any, field: str, key_role: str, key_content: str, roles: dict[str, str] | None
) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise BadRow("missing_field" if value is None else "non_string_content", f"'{field}' is not a list of messages")
    out: list[dict[str, Any]] = []
    calls = 0  # tool calls so far (ids for calls without one; ShareGPT observations answer the last call)
    for i, msg in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise BadRow("non_string_content", f"{at} is not an object")
        role = msg.get(key_role)
        if not isinstance(role, str):
            raise BadRow("missing_field", f"{at}.{key_role} is missing")
        mapped = roles.get(role.lower()) if roles is not None else (role if role in _CHAT_ROLES else None)
        if mapped is None:
            raise BadRow("unknown_role", f"{at} has unknown role '{role}'")
        raw = msg.get(key_content)
        if mapped == "function_call":  # ShareGPT: the value is the call(s) as JSON
            try:
                parsed = json.loads(raw) if isinstance(raw, str) else raw
            except ValueError:
                raise BadRow("bad_tool_call", f"{at}.{key_content} is not a JSON function call") from None
            new = _tool_calls(parsed, f"{at}.{key_content}", calls)
            calls += len(new)
            if out and out[-1]["role"] == "assistant" and "tool_calls" not in out[-1]:
                out[-1]["tool_calls"] = new  # a gpt turn followed by its call is one assistant message
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": new})
            continue
        has_calls = mapped == "assistant" and msg.get("tool_calls") is not None
        if has_calls and raw is None:
            raw = ""
        content = _string(raw, f"{at}.{key_content}", allow_empty=mapped != "assistant" or has_calls)
        item: dict[str, Any] = {"role": mapped, "content": content}
        if mapped == "assistant":
            reasoning = msg.get("reasoning_content", msg.get("reasoning"))
            if reasoning is None:
                reasoning, item["content"] = _split_reasoning(content)
            elif not isinstance(reasoning, str):
                raise BadRow(
                    "non_string_content", f"{at}.reasoning_content is a {type(reasoning).__name__}, not a string"
                )
            if reasoning is not None and reasoning.strip():
                item["reasoning_content"] = reasoning
            if has_calls:
                item["tool_calls"] = _tool_calls(msg["tool_calls"], f"{at}.tool_calls", calls)
                calls += len(item["tool_calls"])
            if not item["content"].strip() and "tool_calls" not in item:
                raise BadRow("empty_content", f"'{at}.{key_content}' is empty")
        elif mapped == "tool":
            at_call = next((j for j in range(len(out) - 1, -1, -1) if out[j].get("tool_calls")), None)
            last = out[at_call]["tool_calls"] if at_call is not None else None
            call_id, name = msg.get("tool_call_id"), msg.get("name")
            if call_id is None and last is not None:  # ShareGPT observation: answers the calls in order
                answered = sum(1 for m in out[at_call + 1 :] if m["role"] == "tool")
                call_id = last[min(answered, len(last) - 1)]["id"]
            if name is None and last is not None:
                name = next((c["function"]["name"] for c in last if c["id"] == call_id), None)
            if call_id is not None:
                item["tool_call_id"] = str(call_id)
            if name is not None:
                item["name"] = str(name)
        out.append(item)
    return out


def _tools(row: dict[str, Any]) -> list[Any] | None:
    """The row's `tools` column (a list of JSON schemas, or a JSON string of one); None when absent."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise BadRow("bad_tool_call", "'tools' is not valid JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("bad_tool_call", "'tools' is not a list of JSON schemas")
    return tools or None


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


def rename_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """A row with a source's own field names (`columns`: standard name -> the row's name) renamed to
    the standard ones, at the top level and inside message lists (role/content/from/value)."""
    if not columns:
        return row
    out = dict(row)
    for standard, own in columns.items():
        if own in row and standard not in _MESSAGE_KEYS:
            out[standard] = out.pop(own) if own in out else row[own]
    inner = {standard: own for standard, own in columns.items() if standard in _MESSAGE_KEYS}
    if inner:
        for key in ("messages", "conversations", "prompt", "completion"):
            value = out.get(key)
            if isinstance(value, list):
                out[key] = [
                    {
                        **{s: m[o] for s, o in inner.items() if isinstance(m, dict) and o in m},
                        **{k: v for k, v in m.items() if k not in inner.values()},
                    }
                    if isinstance(m, dict)
                    else m
                    for m in value
                ]
    return out


_MESSAGE_KEYS = frozenset({"role", "content", "from", "value"})


def normalise_row(
    row: Any, fmt: str = "auto", system_prompt: str | None = None, columns: dict[str, str] | None = None
) -> Normalised:
    """One parsed row (a dict) -> `Normalised`; never raises for bad data."""
    try:
        if not isinstance(row, dict):
            raise BadRow("not_an_object", f"row is a {type(row).__name__}, not an object")
        row = rename_columns(row, columns or {})
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
            messages = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": _string(_get(row, "output"), "output")},
            ]
        elif kind == "prompt_completion":
            messages = _prompt_completion(row)
        else:
            raise BadRow("unknown_format", f"unknown format '{kind}'")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("no_assistant_turn", "the conversation has no assistant turn")
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return Normalised(messages=messages, tools=_tools(row))
    except BadRow as bad:
        return Normalised(drop_reason=bad.reason, detail=bad.detail)


def parse_and_normalise(
    raw: str | None,
    fmt: str = "auto",
    system_prompt: str | None = None,
    read_reason: str | None = None,
    columns: dict[str, str] | None = None,
) -> Normalised:
    """A raw JSON text (one line / one element) -> `Normalised`; `read_reason` is a reader's drop."""
    if read_reason is not None:  # the reader puts its detail where the row text would be
        return Normalised(drop_reason=read_reason, detail=raw or read_reason)
    try:
        row = json.loads(raw)
    except (TypeError, ValueError) as exc:
        return Normalised(drop_reason="malformed_json", detail=f"not valid JSON ({str(exc)[:60]})")
    except RecursionError:
        return Normalised(drop_reason="malformed_json", detail="nested too deeply to parse")
    return normalise_row(row, fmt, system_prompt, columns)
