"""--engine vllm without vLLM: bad input is one clear line, the child server is always stopped, ports are handled,
and the engine's HTTP side (streamed ids, stop token, cancellation, scores, a child dying mid-request) works against a
scripted stand-in for vLLM's server (tests/fake_vllm.py, real HTTP). The faithfulness tests against real vLLM are in
test_generate_vllm_faithful.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import finechat
from finechat.cli import main as cli
from finechat.errors import ConfigError, FinechatError, ModelLoadError
from finechat.generate.engine import last
from finechat.generate.settings import GenerationSettings
from finechat.generate.vllm_engine import VllmChatModel, VllmModel, lora_rank_bucket, vllm_can_load_lora
from finechat.generate.vllm_server import MISSING, PYTHON_ENV, VllmServer, check_port_free, free_port

FAKE = str(Path(__file__).parent / "fake_vllm.py")


def fake(*args: str) -> list[str]:
    return [sys.executable, FAKE, "--port", "{port}", *args]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def gone(pid: int, within: float = 30.0) -> bool:
    """Whether process ``pid`` has ended (or is a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_vllm_not_installed_is_one_line(tiny_folder, monkeypatch, capsys):
    monkeypatch.setenv(PYTHON_ENV, sys.executable)  # finechat's own Python has no vllm
    with pytest.raises(ModelLoadError, match="make vllm"):
        finechat.load(str(tiny_folder), engine="vllm")
    assert cli(["chat", "--model", str(tiny_folder), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "make vllm" in err[-1] and "Traceback" not in "\n".join(err)
    assert MISSING.startswith("vLLM is not installed")


def test_unsupported_inputs_are_refused_by_name_before_starting(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv(PYTHON_ENV, "/nonexistent/python")  # nothing may be started for these
    glm = tmp_path / "glm"
    glm.mkdir()
    (glm / "config.json").write_text(json.dumps({"model_type": "chatglm", "position_encoding_2d": True}))
    with pytest.raises(ModelLoadError, match=r"ChatGLM-6B \(v1, model_type chatglm\) has no vLLM implementation"):
        finechat.load(str(glm), engine="vllm")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="runs Hugging Face folders, not GGUF files"):
        finechat.load(str(gguf), engine="vllm")
    with pytest.raises(ConfigError, match="quantization_bit: not used by the vLLM engine"):
        finechat.load(str(tiny_folder), engine="vllm", quantization_bit=8)
    with pytest.raises(ConfigError, match="compile: not used by the vLLM engine"):
        finechat.load(str(tiny_folder), engine="vllm", compile=True)


def test_adapter_routing_and_lora_ranks():
    assert vllm_can_load_lora({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]})
    assert not vllm_can_load_lora({"peft_type": "LORA", "modules_to_save": ["lm_head"]})
    assert not vllm_can_load_lora({"peft_type": "LORA", "use_dora": True})
    assert not vllm_can_load_lora({"peft_type": "PREFIX_TUNING"})
    assert [lora_rank_bucket(r) for r in (1, 8, 9, 64, 100)] == [8, 8, 16, 64, 128]
    with pytest.raises(ModelLoadError, match="above vLLM's largest"):
        lora_rank_bucket(1024)


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ModelLoadError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free(port)
        with pytest.raises(ModelLoadError, match="is in use"):
            VllmServer("m", command=fake(), port=port).start()
    assert free_port() > 0


def test_child_and_its_group_are_stopped_by_the_context_manager(tmp_path):
    log = tmp_path / "events.jsonl"
    with VllmServer("m", command=fake("--record", str(log), "--grandchild")) as server:
        assert server.alive()
        import httpx

        assert httpx.get(server.url + "/health").status_code == 200
        pids = records(log)[0]
    assert gone(pids["pid"]) and gone(pids["grandchild"])  # vLLM's engine core (a grandchild) goes too
    assert not server.alive()
    server.stop()  # twice is fine


def test_child_that_exits_while_starting_names_the_reason():
    line = "ValueError: Model architectures ['FooForCausalLM'] are not supported for now."
    with pytest.raises(ModelLoadError, match=r"exited with code 1 while starting: .*FooForCausalLM.*not supported"):
        VllmServer("m", command=fake("--exit-at-start", line)).start()


def test_start_timeout_is_bounded_and_stops_the_child(tmp_path):
    log = tmp_path / "events.jsonl"
    server = VllmServer("m", command=fake("--never-healthy", "--record", str(log)), start_timeout=3)
    with pytest.raises(ModelLoadError, match="did not become healthy within 3 s"):
        server.start()
    assert gone(records(log)[0]["pid"])


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_child_never_outlives_finechat(tmp_path, how):
    """finechat killed (even with SIGKILL, where no Python code runs) or terminated: the vLLM child ends too."""
    log = tmp_path / "events.jsonl"
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from finechat.generate.vllm_server import VllmServer
        server = VllmServer("m", command={fake("--record", str(log), "--grandchild")!r}).start()
        print("ready", flush=True)
        time.sleep(600)
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert owner.stdout.readline().strip() == "ready"
        pids = records(log)[0]
        owner.send_signal(how)
        owner.wait(timeout=60)
        assert gone(pids["pid"]), "the vLLM child outlived finechat"
        if how == signal.SIGTERM:  # the whole group is stopped by finechat's handler
            assert gone(pids["grandchild"])
    finally:
        owner.kill()
        for pid in (records(log)[0:1] or [{}])[0].values():
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def engine_on_fake(tiny_folder, *args: str) -> VllmChatModel:
    from transformers import AutoTokenizer

    server = VllmServer(tiny_folder, command=fake(*args)).start()
    model = VllmModel(server, json.loads((tiny_folder / "config.json").read_text()), None, "finechat")
    model.config.max_position_embeddings = 64
    return VllmChatModel(model, AutoTokenizer.from_pretrained(tiny_folder))


def test_streamed_ids_stop_token_settings_and_scores(tiny_folder, tmp_path):
    log = tmp_path / "events.jsonl"
    with engine_on_fake(tiny_folder, "--record", str(log), "--tokens", "40,41,42", "--stop-token", "0") as bot:
        stop = bot.stop_token_ids()
        assert 0 in stop  # the tiny tokenizer's <|endoftext|>: id 0
        settings = GenerationSettings(max_new_tokens=10, greedy=True, seed=7)
        ids = [t for step in bot.generate_ids([1, 2, 3], settings) for t in step]
        assert ids == [40, 41, 42, 0]  # vLLM's stop (not listed in its ids) handed on, as the PyTorch engine ends
        body = records(log)[1]["request"]
        assert body["prompt"] == [1, 2, 3] and body["temperature"] == 0.0 and body["seed"] == 7
        assert body["stop_token_ids"] == stop and body["max_tokens"] == 10 and body["stream"] is True
        stats: dict = {}
        text = last(bot.stream_text([{"role": "user", "content": "hi"}], stats=stats, greedy=True))
        assert text == bot.tokenizer.decode([40, 41, 42], skip_special_tokens=True).strip()
        assert stats["finish_reason"] == "stop" and stats["completion_tokens"] == 4
        sampled = bot.request_body([1], GenerationSettings(temperature=0.5, top_p=0.8, top_k=3))
        assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.5, 0.8, 3)
        scores = bot.score_batch([[1, 2, 3], [4, 5]], [1, 1])
        assert [[s.token for s in row] for row in scores] == [[2, 3], [5]]
        assert all(s.logprob == -1.0 and s.greedy for row in scores for s in row)
        first = bot.scorer(top_n=1).extend([7, 8])
        assert first[0].logprob is None and first[1].top == [(8, -1.0)]
        with pytest.raises(FinechatError, match="the model's context holds 64"):
            list(bot.generate_ids(list(range(70)), settings))


def test_closing_the_stream_cancels_the_request(tiny_folder, tmp_path):
    log = tmp_path / "events.jsonl"
    tokens = ",".join(str(40 + i % 50) for i in range(400))
    with engine_on_fake(tiny_folder, "--record", str(log), "--tokens", tokens, "--delay", "0.02") as bot:
        stream = bot.generate_ids([1, 2], GenerationSettings(max_new_tokens=400))
        assert next(stream) == [40]
        stream.close()
        deadline = time.monotonic() + 30
        while not any(r.get("cancelled") for r in records(log)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(r.get("cancelled") for r in records(log)), "vLLM kept generating for a closed stream"


def test_vllm_dying_mid_request_is_one_line_and_503_over_http(tiny_folder):
    from serve_helpers import LiveServer

    from finechat.serve.api import create_app

    bot = engine_on_fake(tiny_folder, "--die-after", "2")
    try:
        with pytest.raises(FinechatError, match=r"the vLLM server stopped \(exit code 3\)"):
            list(bot.generate_ids([1, 2], GenerationSettings(max_new_tokens=8)))
        import openai

        live = LiveServer(create_app(bot))
        try:
            client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user", "content": "hi"}])
            assert caught.value.status_code == 503 and "vLLM server stopped" in caught.value.message
        finally:
            live.stop()
    finally:
        bot.close()
