"""``finechat serve`` / ``finechat web`` as a user runs them: a real process on 127.0.0.1."""

import os
import subprocess
import sys

import httpx
import pytest
from serve_helpers import start_cli_server

from finechat.cli import main


def test_web_prints_the_address_and_serves_with_the_env_key(tiny_model_dir, tmp_path):
    env = {**os.environ, "FINECHAT_API_KEY": "from-env", "OMP_NUM_THREADS": "1"}
    process, url = start_cli_server(["web", "--model", str(tiny_model_dir), "--port", "0"],
                                    r"open (http://127\.0\.0\.1:\d+)/ in a browser", env)
    try:
        assert "<title>finechat</title>" in httpx.get(url + "/").text
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        ok = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200 and ok.json()["model"] == tiny_model_dir.name
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_warns_when_listening_beyond_loopback_without_a_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FINECHAT_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "finechat", "serve", "--host", "0.0.0.0", "--model",
                             str(tmp_path / "missing")], capture_output=True, text=True, env=env, timeout=120)
    assert "WARNING: listening on 0.0.0.0 with no API key" in result.stderr
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_chat_and_serve_check_tools_and_knowledge_before_loading_the_model(command, tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")
    assert main([command, "--model", missing_model, "--tools", "calculator,no_such_tool"]) == 2
    assert "no_such_tool" in capsys.readouterr().err
    table = tmp_path / "no-table.csv"
    assert main([command, "--model", missing_model, "--knowledge", str(table)]) == 3
    assert str(table) in capsys.readouterr().err


def test_serve_reads_the_api_key_from_a_file_kept_out_of_ps(tiny_model_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env = {k: v for k, v in os.environ.items() if k != "FINECHAT_API_KEY"} | {"OMP_NUM_THREADS": "1"}
    process, url = start_cli_server(["serve", "--model", str(tiny_model_dir), "--port", "0", "--api-key-file",
                                     str(key_file)], r"OpenAI API at (http://127\.0\.0\.1:\d+)/v1 \(API key required\)", env)
    try:
        assert b"from-file" not in open(f"/proc/{process.pid}/cmdline", "rb").read()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        ok = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer from-file"})
        assert ok.status_code == 200
        # the Host names it was bound for, and no others
        assert httpx.get(url + "/health", headers={"Host": "rebound.example"}).status_code == 421
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("key_text,extra,message", [
    (None, [], "cannot read the API key file"),
    ("", [], "must hold the key on one line"),
    ("one\ntwo\n", [], "must hold the key on one line"),
    ("k\n", ["--api-key", "k"], "not both"),
])
def test_bad_api_key_sources_fail_before_loading_the_model(tmp_path, capsys, key_text, extra, message):
    key_file = tmp_path / "key"
    if key_text is not None:
        key_file.write_text(key_text)
    code = main(["serve", "--model", str(tmp_path / "no-model"), "--api-key-file", str(key_file), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "no-model" not in err
    if "read" in message or "line" in message:
        assert str(key_file) in err


def test_a_taken_port_fails_before_loading_the_model(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in ("serve", "web"):
            assert main([command, "--model", str(tmp_path / "no-model"), "--port", str(port)]) == 2
            captured = capsys.readouterr()
            assert f"port {port} on 127.0.0.1 is taken by another program" in captured.err
            assert "no-model" not in captured.err and "http://" not in captured.out  # no model, no URL
