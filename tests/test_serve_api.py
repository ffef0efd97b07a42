"""The OpenAI-compatible API and ChatGLM's POST /, through real HTTP on 127.0.0.1 and the official clients."""

import json

import httpx
import openai
import pytest
from serve_helpers import LiveServer, ScriptedChat

from finechat.serve.api import ServeSettings, create_app

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL_TEXT = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.fixture(scope="module")
def server(tiny_bot):
    srv = LiveServer(create_app(tiny_bot, ServeSettings(model_name="tiny")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_greedy_chat_equals_in_process_chat_and_usage_is_right(client, tiny_bot):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                           temperature=0, max_tokens=12)
    expected, _ = tiny_bot.chat("hello", greedy=True, max_new_tokens=12)
    assert reply.choices[0].message.content == expected
    prompt_ids = tiny_bot.encode_prompt(tiny_bot.build_prompt([{"role": "user", "content": "hello"}]))
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 12
    assert reply.model == "tiny" and reply.object == "chat.completion"


def test_streaming_chat_matches_non_streaming(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "What is the capital of France?"}],
                  temperature=0, max_tokens=16)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_multi_turn_keeps_context(client, tiny_bot):
    first = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                           temperature=0, max_tokens=8).choices[0].message.content
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": first}, {"role": "user", "content": "and again?"}]
    second = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    expected, _ = tiny_bot.chat("and again?", history=[("hello", first)], system="Be brief.", greedy=True,
                                max_new_tokens=8)
    assert second.choices[0].message.content == expected
    assert second.usage.prompt_tokens == len(tiny_bot.encode_prompt(tiny_bot.build_prompt(messages)))


def test_completions(client, tiny_bot):
    reply = client.completions.create(model="tiny", prompt="The capital of France", max_tokens=6, temperature=0)
    assert reply.object == "text_completion"
    assert reply.usage.prompt_tokens == len(tiny_bot.tokenizer("The capital of France")["input_ids"])
    streamed = client.completions.create(model="tiny", prompt="The capital of France", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_chatglm_api_post_root(server, tiny_bot):
    r = httpx.post(server.url + "/", json={"prompt": "你好", "history": [], "max_length": 60, "top_p": 0.7,
                                           "temperature": 0}, timeout=30)
    assert r.status_code == 200
    data = r.json()
    assert set(data) == {"response", "history", "status", "time"}
    assert data["status"] == 200 and data["history"] == [["你好", data["response"]]]
    assert len(data["time"]) == len("2023-03-23 21:38:40")
    expected, _ = tiny_bot.chat("你好", greedy=True, max_length=60)
    assert data["response"] == expected
    # a second turn sends the history back, as ChatGLM-6B's clients do
    r2 = httpx.post(server.url + "/", json={"prompt": "再说一次", "history": data["history"], "temperature": 0,
                                            "max_length": 80}, timeout=30).json()
    assert r2["history"][0] == data["history"][0] and r2["history"][1][0] == "再说一次"


@pytest.fixture(scope="module")
def tool_server(tiny_bot):
    bot = ScriptedChat(tiny_bot.tokenizer, CALL_TEXT)
    srv = LiveServer(create_app(bot, ServeSettings(model_name="scripted")))
    yield srv, bot
    srv.stop()


def test_tools_request_returns_tool_calls(tool_server):
    srv, bot = tool_server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "Let me check."
    prompt = bot.tokenizer.decode(bot.prompts[-1])
    assert "get_weather" in prompt and "<tool_call>" in prompt  # the fallback tool section
    # streaming: the text streams, the call arrives as a tool_calls delta
    chunks = list(client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert text == "Let me check." and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the tool's result goes back to the model
    follow = messages + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    client.chat.completions.create(model="scripted", messages=follow, tools=TOOLS)
    prompt = bot.tokenizer.decode(bot.prompts[-1])
    assert "sunny, 21 C" in prompt and '"city": "Paris"' in prompt
    # without tools the same text is plain content
    plain = client.chat.completions.create(model="scripted", messages=messages)
    assert plain.choices[0].finish_reason == "stop" and plain.choices[0].message.content == CALL_TEXT


def test_api_key(tiny_bot):
    srv = LiveServer(create_app(tiny_bot, ServeSettings(model_name="tiny", api_key="s3cret")))
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.post(srv.url + "/", json={"prompt": "hi"}).status_code == 401
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(srv.url + "/").status_code == 200  # the page itself holds nothing; it asks for the key
    finally:
        srv.stop()
