"""The real default model (SmolLM2-135M-Instruct), alone and with a LoRA adapter, exported to f16 GGUF: loaded back
by transformers and run by llama.cpp, it gives the PyTorch model's greedy tokens (slow: the real model)."""

import pytest
import torch
from eval_helpers import make_adapter

import finechat
from finechat.cli import main as cli
from finechat.generate.engine import GenerationSettings
from finechat.generate.llamacpp import MISSING
from finechat.models.resolve import default_model_dir

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.", "用一句话介绍北京。"]
NEW_TOKENS = 32


def greedy_tokens(bot, question):
    ids = bot.encode_prompt(bot.build_prompt([{"role": "user", "content": question}]))
    return ids, [t[0] for t in bot.generate_ids(ids, GenerationSettings(greedy=True, max_new_tokens=NEW_TOKENS))]


@pytest.fixture(scope="module")
def default_f16(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf"
    assert cli(["export", "--to", "gguf", "--out", str(out), "--outtype", "f16"]) == 0
    return out


@pytest.fixture(scope="module")
def lora_f16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    adapter = make_adapter(default_model_dir(), folder / "adapter", seed=3)
    out = folder / "merged-f16.gguf"
    assert cli(["export", "--to", "gguf", "--adapter", str(adapter), "--out", str(out), "--outtype", "f16"]) == 0
    return adapter, out


def test_f16_loaded_back_by_transformers_gives_the_same_greedy_tokens(default_f16):
    torch_bot = finechat.load()
    back = finechat.load(str(default_f16))
    for question in QUESTIONS:
        ids, want = greedy_tokens(torch_bot, question)
        assert back.encode_prompt(back.build_prompt([{"role": "user", "content": question}])) == ids
        assert greedy_tokens(back, question)[1] == want, question


def test_f16_run_by_llama_cpp_gives_the_same_greedy_tokens(request):
    pytest.importorskip("llama_cpp", reason=MISSING)
    # the exports are asked for after the check: without llama.cpp nothing is built only to be skipped
    default_f16 = request.getfixturevalue("default_f16")
    adapter, merged = request.getfixturevalue("lora_f16")
    for base, gguf_path in ((finechat.load(), default_f16), (finechat.load(adapter=str(adapter)), merged)):
        cpp = finechat.load(str(gguf_path), engine="llama.cpp")
        for question in QUESTIONS:
            ids, want = greedy_tokens(base, question)
            assert greedy_tokens(cpp, question) == (ids, want), (gguf_path.name, question)
    with torch.inference_mode():  # the adapter changed the answers: the merge was not a no-op
        assert greedy_tokens(finechat.load(), QUESTIONS[0])[1] != greedy_tokens(
            finechat.load(adapter=str(adapter)), QUESTIONS[0])[1]
