"""Server-side tools (finechat serve --tools): over real HTTP with the openai client, and folded on the page."""

import json
import os
import shutil
import tempfile

import httpx
import openai
import pytest
from serve_helpers import LiveServer
from tiny import make_tokenizer
from tools_helpers import ScriptedModel, moss_script

from finechat.serve.api import ServeSettings, create_app
from finechat.tools.toolbox import build_registry

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def tool_server():
    bot = ScriptedModel(make_tokenizer(), moss_script('Calculate("6*7")'))
    srv = LiveServer(create_app(bot, ServeSettings(model_name="moss"), tools=build_registry("calculator")))
    yield srv, bot
    srv.stop()


def test_server_runs_tools(tool_server):
    srv, bot = tool_server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="moss", messages=[{"role": "user", "content": "6 times 7?"}])
    message = reply.choices[0].message
    assert message.content == "The tool says: 42" and reply.choices[0].finish_reason == "stop"
    assert message.model_extra["finechat_tool_calls"] == [
        {"id": "call_1_0", "name": "Calculate", "arguments": ["6*7"], "result": "42", "ok": True}]
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert "<|Results|>:\nCalculate(\"6*7\") =>\n42\n<eor>" in bot.prompts[-1]


def test_server_streams_tool_events_then_the_answer(tool_server):
    srv, _ = tool_server
    body = {"model": "moss", "messages": [{"role": "user", "content": "6 times 7?"}], "stream": True}
    deltas = []
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                deltas.append(json.loads(line[6:])["choices"][0]["delta"])
    tools = [d["finechat_tool"] for d in deltas if "finechat_tool" in d]
    assert [t["type"] for t in tools] == ["call", "result"] and tools[1]["content"] == "42"
    assert "".join(d.get("content") or "" for d in deltas) == "The tool says: 42"
    first_text = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert first_text > next(i for i, d in enumerate(deltas) if "finechat_tool" in d)


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent")
def test_page_shows_tool_calls_folded(tool_server):
    from playwright.sync_api import sync_playwright

    srv, _ = tool_server
    profile = tempfile.mkdtemp(prefix="finechat-chromium-")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = context.new_page()
            page.goto(srv.url + "/")
            page.fill("#input", "6 times 7?")
            page.press("#input", "Enter")
            page.wait_for_function("() => !document.querySelector('#send').disabled", timeout=30000)
            tool = page.locator(".msg.assistant details.tool")
            assert tool.count() == 1
            assert tool.locator("summary").inner_text() == 'Tool: Calculate("6*7")'
            assert not tool.evaluate("el => el.open")  # folded until clicked
            assert tool.locator("pre.result").text_content() == "42"
            assert page.locator(".msg.assistant .body").inner_text().strip() == "The tool says: 42"
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def test_logprobs_with_server_side_tools_is_a_400_not_dropped(tool_server):
    srv, _ = tool_server
    body = {"messages": [{"role": "user", "content": "6 times 7?"}], "logprobs": True}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
