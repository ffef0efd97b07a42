"""--engine llama.cpp: a GGUF run by llama-cpp-python behind ChatModel gives the PyTorch engine's greedy answers,
keeps history, stops at the end of turn, repeats with a seed, cancels, and serves the OpenAI API and the eval."""

import threading

import openai
import pytest
from serve_helpers import LiveServer

import finechat
from finechat.cli import main as cli
from finechat.errors import ConfigError, ModelLoadError
from finechat.generate.engine import GenerationSettings
from finechat.generate.llamacpp import MISSING

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA_CPP = True
except ImportError:
    HAVE_LLAMA_CPP = False
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=MISSING)

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama with prompt-dependent greedy answers, and its f32 GGUF (no rounding between the engines)."""
    from tiny import save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp("wide"), initializer_range=0.3)
    out = folder.parent / "tiny-f32.gguf"
    assert cli(["export", "--to", "gguf", "--model", str(folder), "--out", str(out), "--outtype", "f32"]) == 0
    return folder, out


@pytest.fixture(scope="module")
def engines(exported):
    folder, gguf_path = exported
    return finechat.load(str(folder)), finechat.load(str(gguf_path), engine="llama.cpp", n_threads=1)


def test_bad_engine_inputs_are_clear_errors(exported, tmp_path):
    folder, gguf_path = exported
    with pytest.raises(ConfigError, match="unknown engine 'tensorrt'; choose from torch, llama.cpp, vllm"):
        finechat.load(str(gguf_path), engine="tensorrt")
    with pytest.raises(ConfigError, match="quantization_bit: not used by the llama.cpp engine"):
        finechat.load(str(gguf_path), engine="llama.cpp", quantization_bit=8)
    with pytest.raises(ModelLoadError, match="export --to gguf"):  # a Hugging Face folder: convert it first
        finechat.load(str(folder), engine="llama.cpp")
    with pytest.raises(ModelLoadError, match="merge the adapter into it first"):
        finechat.load(str(gguf_path), adapter=str(tmp_path), engine="llama.cpp")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_path.read_bytes()[:3000])
    with pytest.raises(Exception, match="truncated or damaged GGUF file"):
        finechat.load(str(cut), engine="llama.cpp")


def test_threads_follow_the_busy_cpu_rule(monkeypatch):
    import os

    from finechat.generate.llamacpp import llama_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert llama_threads() == 1  # the user's choice wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))
    assert llama_threads() == (1 if cores > 1 else cores)  # a busy CPU: one thread
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert llama_threads() == cores  # an idle one: every core


@pytest.mark.skipif(HAVE_LLAMA_CPP, reason="llama-cpp-python is installed")
def test_missing_llama_cpp_names_the_extra(exported):
    with pytest.raises(ModelLoadError, match=r"finechat\[llamacpp\]"):
        finechat.load(str(exported[1]), engine="llama.cpp")


@needs_llama_cpp
def test_greedy_answers_and_history_match_the_torch_engine(engines):
    torch_bot, cpp_bot = engines
    history = []
    for query in (QUESTION, "你好", "Write a short poem about the sea."):
        want, want_history = torch_bot.chat(query, history, greedy=True, max_new_tokens=16)
        got, got_history = cpp_bot.chat(query, history, greedy=True, max_new_tokens=16)
        assert got == want and got_history == want_history  # turn 2 and 3 reuse llama.cpp's cached prefix
        history = got_history
    partials = [p for p, _ in cpp_bot.stream_chat(QUESTION, [], greedy=True, max_new_tokens=16)]
    assert len(partials) > 1 and partials[-1] == cpp_bot.chat(QUESTION, [], greedy=True, max_new_tokens=16)[0]


@needs_llama_cpp
def test_stops_at_the_end_of_turn_token(engines, monkeypatch):
    _, bot = engines
    im_end = bot.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in bot.stop_token_ids()  # named by the GGUF's tokenizer.ggml.eot_token_id
    prompt = bot.encode_prompt(bot.build_prompt([{"role": "user", "content": QUESTION}]))
    free = [t[0] for t in bot.generate_ids(prompt, GenerationSettings(greedy=True, max_new_tokens=8))]
    # pretend the third greedy token ends the turn: the answer ends before it, reason "stop"
    monkeypatch.setattr(bot, "stop_token_ids", lambda: [free[2]])
    stats = {}
    text = list(bot.stream_text([{"role": "user", "content": QUESTION}], stats=stats, greedy=True,
                                max_new_tokens=8))[-1]
    assert stats == {"prompt_tokens": len(prompt), "completion_tokens": 3, "finish_reason": "stop"}
    assert text == bot.postprocess(bot.tokenizer.decode(free[:2], skip_special_tokens=True))


@needs_llama_cpp
def test_seeded_sampling_repeats_and_seeds_differ(engines):
    _, bot = engines
    sample = dict(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=12)
    first = bot.chat(QUESTION, [], seed=7, **sample)[0]
    assert bot.chat(QUESTION, [], seed=7, **sample)[0] == first
    assert len({bot.chat(QUESTION, [], seed=s, **sample)[0] for s in (1, 2, 3)} | {first}) > 1


@needs_llama_cpp
def test_closing_the_iterator_stops_llama_cpp(engines):
    _, bot = engines
    llm = bot.model.llm
    prompt = bot.encode_prompt(bot.build_prompt([{"role": "user", "content": QUESTION}]))
    tokens = bot.generate_ids(prompt, GenerationSettings(greedy=True, max_new_tokens=50))
    got = [next(tokens)[0], next(tokens)[0]]
    tokens.close()
    assert llm.n_tokens <= len(prompt) + 2  # nothing was computed after the consumer left
    again = [t[0] for t in bot.generate_ids(prompt, GenerationSettings(greedy=True, max_new_tokens=2))]
    assert again == got and bot.lock.acquire(blocking=False)  # the lock was released
    bot.lock.release()


@needs_llama_cpp
def test_a_setting_without_an_exact_equivalent_is_said_once(engines, capsys):
    _, bot = engines
    for _ in range(2):
        bot.chat(QUESTION, [], do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2, max_new_tokens=4)
    err = capsys.readouterr().err
    assert err.count("applies top_p before the temperature") == 1
    assert err.count("counts the answer's tokens only") == 1


@needs_llama_cpp
def test_openai_server_streams_and_serves_concurrent_requests(engines):
    from finechat.serve.api import ServeSettings, create_app

    torch_bot, bot = engines
    server = LiveServer(create_app(bot, ServeSettings(model_name="tiny-gguf")))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": QUESTION}]
        want = torch_bot.chat(QUESTION, [], greedy=True, max_new_tokens=12)[0]
        reply = client.chat.completions.create(model="tiny-gguf", messages=messages, temperature=0, max_tokens=12)
        assert reply.choices[0].message.content == want
        chunks = client.chat.completions.create(model="tiny-gguf", messages=messages, temperature=0, max_tokens=12,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        answers = [None] * 3

        def ask(i):
            answers[i] = client.chat.completions.create(model="tiny-gguf", messages=messages, temperature=0,
                                                        max_tokens=12).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert answers == [want] * 3
    finally:
        server.stop()


@needs_llama_cpp
def test_eval_runs_on_the_llama_cpp_engine(engines):
    from finechat.eval.predict import EvalExample, predict

    torch_bot, bot = engines
    examples = [EvalExample(messages=[{"role": "user", "content": q}], label="Paris")
                for q in (QUESTION, "你好")]
    settings = GenerationSettings(greedy=True, max_new_tokens=10)
    metrics, records = predict(bot, examples, settings=settings, progress=False)
    want, _ = predict(torch_bot, examples, settings=settings, progress=False, with_loss=False)
    assert [r["predict"] for r in records] == [torch_bot.chat(e.query, [], greedy=True, max_new_tokens=10)[0]
                                               for e in examples]
    assert metrics["eval_loss"] is None and set(want) <= set(metrics)


@needs_llama_cpp
def test_bench_adds_llama_cpp_rows(exported, capsys):
    folder, _ = exported
    assert cli(["bench", "--model", str(folder), "--engine", "llama.cpp", "--precisions", "fp32",
                "--gguf-types", "f32,q8_0", "--new-tokens", "6", "--prompt-tokens", "12", "--rounds", "1",
                "--ppl-tokens", "300", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith("llama.cpp") else ""): line.split()
            for line in table.splitlines() if line.startswith(("fp32 ", "llama.cpp f", "llama.cpp q"))}
    assert set(rows) == {"fp32", "llama.cpp f32", "llama.cpp q8_0"}
    assert "x bare" in table and "bare llama.cpp tok/s" in table
    assert rows["llama.cpp f32"][-4] == "yes"  # f32 llama.cpp greedy = transformers' generate in fp32


def test_bench_engine_llama_cpp_needs_it_or_fp32(exported, capsys):
    args = ["bench", "--model", str(exported[0]), "--engine", "llama.cpp", "--precisions", "int8"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert ("keep fp32 in --precisions" in err) if HAVE_LLAMA_CPP else ("finechat[llamacpp]" in err)
