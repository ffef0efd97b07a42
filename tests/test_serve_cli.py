"""``finechat serve`` / ``finechat web`` as a user runs them: a real process on 127.0.0.1."""

import os
import re
import subprocess
import sys

import httpx
import pytest
from serve_helpers import wait_until

from finechat.cli import main


def test_web_prints_the_address_and_serves_with_the_env_key(tiny_model_dir, tmp_path):
    env = {**os.environ, "FINECHAT_API_KEY": "from-env", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "finechat", "web", "--model", str(tiny_model_dir), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = process.stdout.readline()
        match = re.search(r"open (http://127\.0\.0\.1:\d+)/ in a browser", line)
        assert match, line
        url = match.group(1)

        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=60)
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
