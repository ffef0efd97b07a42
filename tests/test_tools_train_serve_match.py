"""A tool-use example is trained on exactly the prompt chat and serve show for the same tools and history, and the
trained call is what the server parses back (built-in templates, the tiny model's Jinja template, a native one)."""

import json

import pytest

from finechat.data.formats import read_conversations
from finechat.data.tokenize import IGNORE_INDEX, TokenizeSettings, tokenize_conversation
from finechat.errors import DataError
from finechat.generate.engine import ChatModel
from finechat.tools import toolcalls

TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "current time in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Beijing"}'}}
SHAREGPT = {"conversations": [
    {"from": "human", "value": "北京现在几点？"},
    {"from": "function_call", "value": '{"name": "get_time", "arguments": {"city": "Beijing"}}'},
    {"from": "observation", "value": '{"time": "14:05"}'},
    {"from": "gpt", "value": "下午 2 点 05 分。"}], "tools": [TOOLS[0]["function"]]}
OPENAI = {"messages": [
    {"role": "user", "content": "北京现在几点？"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"time": "14:05"}'},
    {"role": "assistant", "content": "下午 2 点 05 分。"}], "tools": TOOLS}
# What a client sends back to the server before the final answer (OpenAI API).
HISTORY = [{"role": "user", "content": "北京现在几点？"},
           {"role": "assistant", "content": None, "tool_calls": [CALL]},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"time": "14:05"}'}]
NATIVE = ("{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{% for m in messages %}<{{ m.role }}>"
          "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}"
          "{% endfor %}{% else %}{{ m.content }}{% endif %}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<assistant>{% endif %}")


def spans(tokenizer, example):
    """(prompt text before each trained span, trained span text), decoded from the example's labels."""
    ids, labels = example["input_ids"], example["labels"]
    out = []
    i = 0
    while i < len(ids):
        if labels[i] != IGNORE_INDEX:
            j = i
            while j < len(ids) and labels[j] != IGNORE_INDEX:
                j += 1
            out.append((tokenizer.decode(ids[:i]), tokenizer.decode(ids[i:j])))
            i = j
        else:
            i += 1
    return out


def bot_for(tiny_bot, template):
    if template == "native":
        tok = type(tiny_bot.tokenizer).from_pretrained(tiny_bot.tokenizer.name_or_path)
        tok.chat_template = NATIVE
        return ChatModel(None, tok, template="tokenizer")
    return ChatModel(None, tiny_bot.tokenizer, template=template)


@pytest.mark.parametrize("template", ["chatml", "alpaca", "tokenizer", "native"])
@pytest.mark.parametrize("record", [SHAREGPT, OPENAI], ids=["sharegpt", "openai"])
def test_training_prompt_is_the_serving_prompt(tiny_bot, tmp_path, template, record):
    bot = bot_for(tiny_bot, template)
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    conversation = read_conversations(path).conversations[0]
    example = tokenize_conversation(conversation, bot.tokenizer, bot.template, TokenizeSettings())
    (prompt_1, call), (prompt_2, answer) = spans(bot.tokenizer, example)

    def served(history):
        messages, template_tools = toolcalls.prepare(bot, history, TOOLS)
        return bot.tokenizer.decode(bot.encode_prompt(bot.build_prompt(messages, template_tools)))

    assert prompt_1 == served(HISTORY[:1])
    assert "get_time" in prompt_1  # the tools are in the prompt the model learns from
    assert prompt_2 == served(HISTORY)
    if template != "native":  # the trained call is what the server turns back into a tool call
        content, calls = toolcalls.parse(call.split("<|im_end|>")[0].split("</s>")[0])
        assert calls and calls[0]["function"]["name"] == "get_time"
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Beijing"}
    else:
        assert call.startswith('CALL get_time {"city": "Beijing"}')
    assert answer.startswith("下午 2 点 05 分。")


def test_text_beside_tool_calls_is_refused_not_dropped(tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]},
                           {"role": "tool", "content": "14:05"}, {"role": "assistant", "content": "2 pm"}]}
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x.jsonl:1.*tool_calls"):
        read_conversations(path)


def test_preview_says_where_the_tools_went(tiny_model_dir, tmp_path, capsys):
    from finechat.cli import main

    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(SHAREGPT, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["data", "preview", str(path), "--model", str(tiny_model_dir), "--template", "chatml",
                 "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "# tools: 1 tool(s) listed in the system prompt" in out
    assert '⟦<tool_call>{"name": "get_time", "arguments": {"city": "Beijing"}}</tool_call>' in out
