"""Tool calling for the OpenAI-compatible API: tools into the prompt, ``tool_calls`` out of the answer.

Prompt side. When the tokenizer's chat template knows tools (its Jinja source reads ``tools``, as the
Qwen2.5 / Llama 3.1 / Hermes templates do), the OpenAI ``tools`` list is rendered by the template itself
(``TokenizerTemplate.render(..., tools=)``) and assistant ``tool_calls`` / ``tool`` messages are passed to
it as they are. Otherwise a documented fallback is used: a system-prompt section that lists the tools as
JSON and asks for calls in the Hermes format below; earlier assistant calls are written back in the same
format so the model sees its own convention, and ``tool`` messages keep their role (every built-in
template has a tool slot).

Answer side. The model calls a tool by writing, anywhere in its answer::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

Each block becomes one OpenAI ``tool_call`` (``arguments`` as a JSON string); text outside the blocks is the
message content. The text is parsed with ``json.loads`` only (never evaluated). A block that is not valid
JSON with a string ``name`` stays in the content, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)

FALLBACK_INSTRUCTIONS = (
    "You can call the following tools (functions). To call a tool, reply with one block per call, exactly:\n"
    f'{OPEN}{{"name": "<tool name>", "arguments": {{<arguments as a JSON object>}}}}{CLOSE}\n'
    "The results come back in messages with the role 'tool'; then answer the user with them.\n"
    "Tools:\n"
)


def template_supports_tools(chat: Any) -> bool:
    """Whether the chat model's template renders an OpenAI ``tools`` list itself."""
    tokenizer = getattr(chat.template, "tokenizer", None)
    source = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(source, str) and "tools" in source


def prepare(chat: Any, messages: list[dict], tools: list[dict] | None, tool_choice: Any = None) -> tuple[
    list[dict], list[dict] | None
]:
    """Messages and the ``tools`` argument for ``ChatModel.build_prompt`` (None when the fallback is used)."""
    if not tools or tool_choice == "none":
        return [_flatten_calls(m) for m in messages], None
    if template_supports_tools(chat):
        return [_native_calls(m) for m in messages], tools
    messages = [_flatten_calls(m) for m in messages]
    section = FALLBACK_INSTRUCTIONS + json.dumps([t.get("function", t) for t in tools], ensure_ascii=False)
    forced = _forced_name(tool_choice)
    if forced:
        section += f"\nYou must call the tool {forced!r}."
    elif tool_choice == "required":
        section += "\nYou must call at least one tool."
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + section}
    else:
        messages.insert(0, {"role": "system", "content": section})
    return messages, None


def parse(text: str) -> tuple[str | None, list[dict]]:
    """Split a model answer into (content, OpenAI tool_calls)."""
    calls: list[dict] = []
    kept: list[str] = []
    last = 0
    for match in _BLOCK.finditer(text):
        call = _parse_call(match.group(1))
        if call is None:
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    if not calls:
        return _parse_bare(text)
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


# Other models' native formats, recognised only when the whole answer is the call: Llama 3.1 writes a bare
# {"name": ..., "parameters": {...}} (optionally after <|python_tag|>), Mistral "[TOOL_CALLS] [{...}, ...]".
_BARE_PREFIXES = ("<|python_tag|>", "[TOOL_CALLS]")


def _parse_bare(text: str) -> tuple[str | None, list[dict]]:
    body = text.strip()
    for prefix in _BARE_PREFIXES:
        body = body.removeprefix(prefix).strip()
    if not body.startswith(("{", "[")):
        return text, []
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return text, []
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(i, dict) and ("arguments" in i or "parameters" in i) for i in items):
        return text, []  # plain JSON the user asked for, not a call
    calls = [_parse_call(json.dumps(i)) for i in items]
    return (None, calls) if all(calls) else (text, [])


def visible_prefix(text: str) -> str:
    """The part of a growing answer that is surely not inside a tool-call block (safe to stream as text)."""
    head = text.lstrip()
    if head.startswith(("{", "[")) or any(p.startswith(head[:len(p)]) for p in _BARE_PREFIXES if head):
        return ""  # may be a bare call (Llama 3.1 / Mistral): hold it until the answer is complete
    start = text.find(OPEN)
    if start >= 0:
        return text[:start]
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return text[:-n]
    return text


def _parse_call(body: str) -> dict | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": data["name"], "arguments": arguments}}


def _forced_name(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    return None


def _flatten_calls(message: dict) -> dict:
    """An assistant message with ``tool_calls`` as plain text in the fallback format."""
    calls = message.get("tool_calls") or []
    out = {"role": message["role"], "content": message.get("content") or ""}
    if message["role"] == "assistant" and calls:
        blocks = []
        for call in calls:
            function = call.get("function", {})
            blocks.append(OPEN + json.dumps({"name": function.get("name"), "arguments": _arguments(function)},
                                            ensure_ascii=False) + CLOSE)
        out["content"] = "\n".join(([out["content"]] if out["content"] else []) + blocks)
    return out


def _native_calls(message: dict) -> dict:
    """A message as chat templates with tool support expect it (arguments as an object, not a string)."""
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c.get("id"), "type": "function",
             "function": {"name": c.get("function", {}).get("name"), "arguments": _arguments(c.get("function", {}))}}
            for c in message["tool_calls"]
        ]
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    if message.get("name"):
        out["name"] = message["name"]
    return out


def _arguments(function: dict) -> Any:
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
