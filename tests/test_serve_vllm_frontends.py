"""The front ends on --engine vllm, always run: ``finechat serve --engine vllm`` (tools over the openai client, the web
page in a headless Chromium, ChatGLM's ``POST /``), the medical retrieval and ``finechat medical eval --engine vllm``,
and the bad input of issue 32 at the command line, against tests/fake_vllm.py started by finechat's real start-up
path (``$FINECHAT_VLLM_PYTHON``, ``python -m vllm.entrypoints.openai.api_server``). The fake answers a scripted text
per prompt; each reply is compared with the PyTorch engine's server given the same text (the scripted double), so
only vLLM's side is scripted. The same front ends on real vLLM: test_serve_vllm_frontends_real.py."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from fake_vllm import install
from serve_helpers import CHROMIUM, LiveServer, ScriptedChat, chromium_page, healthy, wait_until
from test_generate_vllm_engine import gone, records

import finechat
from finechat.cli import main as cli
from finechat.errors import FinechatError, ModelLoadError
from finechat.medical.retrieval import NOTICE, DiseaseTable, attach_medical
from finechat.serve.api import create_app
from finechat.serve.schemas import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
DISEASES = ROOT / "data" / "samples" / "medical" / "diseases.csv"
TOOLS = [{"type": "function", "function": {"name": "add_numbers", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "number"}, "b": {"type": "number"}}}}}]
CALL = '<tool_call>{"name": "add_numbers", "arguments": {"a": 1, "b": 2}}</tool_call>'
PLAIN = "Paris is the capital of France."
DOCTOR = "建议到泌尿外科就诊。"
ANSWERS = {"add_numbers": CALL, "尿": DOCTOR, "": PLAIN}  # the first key found in the prompt picks the answer


def script(prompt: str) -> str:
    return next((a for key, a in ANSWERS.items() if key and key in prompt), ANSWERS[""])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory):
    """finechat's environment with the fake vLLM where vLLM is looked for, and its script."""
    folder = tmp_path_factory.mktemp("fakevllm")
    return {"FINECHAT_VLLM_PYTHON": install(folder), "FAKE_VLLM_ANSWERS": json.dumps(ANSWERS),
            "FAKE_VLLM_RECORD": str(folder / "events.jsonl"), "FAKE_VLLM_MAX_LEN": "2048", "FAKE_VLLM_DELAY": "0.005"}


@pytest.fixture()
def use_fake(fake_env, monkeypatch, tmp_path):
    """The fake for an in-process load, recording to a file of this test's own."""
    for key, value in {**fake_env, "FAKE_VLLM_RECORD": str(tmp_path / "events.jsonl")}.items():
        monkeypatch.setenv(key, value)
    return tmp_path / "events.jsonl"


@pytest.fixture(scope="module")
def served(tiny_folder, fake_env):
    """``finechat serve --engine vllm`` as a user runs it; at the end it gets Ctrl-C and its vLLM child must go."""
    import re

    env = {**os.environ, **fake_env}
    process = subprocess.Popen([sys.executable, "-m", "finechat", "serve", "--engine", "vllm", "--model",
                                str(tiny_folder), "--port", "0", "--model-name", "tiny"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = process.stdout.readline()
    match = re.search(r"OpenAI API at (http://127\.0\.0\.1:\d+)/v1", line)
    try:
        assert match and wait_until(lambda: healthy(match.group(1)), timeout=60), f"serve did not come up: {line!r}"
        yield match.group(1), Path(fake_env["FAKE_VLLM_RECORD"])
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        process.wait(timeout=60)
    child = records(Path(fake_env["FAKE_VLLM_RECORD"]))[0]["pid"]
    assert gone(child), "the vLLM child outlived finechat serve"


@pytest.fixture(scope="module")
def torch_served(tiny_folder):
    """The PyTorch engine's server giving the same texts (the scripted double): the reference for each reply."""
    from transformers import AutoTokenizer

    bot = ScriptedChat(AutoTokenizer.from_pretrained(tiny_folder), script, template=None)
    live = LiveServer(create_app(bot, ServeSettings(model_name="tiny")))
    yield live.url, bot
    live.stop()


def prompts(log: Path) -> list[list[int]]:
    return [r["request"]["prompt"] for r in records(log) if "request" in r]


def test_tools_through_serve_engine_vllm_equal_the_pytorch_engine(served, torch_served):
    (url, log), (torch_url, bot) = served, torch_served
    messages = [{"role": "user", "content": "What is 1 plus 2?"}]
    replies = []
    for base in (url, torch_url):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0,
                                                     stream=True))
        calls = [tc.function for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        replies.append((reply.choices[0].message.content, reply.choices[0].finish_reason,
                        [(c.function.name, json.loads(c.function.arguments)) for c in reply.choices[0].message.tool_calls],
                        [(c.name, json.loads(c.arguments)) for c in calls], chunks[-1].choices[0].finish_reason))
    assert replies[0] == replies[1] == (None, "tool_calls", [("add_numbers", {"a": 1, "b": 2})],
                                        [("add_numbers", {"a": 1, "b": 2})], "tool_calls")
    assert prompts(log)[-1] == bot.prompts[-1]  # vLLM got finechat's prompt (the tool section included), as ids
    assert "add_numbers" in bot.tokenizer.decode(bot.prompts[-1])


def test_glm_api_with_history_through_serve_engine_vllm(served, torch_served):
    (url, log), (torch_url, bot) = served, torch_served
    body = {"prompt": "And of Germany?", "history": [["What is the capital of France?", "Paris."]],
            "temperature": 0.01, "max_length": 512}
    replies = [httpx.post(base + "/", json=body, timeout=60).json() for base in (url, torch_url)]
    assert replies[0]["status"] == 200 and replies[0]["response"] == replies[1]["response"] == PLAIN
    assert replies[0]["history"] == replies[1]["history"] == [*body["history"], ["And of Germany?", PLAIN]]
    assert prompts(log)[-1] == bot.prompts[-1]  # the history went into the prompt as on the PyTorch engine


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (install Debian's chromium)")
def test_web_page_answers_on_serve_engine_vllm(served):
    url, _ = served
    with chromium_page(url + "/") as page:
        page.fill("#input", "What is the capital of France?")
        page.press("#input", "Enter")
        page.wait_for_function("() => !document.querySelector('#send').disabled && "
                               "document.querySelectorAll('.msg.assistant').length === 1", timeout=30000)
        assert page.locator(".msg.assistant .body").inner_text().strip() == PLAIN
        assert page.locator(".msg.assistant .error").count() == 0


def test_medical_retrieval_and_medical_eval_on_engine_vllm(tiny_folder, use_fake, capsys, tmp_path):
    from transformers import AutoTokenizer

    question = "我尿频、尿急、尿痛"
    table = DiseaseTable.load(DISEASES)
    reference = attach_medical(ScriptedChat(AutoTokenizer.from_pretrained(tiny_folder), script, template=None), table)
    expected, _ = reference.chat(question, [])
    with finechat.load(str(tiny_folder), engine="vllm") as bot:
        answer, history = attach_medical(bot, table).chat(question, [])
    assert answer == expected and answer.startswith(DOCTOR) and answer.endswith(NOTICE)
    assert "参考来源" in answer and "尿路感染" in answer  # the retrieved record is cited
    assert history == [(question, DOCTOR)]  # the history keeps the plain answer
    assert prompts(use_fake)[-1] == reference.prompts[-1] and "尿路感染" in reference.tokenizer.decode(
        reference.prompts[-1])  # the records went into vLLM's prompt

    questions = tmp_path / "kg.jsonl"
    questions.write_text("".join(json.dumps({"instruction": q, "input": "", "output": DOCTOR, "answers": ["泌尿外科"],
                                             "relation": "department"}, ensure_ascii=False) + "\n"
                                 for q in ("尿路感染看什么科？", "尿频挂哪个科？")), encoding="utf-8")
    before = len(prompts(use_fake))
    assert cli(["medical", "eval", "--engine", "vllm", "--model", str(tiny_folder), "--questions", str(questions),
                "--batch-size", "2"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.split("|")[2].strip() == "100.00"  # kg-acc: both answers name the department
    assert len(prompts(use_fake)) == before + 2  # the questions were answered by vLLM, not the PyTorch engine


# -- bad input at the command line ------------------------------------------------------------------------------
def test_vllm_refusing_the_model_at_start_is_one_line_from_serve(tiny_folder, use_fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_EXIT_AT_START", "ValueError: Model architectures ['FooForCausalLM'] are not "
                                                  "supported for now.")
    assert cli(["serve", "--engine", "vllm", "--model", str(tiny_folder), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "exited with code 1 while starting" in err[-1] and "FooForCausalLM" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_adapters_vllm_cannot_load_are_one_line(tiny_folder, use_fake, monkeypatch, tmp_path):
    prefix = tmp_path / "ptuning"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}))
    with pytest.raises(ModelLoadError, match="prefix / prompt tuning .* vLLM has no support for it"):
        finechat.load(str(tiny_folder), adapter=str(prefix), engine="vllm")
    with pytest.raises(ModelLoadError, match="adapter folder not found"):
        finechat.load(str(tiny_folder), adapter=str(tmp_path / "missing"), engine="vllm")
    assert not use_fake.exists()  # refused before anything started

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                          "target_modules": ["q_proj"]}))
    reason = "ValueError: While loading finechat-adapter, expected target modules in ['qkv_proj'] but received ['foo']"
    monkeypatch.setenv("FAKE_VLLM_EXIT_AT_START", reason)
    with pytest.raises(ModelLoadError, match=r"exited with code 1 while starting: ValueError: While loading "
                                             r"finechat-adapter"):
        finechat.load(str(tiny_folder), adapter=str(lora), engine="vllm")
    argv = records(use_fake)[0]["argv"]  # vLLM was asked to load it with its own LoRA support
    assert "--enable-lora" in argv and f"finechat-adapter={lora.resolve()}" in argv


def test_vllm_dying_mid_stream_ends_the_stream_with_an_error(tiny_folder, use_fake, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "2")
    with finechat.load(str(tiny_folder), engine="vllm") as bot:
        live = LiveServer(create_app(bot))
        try:
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
            events = []
            with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as response:
                assert response.status_code == 200
                events = [line for line in response.iter_lines() if line.startswith("data: ")]
            chunks = [json.loads(e[6:]) for e in events[:-1]]
            assert events[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "error"
            shown = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert "the vLLM server stopped (exit code 3)" in shown
            # the next request, with vLLM gone: the OpenAI error shape, a 503, at once
            r = httpx.post(live.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
            assert r.status_code == 503 and "vLLM server stopped" in r.json()["error"]["message"]
        finally:
            live.stop()
        with pytest.raises(FinechatError, match="vLLM server stopped"):  # and one line in the terminal chat
            bot.chat("hi", [])


def test_vllm_dying_in_the_terminal_chat_is_one_line(tiny_folder, use_fake, monkeypatch, capsys):
    import io

    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "2")
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nAnd of Germany?\n"))
    assert cli(["chat", "--engine", "vllm", "--model", str(tiny_folder), "--greedy"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("finechat chat: error: the vLLM server stopped (exit code 3)")
    assert "Traceback" not in captured.err and captured.out.startswith(PLAIN[:2])  # what came before it is shown
