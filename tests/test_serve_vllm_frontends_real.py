"""The front ends on real vLLM (float32, the default model), each against finechat's PyTorch engine given the same
request: the OpenAI API with ``tools`` (the same greedy answer parsed into the same tool calls or content), the web
page in a headless Chromium (the same greedy answer shown), the medical retrieval (the same answer with its sources
and notice; the same KG-question predictions), ChatGLM's ``POST /`` with a history.

One vLLM server serves the whole module (start-up takes minutes on a CPU). These skip, with the reason shown, where
vLLM is not installed (CI does not build it); the same front ends run always against a fake vLLM in
test_serve_vllm_frontends.py."""

import json
import os
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import CHROMIUM, LiveServer, chromium_page
from vllm_helpers import REAL_VLLM

from finechat.generate.engine import ChatModel
from finechat.generate.vllm_engine import VllmChatModel
from finechat.medical.evaluate import evaluate_kg, load_kg_questions
from finechat.medical.retrieval import NOTICE, DiseaseTable, attach_medical
from finechat.serve.api import create_app
from finechat.serve.schemas import ServeSettings

pytestmark = REAL_VLLM

ROOT = Path(__file__).resolve().parents[1]
MEDICAL = ROOT / "data" / "samples" / "medical"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def servers(torch_bot, vllm_bot):
    """finechat's server (the app ``finechat serve`` runs) on each engine: {"torch": url, "vllm": url}."""
    lives = {name: LiveServer(create_app(bot, ServeSettings(model_name="default")))
             for name, bot in (("torch", torch_bot), ("vllm", vllm_bot))}
    yield {name: live.url for name, live in lives.items()}
    for live in lives.values():
        live.stop()


def test_tools_request_gives_the_pytorch_engines_reply(servers):
    asks = [dict(messages=[{"role": "user", "content": "What is the weather like in Paris today?"}], tools=TOOLS),
            dict(messages=[{"role": "user", "content": "Is it raining in Berlin?"}], tools=TOOLS,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})]
    replies = {}
    for name, url in servers.items():
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        replies[name] = []
        for ask in asks:
            choice = client.chat.completions.create(model="default", temperature=0, max_tokens=48, **ask).choices[0]
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
            replies[name].append((choice.message.content, calls, choice.finish_reason))
    print("tools replies (vLLM):", replies["vllm"])  # shown with -s
    assert replies["vllm"] == replies["torch"]
    for content, calls, finish in replies["vllm"]:  # well formed: a call's arguments are JSON, or it is text
        assert calls or content
        assert finish == "tool_calls" if calls else finish in ("stop", "length")
        assert all(isinstance(json.loads(arguments), dict) for _, arguments in calls)


def test_glm_api_with_history_gives_the_pytorch_engines_reply(servers):
    body = {"prompt": "And of Germany?", "history": [["What is the capital of France?", "The capital of France is "
                                                                                         "Paris."]],
            "temperature": 0.01, "top_p": 0.7, "max_length": 400}
    replies = {name: httpx.post(url + "/", json=body, timeout=600).json() for name, url in servers.items()}
    print("ChatGLM POST / (vLLM):", replies["vllm"]["response"])
    assert replies["vllm"]["status"] == 200 and replies["vllm"]["response"]
    assert replies["vllm"]["response"] == replies["torch"]["response"]
    assert replies["vllm"]["history"] == [*body["history"], ["And of Germany?", replies["vllm"]["response"]]]


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (install Debian's chromium)")
def test_web_page_shows_the_greedy_answer(servers):
    question = "What is the capital of France?"
    expected = openai.OpenAI(base_url=servers["torch"] + "/v1", api_key="unused", max_retries=0).chat.completions.create(
        model="default", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=32,
    ).choices[0].message.content
    with chromium_page(servers["vllm"] + "/") as page:
        page.evaluate("() => { document.getElementById('temperature').value = '0';"
                      " document.getElementById('max_tokens').value = '32'; }")
        page.fill("#input", question)
        page.press("#input", "Enter")
        page.wait_for_function("() => !document.querySelector('#send').disabled && "
                               "document.querySelectorAll('.msg.assistant').length === 1", timeout=300000)
        shown = page.evaluate("() => state.messages[state.messages.length - 1]")
        assert shown == {"role": "assistant", "content": expected}
        assert expected and expected.split()[0] in page.locator(".msg.assistant .body").inner_text()


def test_medical_retrieval_gives_the_pytorch_engines_answers(torch_bot, vllm_bot):
    table = DiseaseTable.load(MEDICAL / "diseases.csv")
    question = "我这几天尿频、尿急，小便还痛，该怎么办？"
    answers = []
    for engine in (ChatModel(torch_bot.model, torch_bot.tokenizer, torch_bot.template),
                   VllmChatModel(vllm_bot.model, vllm_bot.tokenizer, vllm_bot.template)):  # hooks of their own
        answers.append(attach_medical(engine, table).chat(question, [], greedy=True, max_new_tokens=32)[0])
    print("medical answer (vLLM):", answers[1])
    assert answers[1] == answers[0]
    assert answers[1].endswith(NOTICE) and "尿路感染 (diseases.csv row" in answers[1]  # retrieved and cited

    rows = load_kg_questions(MEDICAL / "kg_qa.heldout.jsonl", max_samples=4)
    (m_torch, r_torch), (m_vllm, r_vllm) = (evaluate_kg(bot, rows, batch_size=1, max_new_tokens=24, progress=False)
                                            for bot in (torch_bot, vllm_bot))
    print("KG predictions (vLLM):", [r["predict"] for r in r_vllm], m_vllm["accuracy"])
    assert [r["predict"] for r in r_vllm] == [r["predict"] for r in r_torch]
    assert m_vllm["accuracy"] == m_torch["accuracy"]
