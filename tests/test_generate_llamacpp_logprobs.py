"""Log-probabilities on the llama.cpp engine: the server's echo / logprobs and lm-eval (finechat eval --tasks
--engine llama.cpp) give the PyTorch engine's numbers on the GGUF export of the same model."""

import json
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import LiveServer

import finechat
from finechat.cli import main as cli
from finechat.generate.engine import GenerationSettings
from finechat.generate.llamacpp import MISSING
from finechat.serve.api import ServeSettings, create_app

pytest.importorskip("llama_cpp", reason=MISSING)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "data" / "tasks" / "finechat_mc"
PROMPTS = ["The capital of France is Paris.", "你好，世界！ What is 2 + 2?"]
# f32 GGUF: llama.cpp's float32 kernels (the scoring context keeps an f32 KV cache) against PyTorch's: measured
# 7.6e-6. f16 GGUF: the weights are rounded to half precision: measured up to 1.2e-2 on this model.
TOLERANCE = {"f32": 1e-4, "f16": 2e-2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("wide"), initializer_range=0.3)  # peaked, prompt-dependent


def export(folder, outtype):
    out = folder.parent / f"tiny-{outtype}.gguf"
    if not out.exists():
        assert cli(["export", "--to", "gguf", "--model", str(folder), "--out", str(out), "--outtype", outtype]) == 0
    return out


@pytest.fixture(scope="module")
def servers(folder):
    """The PyTorch engine on the folder, the llama.cpp engine on its f32 and f16 exports, each served."""
    bots = {"torch": finechat.load(str(folder))}
    for outtype in TOLERANCE:
        bots[outtype] = finechat.load(str(export(folder, outtype)), engine="llama.cpp", n_threads=1)
    running = {name: LiveServer(create_app(bot, ServeSettings(model_name="tiny", max_echo_tokens=64)))
               for name, bot in bots.items()}
    yield {name: (server, bots[name]) for name, server in running.items()}
    for server in running.values():
        server.stop()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("outtype", list(TOLERANCE))
def test_echo_logprobs_match_the_torch_engine(servers, outtype):
    tol = TOLERANCE[outtype]
    want = client(servers["torch"][0]).completions.create(model="tiny", prompt=PROMPTS, max_tokens=0, echo=True,
                                                          logprobs=3)
    got = client(servers[outtype][0]).completions.create(model="tiny", prompt=PROMPTS, max_tokens=0, echo=True,
                                                         logprobs=3)
    assert len(got.choices) == len(want.choices) == 2
    for w, g in zip(sorted(want.choices, key=lambda c: c.index), sorted(got.choices, key=lambda c: c.index)):
        assert g.text == w.text and g.logprobs.tokens == w.logprobs.tokens
        assert g.logprobs.text_offset == w.logprobs.text_offset
        assert g.logprobs.token_logprobs[0] is None and g.logprobs.top_logprobs[0] is None
        assert g.logprobs.token_logprobs[1:] == pytest.approx(w.logprobs.token_logprobs[1:], abs=tol)
        assert len(g.logprobs.token_logprobs) > 5 and min(w.logprobs.token_logprobs[1:]) < -1  # not trivial
        for wt, gt in zip(w.logprobs.top_logprobs[1:], g.logprobs.top_logprobs[1:]):
            best = max(wt.values())
            assert max(gt.values()) == pytest.approx(best, abs=tol)
            if outtype == "f32":  # same alternatives, same order, same values
                assert list(gt) == list(wt) and list(gt.values()) == pytest.approx(list(wt.values()), abs=tol)


def torch_scores(torch_bot, cpp_bot, prompt_ids, max_new):
    """The PyTorch engine's scores (top 2) of the answer llama.cpp generates greedily after ``prompt_ids``.

    The generating context keeps llama.cpp's f16 KV cache, so on this random model its greedy answer may part from
    PyTorch's at a near tie after a few tokens; what is compared is the score of each token it did generate.
    """
    answer = [t for step in cpp_bot.generate_ids(prompt_ids, GenerationSettings(greedy=True, max_new_tokens=max_new))
              for t in step]
    return torch_bot.scorer(2).extend(prompt_ids + answer)[len(prompt_ids):]


def test_generated_and_chat_logprobs_match_the_torch_engine(servers):
    (_, torch_bot), (cpp_server, cpp_bot) = servers["torch"], servers["f32"]
    got = client(cpp_server).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                                logprobs=2).choices[0].logprobs
    want = torch_scores(torch_bot, cpp_bot, cpp_bot.tokenizer(PROMPTS[0])["input_ids"], 6)
    assert len(got.tokens) == len(want) == 6
    assert got.token_logprobs == pytest.approx([s.logprob for s in want], abs=1e-4)
    assert [max(top.values()) for top in got.top_logprobs] == pytest.approx([s.top[0][1] for s in want], abs=1e-4)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    chunks = list(client(cpp_server).chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True))
    got = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    stops = set(cpp_bot.stop_token_ids())
    want = [s for s in torch_scores(torch_bot, cpp_bot, cpp_bot.encode_prompt(cpp_bot.build_prompt(messages)), 6)
            if s.token not in stops]
    assert len(got) == len(want) > 0
    assert [e.logprob for e in got] == pytest.approx([s.logprob for s in want], abs=1e-4)
    assert [t.logprob for e in got for t in e.top_logprobs] == pytest.approx(
        [v for s in want for _, v in s.top], abs=1e-4)


def test_limits_are_the_same_on_the_llama_cpp_engine(servers):
    server, bot = servers["f32"]
    for body, field in (({"logprobs": 1000}, "logprobs"), ({"logprobs": -1}, "logprobs"),
                        ({"logprobs": 1, "echo": True, "prompt": "word " * 200}, "echo")):
        reply = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 0, **body}, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field
    reply = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2, "max_tokens": 1})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "top_logprobs"


def test_scoring_leaves_the_generating_context_alone(servers):
    _, bot = servers["f32"]
    with bot.scoring.lock:
        scoring_llm = bot.scoring.get()
    # generation runs without logits_all; scoring on its own context with it
    assert scoring_llm is not bot.model.llm and scoring_llm._logits_all and not bot.model.llm._logits_all
    ids = bot.tokenizer(PROMPTS[0])["input_ids"]
    once = [s.logprob for s in bot.scorer(0).extend(ids)]
    scorer = bot.scorer(0)  # the same sequence in three pieces (as an answer is scored while it streams)
    pieces = [s.logprob for part in (ids[:1], ids[1:4], ids[4:]) for s in scorer.extend(part)]
    assert pieces[0] is None and pieces == pytest.approx(once, abs=1e-6)
    torch_bot = servers["torch"][1]
    sequences, starts = [ids, ids[:5], torch_bot.tokenizer(PROMPTS[1])["input_ids"]], [3, 1, 2]
    want = torch_bot.score_batch(sequences, starts)
    got = bot.score_batch(sequences, starts)
    assert [[s.token for s in row] for row in got] == [[s.token for s in row] for row in want]
    assert [s.logprob for row in got for s in row] == pytest.approx([s.logprob for row in want for s in row], abs=1e-4)


def test_finechat_eval_tasks_on_the_llama_cpp_engine_equals_the_torch_engine(folder, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate

    from finechat.eval import harness

    gguf = export(folder, "f32")
    out = tmp_path / "cpp"
    assert cli(["eval", "--model", str(gguf), "--engine", "llama.cpp", "--tasks", str(TASKS), "--limit", "4",
                "--output-dir", str(out)]) == 0
    ours = json.loads((out / "lm_eval_results.json").read_text())["results"]
    tasks = harness.resolve_tasks(str(TASKS))
    torch_results = simple_evaluate(model=harness.harness_model(finechat.load(str(folder))), tasks=tasks, limit=4,
                                    log_samples=True, bootstrap_iters=0)
    cpp_results = simple_evaluate(model=harness.harness_model(finechat.load(str(gguf), engine="llama.cpp",
                                                                            n_threads=1)),
                                  tasks=tasks, limit=4, log_samples=True, bootstrap_iters=0)
    metrics = {"finechat_mc_en": ["acc,none", "acc_norm,none"], "finechat_mc_zh": ["acc,none", "acc_norm,none"],
               "finechat_qa_en": ["exact_match,strip"]}
    for task, keys in metrics.items():
        for key in keys:
            assert ours[task][key] == cpp_results["results"][task][key] == torch_results["results"][task][key]
    for task in metrics:  # every scored choice and every greedy answer
        want = [r for s in torch_results["samples"][task] for r in s["resps"]]
        got = [r for s in cpp_results["samples"][task] for r in s["resps"]]
        if task == "finechat_qa_en":
            assert got == want and any(r[0] for r in got)
        else:
            assert [r[0][0] for r in got] == pytest.approx([r[0][0] for r in want], abs=1e-4)
            assert [r[0][1] for r in got] == [r[0][1] for r in want]
