"""One request must not take the server down: limits and disconnects on every path, cross-site requests refused,
client input that used to answer 500. Real HTTP on 127.0.0.1; a scripted model where the model does not matter."""

import json
import socket
import threading

import httpx
import pytest
from serve_helpers import LiveServer, ScriptedChat, wait_until

from finechat.serve.api import ServeSettings, create_app
from finechat.serve.guards import HostNames
from finechat.tools.toolbox import build_registry

USER = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "hello " * 1500}]
# Text a tool-using agent shows nothing of while it is written (a tool call in progress), made slowly.
HIDDEN_CALL = "<tool_call>" + " x" * 3000


@pytest.fixture(scope="module")
def servers(tiny_bot):
    """A plain server and one that runs tools itself, both with a slow scripted model and a 1000-token prompt limit."""
    made = {}
    for name, tools in (("plain", None), ("tools", build_registry("calculator"))):
        bot = ScriptedChat(tiny_bot.tokenizer, HIDDEN_CALL, delay=0.01)
        made[name] = (LiveServer(create_app(bot, ServeSettings(max_prompt_tokens=1000), tools=tools)), bot)
    yield made
    for srv, _ in made.values():
        srv.stop()


# (server, path, body): every route that generates, streaming or not, with and without server-side tools
PATHS = {
    "chat": ("plain", "/v1/chat/completions", {"messages": USER}),
    "chat stream": ("plain", "/v1/chat/completions", {"messages": USER, "stream": True}),
    "completions": ("plain", "/v1/completions", {"prompt": "hi"}),
    "completions stream": ("plain", "/v1/completions", {"prompt": "hi", "stream": True}),
    "chatglm": ("plain", "/", {"prompt": "hi"}),
    "tools": ("tools", "/v1/chat/completions", {"messages": USER}),
    "tools stream": ("tools", "/v1/chat/completions", {"messages": USER, "stream": True}),
}


def _too_long(body):
    if "messages" in body:
        return {**body, "messages": LONG}
    return {**body, "prompt": LONG[0]["content"]}


@pytest.mark.parametrize("name", PATHS)
def test_every_path_checks_the_prompt_limit_before_generating(servers, name):
    which, path, body = PATHS[name]
    srv, bot = servers[which]
    started = len(bot.prompts)
    r = httpx.post(srv.url + path, json=_too_long(body), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert len(bot.prompts) == started  # nothing was generated


@pytest.mark.parametrize("name", PATHS)
def test_every_path_stops_generating_when_the_client_leaves(servers, name):
    which, path, body = PATHS[name]
    srv, bot = servers[which]
    payload = json.dumps({**body, "max_tokens": 3000, "max_length": 3000}).encode()
    started = len(bot.prompts)
    sock = socket.create_connection(("127.0.0.1", srv.port))
    try:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert wait_until(lambda: len(bot.prompts) > started and bot.running == 1, timeout=30)
    finally:
        sock.close()
    # 3000 tokens at 10 ms each would take 30 s: it stops within a token or two of the client leaving
    assert wait_until(lambda: bot.running == 0, timeout=10)


def test_tools_stream_with_a_full_queue_gets_429_like_plain_requests(tiny_bot):
    bot = ScriptedChat(tiny_bot.tokenizer, HIDDEN_CALL, delay=0.01)
    srv = LiveServer(create_app(bot, ServeSettings(max_queue=0), tools=build_registry("calculator")))
    try:
        body = {"messages": USER, "stream": True, "max_tokens": 3000}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as first:
            assert first.status_code == 200
            assert wait_until(lambda: bot.running == 1, timeout=30)
            for stream in (True, False):
                busy = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
                assert busy.status_code == 429, busy.text
                assert busy.json()["error"]["code"] == "queue_full" and int(busy.headers["Retry-After"]) >= 1
        assert wait_until(lambda: bot.running == 0, timeout=10)
    finally:
        srv.stop()


# -- cross-site requests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(tiny_bot):
    bot = ScriptedChat(tiny_bot.tokenizer, "fine")
    srv = LiveServer(create_app(bot, ServeSettings(allowed_hosts=["my.box"])))
    yield srv
    srv.stop()


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/"])
def test_api_bodies_must_be_json(guarded, path, content_type):
    body = json.dumps({"messages": USER, "prompt": "hi", "max_tokens": 2}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(guarded.url + path, content=body, headers=headers, timeout=30)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(guarded.url + path, content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"},
                    timeout=30)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("host,allowed", [
    ("evil.example", False), ("evil.example:{port}", False), ("127.0.0.1.evil.example", False),
    ("localhost.evil.example:{port}", False), ("192.168.1.20:{port}", False),
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("LOCALHOST.", True), ("[::1]:{port}", True),
    ("my.box:{port}", True),
])
def test_only_the_hosts_the_server_answers_to(guarded, host, allowed):
    headers = {"Host": host.format(port=guarded.port)}
    for method, path in (("GET", "/health"), ("GET", "/"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, guarded.url + path, headers=headers, json={"messages": USER, "max_tokens": 2},
                          timeout=30)
        if allowed:
            assert r.status_code == 200, (method, path, r.text)
        else:
            assert r.status_code == 421, (method, path, r.text)
            assert r.json()["error"]["code"] == "host_not_allowed"


def test_a_server_bound_to_all_interfaces_accepts_addresses_but_not_foreign_names():
    hosts = HostNames(["0.0.0.0", "api.lan"])
    assert hosts.allows("192.168.1.20:8000") and hosts.allows("[fe80::1]:8000") and hosts.allows("api.lan")
    assert not hosts.allows("evil.example") and not hosts.allows("evil.example:8000")
    assert HostNames(["*"]).allows("anything.example")
    assert not HostNames([]).allows("192.168.1.20")


def test_static_files_get_the_page_security_headers(guarded):
    for path in ("/", "/static/app.js", "/static/style.css", "/health"):
        r = httpx.get(guarded.url + path, timeout=30)
        assert r.status_code == 200, path
        assert "default-src 'self'" in r.headers["Content-Security-Policy"], path
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Referrer-Policy"] == "no-referrer"
        assert len(r.headers.get_list("Content-Security-Policy")) == 1


# -- client input that used to answer 500 -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tiny_bot):
    srv = LiveServer(create_app(tiny_bot, ServeSettings(model_name="tiny")))
    yield srv
    srv.stop()


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/", b'{"prompt": "\\udfff"}', "prompt"),
    ("/", b'{"prompt": "hi", "history": [["ok", "\\ud83d"]]}', "history.0.1"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/completions", b'{"prompt": "hi", "\\ud800": 1}', "\\ud800"),
])
def test_lone_surrogates_are_a_400_naming_the_field(tiny_server, path, raw, param):
    r = httpx.post(tiny_server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_unicode" and error["param"] == param
    # a real pair is fine
    ok = httpx.post(tiny_server.url + "/v1/completions", content=b'{"prompt": "\\ud83d\\ude00", "max_tokens": 2}',
                    headers={"Content-Type": "application/json"}, timeout=30)
    assert ok.status_code == 200


@pytest.mark.parametrize("seed,status", [(2**70, 422), (2**64, 422), (-(2**63) - 1, 422), (2**64 - 1, 200),
                                         (-(2**63), 200), (7, 200)])
def test_seeds_outside_64_bits_are_a_422_naming_seed(tiny_server, seed, status):
    body = {"messages": USER, "seed": seed, "temperature": 1, "max_tokens": 3}
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    if status == 422:
        assert r.json()["error"]["param"] == "seed"


def test_a_vanishing_temperature_decodes_greedily(tiny_server):
    def ask(temperature, path="/v1/chat/completions"):
        body = {"messages": USER, "prompt": "The capital", "temperature": temperature, "max_tokens": 8}
        r = httpx.post(tiny_server.url + path, json=body, timeout=30)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice.get("message", {}).get("content", choice.get("text")), choice["finish_reason"], r.json()["usage"]

    for path in ("/v1/chat/completions", "/v1/completions"):
        greedy = ask(0, path)
        assert greedy[2]["completion_tokens"] > 0
        for tiny in (1e-300, 5e-324, 1e-6):
            assert ask(tiny, path) == greedy, (path, tiny)


def test_concurrent_normal_requests_are_untouched_by_the_guards(guarded):
    codes = []

    def ask():
        codes.append(httpx.post(guarded.url + "/v1/chat/completions", json={"messages": USER}, timeout=30).status_code)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 4
