"""Tool calls in and out of the prompt: the fallback format, native templates, parsing model output."""

import json

from finechat.generate.engine import ChatModel
from finechat.tools import toolcalls

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_parse_blocks_into_openai_tool_calls():
    text = ('Sure. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>')
    content, calls = toolcalls.parse(text)
    assert content == "Sure."
    assert [c["function"]["name"] for c in calls] == ["add", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert calls[1]["function"]["arguments"] == '{"a": 3}'
    assert calls[0]["id"] != calls[1]["id"] and calls[0]["type"] == "function"


def test_bad_blocks_stay_text_and_nothing_is_evaluated():
    for text in ["<tool_call>not json</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                 "<tool_call>__import__('os').system('x')</tool_call>", "plain answer"]:
        assert toolcalls.parse(text) == (text, [])
    # an unclosed block at the end of an answer (cut by max_tokens or a stop) still counts when it is whole JSON
    content, calls = toolcalls.parse('<tool_call>{"name": "add", "arguments": {}}')
    assert content is None and calls[0]["function"]["name"] == "add"


def test_visible_prefix_holds_back_a_starting_block():
    assert toolcalls.visible_prefix("Hello <tool") == "Hello "
    assert toolcalls.visible_prefix("Hello <tool_call>{") == "Hello "
    assert toolcalls.visible_prefix("Hello <b>") == "Hello <b>"


def test_fallback_prompt_and_native_template(tiny_bot):
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    assert not toolcalls.template_supports_tools(tiny_bot)
    prepared, template_tools = toolcalls.prepare(tiny_bot, messages, TOOLS, {"type": "function",
                                                                              "function": {"name": "add"}})
    assert template_tools is None and prepared[0]["role"] == "system"
    assert '"name": "add"' in prepared[0]["content"] and "You must call the tool 'add'" in prepared[0]["content"]
    assert prepared[2]["content"] == '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    assert toolcalls.prepare(tiny_bot, messages, TOOLS, "none")[0][0]["role"] == "user"

    tokenizer = tiny_bot.tokenizer
    tokenizer_copy = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer_copy.chat_template = (
        "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}: "
        "{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments | tojson }}{% else %}{{ m.content }}{% endif %}\n"
        "{% endfor %}assistant: ")
    native = ChatModel(None, tokenizer_copy, template="tokenizer")
    assert toolcalls.template_supports_tools(native)
    prepared, template_tools = toolcalls.prepare(native, messages, TOOLS)
    assert template_tools == TOOLS and prepared[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    prompt = native.build_prompt(prepared, template_tools)
    assert prompt.startswith("TOOLS:") and 'assistant: {"a": 1}' in prompt and "tool: 3" in prompt
