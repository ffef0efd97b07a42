"""Tool calling for the OpenAI-compatible API: tools into the prompt, ``tool_calls`` out of the answer.

Prompt side: :func:`finechat.data.tool_prompt.tool_prompt`, the one function that also builds training
examples, so that what is served is what was trained. The tokenizer's chat template renders the OpenAI ``tools``
list itself when it knows tools; otherwise a system-prompt section lists them and asks for the block below.

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

from finechat.data.tool_prompt import CLOSE, OPEN, template_renders_tools, tool_prompt
from finechat.generate.contract import ChatEngine

_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)


def template_supports_tools(chat: ChatEngine) -> bool:
    """Whether the chat model's template renders an OpenAI ``tools`` list itself."""
    return template_renders_tools(chat.template)


def prepare(chat: ChatEngine, messages: list[dict], tools: list[dict] | None, tool_choice: Any = None) -> tuple[
    list[dict], list[dict] | None
]:
    """Messages and the ``tools`` argument for ``ChatModel.build_prompt`` (None when the fallback is used)."""
    return tool_prompt(chat.template, messages, tools, tool_choice)


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
