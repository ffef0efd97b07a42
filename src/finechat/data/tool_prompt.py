"""How tool definitions and tool calls reach the prompt: one function for training, chat and serving.

A template that renders tools itself (its Jinja source reads ``tools``, as the Qwen2.5 / Llama 3.1 / Hermes
templates do) gets the OpenAI ``tools`` list and assistant ``tool_calls`` as they are. Any other template (the
built-in ones, and the default model's) gets a documented fallback: a system-prompt section that lists the tools
as JSON and asks for calls in the Hermes format::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

and earlier calls are written back in that format, so the model sees its own convention. ``tool`` messages keep
their role (every built-in template has a tool slot).

:func:`tool_prompt` is the one place this is decided: ``finechat.tools.toolcalls.prepare`` (chat, serve, the tool
agent) and the data pipeline (``finechat.data.tokenize``) both call it, so a tool-use example is trained on
exactly the text the model is shown when it serves. Training data keep a call as JSON text in the assistant turn
(ShareGPT ``function_call``, OpenAI ``tool_calls`` as read by ``finechat.data.formats``);
:func:`conversation_messages` turns such a turn back into ``tool_calls`` first.
"""

from __future__ import annotations

import json
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"

FALLBACK_INSTRUCTIONS = (
    "You can call the following tools (functions). To call a tool, reply with one block per call, exactly:\n"
    f'{OPEN}{{"name": "<tool name>", "arguments": {{<arguments as a JSON object>}}}}{CLOSE}\n'
    "The results come back in messages with the role 'tool'; then answer the user with them.\n"
    "Tools:\n"
)


def template_renders_tools(template: Any) -> bool:
    """Whether ``template`` renders an OpenAI ``tools`` list itself (a tokenizer chat template that reads it)."""
    tokenizer = getattr(template, "tokenizer", None)
    source = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(source, str) and "tools" in source


def tool_prompt(template: Any, messages: list[dict], tools: list[dict] | None, tool_choice: Any = None) -> tuple[
    list[dict], list[dict] | None
]:
    """Messages and the ``tools`` argument to render with ``template`` (None when the fallback is used)."""
    if not tools or tool_choice == "none":
        return [_flatten_calls(m) for m in messages], None
    tools = [t if isinstance(t, dict) and "function" in t else {"type": "function", "function": t} for t in tools]
    if template_renders_tools(template):
        return [_native_calls(m) for m in messages], tools
    messages = [_flatten_calls(m) for m in messages]
    section = FALLBACK_INSTRUCTIONS + json.dumps([t["function"] for t in tools], ensure_ascii=False)
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


def where_tools_go(template: Any, tools: list | None) -> str:
    """One line for ``finechat data preview``: where a conversation's tool list ends up in the prompt."""
    if not tools:
        return "no tools"
    if template_renders_tools(template):
        return f"{len(tools)} tool(s) rendered by the tokenizer's chat template; calls as the template writes them"
    return (f"{len(tools)} tool(s) listed in the system prompt (the template has no tools slot); "
            f"calls trained as {OPEN}...{CLOSE} blocks, as chat and serve ask for them")


def conversation_messages(messages: list[dict]) -> list[dict]:
    """Template messages of a data conversation, with assistant turns that hold a call as JSON text (ShareGPT
    ``function_call``, OpenAI ``tool_calls``) turned back into ``tool_calls``."""
    out = []
    for m in messages:
        calls = parse_call_text(m["content"]) if m["role"] == "assistant" else None
        out.append({"role": "assistant", "content": "", "tool_calls": calls} if calls else m)
    return out


def parse_call_text(text: str) -> list[dict] | None:
    """OpenAI ``tool_calls`` from a data turn's text: ``{"name", "arguments"}``, a list of them, or a list of
    OpenAI ``tool_calls`` items; None when the text is not (only) calls."""
    body = text.strip()
    if not body.startswith(("{", "[")):
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        function = item.get("function") if isinstance(item.get("function"), dict) else item
        if not isinstance(function.get("name"), str) or not ({"arguments", "parameters"} & set(function)):
            return None
        call: dict[str, Any] = {"type": "function", "function": {
            "name": function["name"], "arguments": function.get("arguments", function.get("parameters"))}}
        if isinstance(item.get("id"), str):
            call["id"] = item["id"]
        calls.append(call)
    return calls or None


def _forced_name(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    return None


def _flatten_calls(message: dict) -> dict:
    """A message with ``tool_calls`` as plain text in the fallback format."""
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
