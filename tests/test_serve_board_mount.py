"""`finechat serve --board`: the board's page and API under /board on the serve's own address (real servers on
127.0.0.1), behind the same API key and Host / content-type guards; the chat page links to it only then."""

import os
import shutil

import httpx
from serve_helpers import LiveServer, start_cli_server, wait_until

from finechat.serve.api import create_app


def test_without_board_nothing_is_mounted(tiny_bot):
    srv = LiveServer(create_app(tiny_bot))
    try:
        page = httpx.get(srv.url + "/", timeout=10)
        assert page.status_code == 200 and "<!-- page links -->" in page.text
        assert 'href="board/"' not in page.text and "board-link" not in page.text
        for path in ("/board/", "/board/api/info", "/board/api/jobs"):
            r = httpx.get(srv.url + path, timeout=10, follow_redirects=True)
            assert r.status_code == 404, (path, r.text)
    finally:
        srv.stop()


def test_serve_board_mounts_the_board_under_the_same_guards(tmp_path, tiny_model_dir):
    workspace = tmp_path / "ws"
    shutil.copytree(tiny_model_dir, workspace / "models" / "tiny")
    env = {**os.environ, "FINECHAT_API_KEY": "s3cret", "FINECHAT_HOME": str(tmp_path / "home")}
    process, url = start_cli_server(["serve", "--model", str(tiny_model_dir), "--port", "0", "--board",
                                     "--workspace", str(workspace)], r"OpenAI API at (http://127\.0\.0\.1:\d+)/v1", env)
    key = {"Authorization": "Bearer s3cret"}
    http = httpx.Client(base_url=url, timeout=60)
    try:
        page = http.get("/")  # the chat page shows the Board link
        assert page.status_code == 200 and '<a class="view-link" id="board-link" href="board/">Board</a>' in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        redirect = http.get("/board")  # relative links of the board page need the slash
        assert redirect.status_code in (307, 308) and redirect.headers["location"].endswith("/board/")
        board_page = http.get("/board/")
        assert board_page.status_code == 200 and "finechat board" in board_page.text
        assert 'href="static/board.css"' in board_page.text
        assert "frame-ancestors 'self'" in board_page.headers["content-security-policy"]
        assert http.get("/board/static/board.js").status_code == 200
        # the board's API answers under /board, with the serve's API key
        info = http.get("/board/api/info", headers=key)
        assert info.status_code == 200 and info.json()["workspace"] == str(workspace.resolve())
        assert "models/tiny" in info.json()["models"]
        for method, path in [("GET", "/board/api/info"), ("GET", "/board/api/jobs"), ("POST", "/board/api/upload"),
                             ("POST", "/board/api/train/start"), ("POST", "/board/chat/v1/models")]:
            r = http.request(method, path, json={} if method == "POST" else None)
            assert r.status_code == 401, (path, r.text)
            wrong = http.request(method, path, json={} if method == "POST" else None,
                                 headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, (path, wrong.text)
        # the Host and content-type guards stand in front of the board's routes too
        r = http.get("/board/api/info", headers={**key, "Host": "evil.example"})
        assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed"
        r = http.post("/board/api/upload", headers={**key, "Content-Type": "text/plain"},
                      content='{"name": "a.json", "content": "[]"}')
        assert r.status_code == 415
        assert not (workspace / "data" / "a.json").exists()
        up = http.post("/board/api/upload", headers=key, json={"name": "a.json", "content": '[{"instruction": "q", '
                                                                                          '"output": "a"}]'})
        assert up.status_code == 200 and (workspace / "data" / "a.json").is_file()
        # the board's own bad-input answers: a 4xx naming the field
        r = http.post("/board/api/data/analyse", headers=key, json={"path": "../secret.json"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "path"
        # the serve's own API is unchanged beside it
        assert http.get("/v1/models", headers=key).status_code == 200
        assert http.get("/v1/models").status_code == 401
        # the Chat tab's proxy: a `finechat serve` child on a workspace model, reached under /board/chat/
        r = http.post("/board/api/chat/start", headers=key, json={"model": "models/tiny"})
        assert r.status_code == 200, r.text

        def ready():
            s = http.get("/board/api/chat/status", headers=key).json()
            assert s["state"] != "failed", s
            return s["state"] == "ready"

        assert wait_until(ready, timeout=120)
        models = http.get("/board/chat/v1/models", headers=key)
        assert models.status_code == 200 and models.json()["object"] == "list"
        answer = http.post("/board/chat/v1/chat/completions", headers=key,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["role"] == "assistant"
        assert http.post("/board/api/chat/stop", headers=key, json={}).json()["state"] == "off"
    finally:
        http.close()
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode in (0, -15)
    assert not (tmp_path / "home" / "board").exists()  # --workspace was used, not the default


def test_workspace_needs_board(tmp_path, tiny_model_dir, capsys):
    from finechat.cli import main

    code = main(["serve", "--model", str(tiny_model_dir), "--workspace", str(tmp_path / "ws")])
    assert code == 2 and "--board" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()
