"""The code that runs only on CUDA: the fast decoder's CUDA-graph compile, the bfloat16 default dtype, and the
quantized layers' unpacked path. Every test here is marked ``gpu`` and skipped ("needs CUDA") without CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from chatglm_tiny import write_fake_chatglm
from eval_helpers import greedy_by_generate
from tiny import make_tiny_llama, make_tokenizer, save_tiny_model

import finechat
from finechat.generate.fast import fast_decoder, fast_decoder_for
from finechat.models.device import pick_device, pick_dtype
from finechat.models.weight_only import Int4Linear, Int8Linear, quantize_model

pytestmark = pytest.mark.gpu
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # wide initialisations: the default ones make tiny models repeat one token, so any decoder would "agree"
    return save_tiny_model(tmp_path_factory.mktemp("llama"), initializer_range=0.3)


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory):
    return write_fake_chatglm(tmp_path_factory.mktemp("glm") / "chatglm-6b", init_std=0.5)


def _step_logits(decoder, ids: list[int], steps: int) -> list[torch.Tensor]:
    """The logits of the prefill and of ``steps`` one-token steps, following the greedy tokens."""
    decoder.setup_cache(1, len(ids) + steps)
    logits = decoder.prefill(torch.tensor([ids], device="cuda"))
    kept = [logits.float().reshape(-1)]
    for step in range(steps):
        token = logits.reshape(-1).argmax().view(1, 1)
        logits = decoder.decode_one_token(token, len(ids) + step)
        kept.append(logits.float().reshape(-1))  # a CUDA graph reuses its output buffer: each step must be a copy
    return kept


@pytest.mark.parametrize("family,question", [("llama", QUESTION), ("chatglm", "类型#上衣")])
def test_cuda_graph_compiled_decoder_gives_the_eager_greedy_tokens(family, question, request):
    bot = finechat.load(str(request.getfixturevalue(f"{family}_dir")), device="cuda", dtype="float32")
    ids = bot.encode_prompt(bot.build_prompt([{"role": "user", "content": question}]))
    with torch.no_grad():
        out = bot.model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=24, min_new_tokens=24,
                                 do_sample=False, eos_token_id=None, pad_token_id=bot.tokenizer.pad_token_id)
    expected = out[0, len(ids):].tolist()
    assert len(set(expected)) > 2, "the tiny model should not just repeat one token"
    eager = fast_decoder(bot.model)
    assert eager.device.type == "cuda" and list(eager.generate(ids, 24)) == expected
    compiled = fast_decoder(bot.model, compile=True)  # "reduce-overhead": the step is replayed as a CUDA graph
    assert list(compiled.generate(ids, 24)) == expected
    assert list(compiled.generate(ids, 24)) == expected  # a second answer replays the captured graph
    with torch.no_grad():
        for got, want in zip(_step_logits(compiled, ids, 8), _step_logits(eager, ids, 8), strict=True):
            assert (got - want).norm() / want.norm() < 1e-3


def test_load_with_compile_on_cuda_answers_as_without(llama_dir):
    plain = finechat.load(str(llama_dir), device="cuda", dtype="float32")
    compiled = finechat.load(str(llama_dir), device="cuda", dtype="float32", compile=True)
    assert fast_decoder_for(compiled).compile and not fast_decoder_for(plain).compile
    ask = dict(greedy=True, max_new_tokens=16)
    answer = plain.chat(QUESTION, [], **ask)[0]
    assert answer and compiled.chat(QUESTION, [], **ask)[0] == answer
    assert compiled.chat(QUESTION, [], **ask)[0] == answer


def test_auto_dtype_is_bfloat16_on_cuda(llama_dir):
    assert pick_device("auto") == "cuda" and pick_dtype("auto", "cuda") == torch.bfloat16
    bot = finechat.load(str(llama_dir))
    weight = bot.model.get_input_embeddings().weight
    assert weight.device.type == "cuda" and weight.dtype == torch.bfloat16
    answer, _ = bot.chat(QUESTION, [], greedy=True, max_new_tokens=8)
    assert answer == greedy_by_generate(bot, QUESTION, 8)
    proc = subprocess.run([sys.executable, "-m", "finechat", "chat", "--model", str(llama_dir), "--dtype", "auto",
                           "--greedy", "--max-new-tokens", "4"], input="hello\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bfloat16, cuda" in proc.stderr


def test_unpacked_quantized_layers_on_cuda_match_the_cpu_kernels():
    """On CPU the layers run PyTorch's packed int8/int4 kernels; on CUDA they compute from the canonical
    (unpacked) weights. Both must compute what the dequantized weights say."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    x = torch.randn(5, 256)
    int8, int4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 32)
    with torch.no_grad():
        refs = [torch.nn.functional.linear(x, layer.dequantized_weight(torch.float32)) + linear.bias
                for layer in (int8, int4)]
        packed = [int8(x), int4(x)]  # the CPU kernels (bfloat16 inside)
        canonical = int4.canonical_weight()
        int8.to("cuda"), int4.to("cuda")
        assert int4.weight_int4.device.type == "cuda" and torch.equal(int4.weight_int4.cpu(), canonical)
        unpacked = [int8(x.cuda()).cpu(), int4(x.cuda()).cpu()]
        for got, ref, cpu in zip(unpacked, refs, packed, strict=True):
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)  # float32 from the dequantized weights
            assert torch.allclose(got, cpu, atol=0.05, rtol=0.02)
        # back on the CPU the int4 weights are repacked for the kernel: the same outputs as before the trip
        int8.to("cpu"), int4.to("cpu")
        assert torch.equal(int4(x), packed[1]) and torch.equal(int8(x), packed[0])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_moved_to_cuda_agrees_with_cpu(bits):
    tokenizer = make_tokenizer()
    # the CPU kernels round activations to bfloat16: emulated on CPU, 0.3% of the logits' norm (agreement 1.0)
    model = quantize_model(make_tiny_llama(vocab_size=len(tokenizer)), bits, group_size=32)
    ids = torch.tensor([tokenizer("The capital of France is Paris. 中国的首都是北京。")["input_ids"]])
    with torch.no_grad():
        on_cpu = model(ids).logits
        on_cuda = model.to("cuda")(ids.cuda()).logits.cpu()
        assert (on_cuda.argmax(-1) == on_cpu.argmax(-1)).float().mean() > 0.9
        assert (on_cuda - on_cpu).norm() / on_cpu.norm() < 0.02
        assert torch.equal(model.to("cpu")(ids).logits, on_cpu)
