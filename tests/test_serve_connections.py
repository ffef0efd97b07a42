"""Slow and numerous clients, floods of errors and SIGTERM: the server stays up, bounded and clean."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer, ScriptedChat, healthy, wait_until

import finechat
from finechat.commands.serve import free_port
from finechat.serve.api import create_app
from finechat.serve.server import ConnectionLimits, RateLimit

HERE = Path(__file__).parent
USER = [{"role": "user", "content": "hi"}]


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (reading whatever it sends)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture()
def quick_server(tiny_bot):
    srv = LiveServer(create_app(ScriptedChat(tiny_bot.tokenizer, "fine")),
                     ConnectionLimits(request_timeout=0.5, max_connections=4))
    yield srv
    srv.stop()


def test_connections_that_never_finish_their_request_are_closed(quick_server):
    port = quick_server.port
    silent = socket.create_connection(("127.0.0.1", port))
    half_headers = socket.create_connection(("127.0.0.1", port))
    half_headers.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    half_body = socket.create_connection(("127.0.0.1", port))
    half_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"messages\": ")
    for sock in (silent, half_headers, half_body):
        assert closed_by_server(sock, within=20)
        sock.close()
    # a client that keeps sending a byte now and then is held to the same deadline
    drip = socket.create_connection(("127.0.0.1", port))
    start = time.monotonic()
    with pytest.raises(OSError):
        for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 10_000:
            drip.send(bytes([byte]))
            time.sleep(0.05)
    assert time.monotonic() - start < 20  # 10,000 bytes at 50 ms would take 500 s
    drip.close()
    assert httpx.get(quick_server.url + "/health", timeout=30).status_code == 200


def test_open_connections_are_capped_idle_ones_closed_first(tiny_bot):
    srv = LiveServer(create_app(ScriptedChat(tiny_bot.tokenizer, "fine")),
                     ConnectionLimits(request_timeout=600, max_connections=4))
    idle = []
    try:
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # never finished
            idle.append(sock)
        connections = srv.server.server_state.connections
        assert wait_until(lambda: len(connections) <= 4, timeout=10), len(connections)
        # a real client still gets through: it takes the place of the longest-waiting idle connection
        with httpx.Client(timeout=30) as client:
            for _ in range(3):
                assert client.get(srv.url + "/health").status_code == 200
        assert closed_by_server(idle[0], within=10)
        assert len(connections) <= 4
    finally:
        for sock in idle:
            sock.close()
        srv.stop()


def test_rate_limit_lets_a_few_of_the_same_error_through_per_second():
    now = [100.0]
    limit = RateLimit(per_second=3, clock=lambda: now[0])

    def record(msg="accept failed: %s", level=logging.ERROR):
        return logging.LogRecord("asyncio", level, __file__, 1, msg, ("EMFILE",), None)

    assert [limit.filter(record()) for _ in range(10)] == [True] * 3 + [False] * 7
    assert limit.filter(record("another error %s"))  # a different message has its own budget
    assert all(limit.filter(record(level=logging.INFO)) for _ in range(10))  # info (access lines) untouched
    now[0] += 1.5
    shown = record()
    assert limit.filter(shown) and shown.getMessage() == "accept failed: EMFILE [7 more like this held back]"
    assert limit.filter(record()) and limit.filter(record()) and not limit.filter(record())


def test_access_lines_are_rate_limited_too():
    now = [0.0]
    limit = RateLimit(per_second=3, clock=lambda: now[0], info_per_second=20)

    def access(path):
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5", "GET", path, "1.1", 408), None)

    assert sum(limit.filter(access(f"/{i}")) for i in range(1000)) == 20  # one template: one budget
    now[0] += 1.0
    shown = access("/next")
    assert limit.filter(shown) and shown.getMessage().endswith("[980 more like this held back]")


def test_a_flood_of_bad_requests_logs_a_few_lines_per_second(quick_server):
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        start = time.monotonic()
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", quick_server.port)) as sock:
                sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                closed_by_server(sock, within=10)
        elapsed = time.monotonic() - start
    finally:
        logger.removeHandler(handler)
    invalid = [m for m in seen if m.startswith("Invalid HTTP request")]
    assert 1 <= len(invalid) <= 5 * (elapsed + 2), (len(invalid), elapsed)


def test_sigterm_ends_running_requests_cleanly():
    port = free_port("127.0.0.1")
    env = {**os.environ, "PYTHONPATH": str(Path(finechat.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(HERE / "serve_process.py"), str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        assert wait_until(lambda: healthy(url), timeout=120)
        body = {"messages": USER, "max_tokens": 400}  # 400 tokens at 50 ms: 20 s, past the 3 s shutdown timeout

        def stream():
            with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
                results["stream"] = [line for line in r.iter_lines() if line]

        def whole():
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            results["whole"] = (r.status_code, r.headers.get("content-type"), r.text)

        threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
        for t in threads:
            t.start()
        assert wait_until(lambda: httpx.get(url + "/health", timeout=5).json()["active"] == 2, timeout=30)
        process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
    finally:
        if process.poll() is None:
            process.kill()
        log = process.communicate()[1]
    status, content_type, text = results["whole"]
    assert status == 503 and content_type == "application/json", (status, text, log)
    assert json.loads(text)["error"]["code"] == "shutting_down"
    lines = results["stream"]
    assert lines[-1] == "data: [DONE]", (lines[-3:], log)
    last = json.loads(lines[-2][len("data: "):])["choices"][0]
    assert last["finish_reason"] == "error"
    assert any("shutting down" in json.loads(line[6:])["choices"][0]["delta"].get("content", "")
               for line in lines[1:-1])
    assert "Traceback" not in log and "Cancel" not in log, log
