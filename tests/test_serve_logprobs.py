"""Log-probabilities from the server (OpenAI / vLLM shapes), through real HTTP on 127.0.0.1 and the official client."""

import json
import math
import threading

import httpx
import openai
import pytest
import torch
from serve_helpers import LiveServer, ScriptedChat

from finechat.serve.api import ServeSettings, create_app

PROMPT = "The capital of France is Paris."


@pytest.fixture(scope="module")
def server(tiny_bot):
    srv = LiveServer(create_app(tiny_bot, ServeSettings(model_name="tiny", max_echo_tokens=256)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def reference(bot, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 and the rows of log-probabilities, from one plain forward pass."""
    with torch.inference_mode():
        rows = bot.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [rows[i - 1, ids[i]].item() for i in range(1, len(ids))], rows


def test_echo_with_max_tokens_0_scores_the_prompt(client, tiny_bot):
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    choice = reply.choices[0]
    ids = tiny_bot.tokenizer(PROMPT)["input_ids"]
    expected, rows = reference(tiny_bot, ids)
    lp = choice.logprobs
    assert choice.text == PROMPT and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for i, top in enumerate(lp.top_logprobs[1:], start=1):
        values = list(top.values())
        assert values == sorted(values, reverse=True) and 3 <= len(values) <= 4
        assert values[0] == pytest.approx(rows[i - 1].max().item(), abs=1e-4)
        assert lp.token_logprobs[i] <= values[0] + 1e-6


def test_token_id_prompts_and_lists_of_prompts(server, tiny_bot):
    ids = tiny_bot.tokenizer(PROMPT)["input_ids"]
    body = {"prompt": [ids, ids[:4]], "max_tokens": 0, "echo": True, "logprobs": 1}
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    first, second = sorted(reply["choices"], key=lambda c: c["index"])
    expected, _ = reference(tiny_bot, ids)
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert second["logprobs"]["token_logprobs"][1:] == pytest.approx(expected[:3], abs=1e-4)
    texts = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={**body, "prompt": [PROMPT, "Hello"]}).json()["choices"]
    assert [c["index"] for c in texts] == [0, 1] and texts[0]["logprobs"] == first["logprobs"]
    assert reply["usage"]["prompt_tokens"] == len(ids) + 4


def test_generated_tokens_carry_raw_logprobs_whatever_the_sampling(client, tiny_bot):
    """Sampled at temperature 1.5 with penalties, the numbers are still the model's own distribution."""
    kwargs = dict(temperature=1.5, top_p=0.8, presence_penalty=1.0, frequency_penalty=0.5, seed=7)
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, logprobs=2, **kwargs)
    lp = reply.choices[0].logprobs
    ids = tiny_bot.tokenizer(PROMPT)["input_ids"]
    settings = tiny_bot.generation.from_kwargs(tiny_bot.generation, max_new_tokens=8, **kwargs)
    generated = [t for step in tiny_bot.generate_ids(ids, settings) for t in step]
    assert len(lp.tokens) == len(generated) and lp.token_logprobs[0] is not None
    expected, _ = reference(tiny_bot, ids + generated)
    assert lp.token_logprobs == pytest.approx(expected[len(ids) - 1:], abs=1e-4)


def test_greedy_tokens_are_the_most_likely_and_echo_adds_the_prompt(client):
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1)
    lp = plain.choices[0].logprobs
    assert all(v == max(top.values()) for v, top in zip(lp.token_logprobs, lp.top_logprobs))
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1, echo=True)
    elp = echoed.choices[0].logprobs
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert elp.token_logprobs[-len(lp.token_logprobs):] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert elp.tokens[-len(lp.tokens):] == lp.tokens


def test_streamed_completion_logprobs_add_up_to_the_whole(server):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2, "echo": True}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    tokens, values = [], []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                block = json.loads(line[6:])["choices"][0]["logprobs"]
                if block:
                    tokens += block["tokens"]
                    values += block["token_logprobs"]
    assert tokens == whole["tokens"]
    assert values[0] is None and values[1:] == pytest.approx(whole["token_logprobs"][1:], abs=1e-5)


def test_chat_logprobs_and_streaming(client, tiny_bot):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "hello"}], temperature=0, max_tokens=8,
                  logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy: the best one
    assert "".join(c.token for c in content).strip() == whole.choices[0].message.content
    assert content[0].bytes == list(content[0].token.encode())
    streamed = [c for chunk in client.chat.completions.create(stream=True, **kwargs) for choice in chunk.choices
                if choice.logprobs for c in choice.logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)
    plain = client.chat.completions.create(**{**kwargs, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_concurrent_requests_on_the_batch_scheduler_score_alike(server, tiny_bot):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 1}
    alone = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    results = [None] * 4

    def ask(i):
        results[i] = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r["text"] == alone["text"] and r["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
        assert r["logprobs"]["token_logprobs"] == pytest.approx(alone["logprobs"]["token_logprobs"], abs=1e-4)


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1000}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": "3"}, "logprobs"),
    ("/v1/completions", {"prompt": [5] * 100_000, "logprobs": 1, "echo": True, "max_tokens": 0}, "echo"),
    ("/v1/completions", {"prompt": [[1, 2], []], "logprobs": 1}, "prompt"),
    ("/v1/completions", {"prompt": [10**9], "logprobs": 1}, "prompt"),
    ("/v1/completions", {"prompt": [True, False], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": ["5", 3], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": [[1, True]], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, "logprobs"),
])
def test_bad_logprob_requests_are_400_naming_the_field(server, path, body, field):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error" and field in error["message"]


def test_an_engine_without_a_model_says_so(tiny_bot):
    srv = LiveServer(create_app(ScriptedChat(tiny_bot.tokenizer, "hi"), ServeSettings(model_name="s")))
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "logprobs": 1}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "logprobs_not_supported"
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["logprobs"] is None
    finally:
        srv.stop()


def test_logprobs_are_finite_numbers(client):
    reply = client.completions.create(model="tiny", prompt="你好，我是", max_tokens=3, echo=True, logprobs=0)
    values = reply.choices[0].logprobs.token_logprobs
    assert values[0] is None and all(math.isfinite(v) and v <= 0 for v in values[1:])


def test_completions_return_the_models_text_verbatim(tiny_bot):
    """A text completion is the model's text exactly (leading space, trailing newline); a chat answer is cleaned."""
    bot = ScriptedChat(tiny_bot.tokenizer, " Paris.\n", eos=False)
    srv = LiveServer(create_app(bot, ServeSettings(model_name="tiny")))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        prompt, n = "The capital of France is", len(bot.script)
        echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, echo=True)
        assert echoed.choices[0].text == prompt + " Paris.\n"
        assert client.completions.create(model="tiny", prompt=prompt, max_tokens=n).choices[0].text == " Paris.\n"
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, echo=True, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == prompt + " Paris.\n"
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=n)
        assert chat.choices[0].message.content == "Paris."  # chat answers keep their clean-up
    finally:
        srv.stop()
