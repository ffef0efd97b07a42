"""The fast path on native ChatGLM-6B (same greedy tokens as its generate) and the row-split CPU Linear layers."""

from __future__ import annotations

import pytest
import torch

from finechat.generate.fast import generate_tokens
from finechat.generate.settings import GenerationSettings
from finechat.models.chatglm.configuration_chatglm import ChatGLMConfig
from finechat.models.chatglm.fast_chatglm import ChatGLMFastDecoder
from finechat.models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
from finechat.models.decoder_table import fast_decoder, unsupported_reason
from finechat.models.fast_decoder import FastDecoder
from finechat.models.row_split import (
    RowSplitLinear,
    aten_single_row_products,
    split_linear,
    split_linear_layers,
    unsplit_linear_layers,
)

BOS, EOS, MASK, GMASK, PAD = 290, 291, 292, 293, 3


@pytest.fixture(autouse=True)
def two_torch_threads():
    """Splitting depends on torch's thread count: pin 2 (the caller's, e.g. OMP_NUM_THREADS=1, must not
    decide what these tests see) and restore the caller's after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def greedy(decoder, ids, n, **kw):
    return list(generate_tokens(decoder, ids, GenerationSettings(greedy=True, max_new_tokens=n, **kw)))


def chatglm(seed: int = 0, **extra) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = ChatGLMConfig(vocab_size=300, hidden_size=64, inner_hidden_size=128, num_layers=2, num_attention_heads=4,
                        bos_token_id=BOS, eos_token_id=EOS, mask_token_id=MASK, gmask_token_id=GMASK,
                        pad_token_id=PAD, **extra)
    model = ChatGLMForConditionalGeneration(cfg).eval()
    torch.manual_seed(seed)
    with torch.no_grad():  # a wide initialisation so that greedy answers vary (ChatGLM's α = √56 residual
        for p in model.parameters():  # otherwise makes a tiny model repeat the last token)
            p.normal_(0, 0.5)
    return model


def hf_greedy(model, ids, n, **kw):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=PAD,
                             eos_token_id=None, **kw)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt", [
    [11, 12, 13, 14, 15, GMASK, BOS],          # ChatGLM-6B's chat prompt: ... [gMASK] <sop>
    [20, 21, MASK, 22, 23, BOS, 40, 41],        # [MASK] infilling, the answer already started
    [30, 31, 32, 33],                           # no <sop>: all bidirectional, plain positions
], ids=["gmask", "mask-with-answer-prefix", "no-sop"])
def test_chatglm_greedy_tokens_equal_generate(prompt):
    model = chatglm(0)
    expected = hf_greedy(model, prompt, 16)
    assert len(set(expected)) > 2, "the tiny model should not just repeat one token"
    decoder = fast_decoder(model)
    assert isinstance(decoder, ChatGLMFastDecoder)
    assert greedy(decoder, prompt, 16) == expected
    # the cache is reused for a second answer; the repetition penalty follows generate's too
    assert greedy(decoder, prompt, 16, repetition_penalty=1.3) == hf_greedy(model, prompt, 16,
                                                                                   repetition_penalty=1.3)


def test_chatglm_quantized_fast_path_matches_its_generate():
    model = chatglm(2).quantize(8)
    prompt = [11, 12, 13, GMASK, BOS]
    expected = hf_greedy(model, prompt, 12)
    assert greedy(fast_decoder(model), prompt, 12) == expected


def test_chatglm_ptuning_prefix_falls_back_to_generate():
    model = chatglm(0, pre_seq_len=4)
    assert "P-Tuning" in unsupported_reason(model)
    with pytest.raises(ValueError, match="P-Tuning"):
        fast_decoder(model)


def test_chatglm_chat_uses_the_fast_path(tmp_path):
    """ChatModel.chat on a ChatGLM folder picks ChatGLMFastDecoder and answers as generate would."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from chatglm_tiny import write_fake_chatglm

    import finechat
    from finechat.generate.fast import fast_decoder_for

    folder = write_fake_chatglm(tmp_path / "chatglm")
    bot = finechat.load(str(folder), dtype="float32", trust_remote_code=False)
    assert isinstance(fast_decoder_for(bot), ChatGLMFastDecoder)
    fast_answer, _ = bot.chat("你好", max_new_tokens=8, greedy=True)
    bot.use_fast_decoder = False
    slow_answer, _ = bot.chat("你好", max_new_tokens=8, greedy=True)
    assert fast_answer == slow_answer


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 32, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_split_linear_is_linear(rows, bias):
    torch.manual_seed(rows)
    layer = torch.nn.Linear(48, 96, bias=bias)
    layer.row_chunks = 4
    x = torch.randn(rows, 1, 48)  # [b, len, in]: any leading shape
    out = split_linear(layer, x)
    assert out.shape == (rows, 1, 96)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)


def test_split_linear_runs_the_chunks_as_one_batched_product(monkeypatch):
    """Few rows go through torch.bmm over the row chunks; many rows, one thread or bf16 stay with F.linear."""
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(tuple(a.shape)) or real_bmm(a, b))
    layer = torch.nn.Linear(32, 64)
    layer.row_chunks = 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the caller's count (OMP_NUM_THREADS=1 on a busy machine) must not decide
        split_linear(layer, torch.randn(1, 32))
        assert calls == [(2, 32, 32)]
        split_linear(layer, torch.randn(33, 32))
        torch.set_num_threads(1)  # one thread: nothing to run side by side
        split_linear(layer, torch.randn(1, 32))
    finally:
        torch.set_num_threads(threads)
    split_linear(layer.to(torch.bfloat16), torch.randn(1, 32, dtype=torch.bfloat16))
    assert calls == [(2, 32, 32)]


def test_splitting_keeps_weights_ties_values_and_saving(tmp_path):
    from transformers import LlamaForCausalLM

    model = _llama()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        before = model(ids).logits
    weight = model.model.layers[0].mlp.down_proj.weight
    assert split_linear_layers(model) == 15  # 2 layers x 7 + the tied head
    assert type(model.model.layers[0].mlp.down_proj) is RowSplitLinear
    assert model.model.layers[0].mlp.down_proj.weight is weight and weight.is_contiguous()  # untouched
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():  # the same function; only the summation order inside a dot product moves
        assert torch.allclose(model(ids[:, :1]).logits, before[:, :1], rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "saved")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, before)
    assert split_linear_layers(model) == 0  # already split
    assert unsplit_linear_layers(model) == 15
    assert type(model.lm_head) is torch.nn.Linear and not hasattr(model.lm_head, "row_chunks")
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)


def test_decoder_splits_fp32_cpu_layers_unless_asked_not_to():
    model = _llama()
    FastDecoder(model, split_rows=False)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    FastDecoder(model)
    assert type(model.model.layers[0].self_attn.q_proj) is RowSplitLinear
    bf16 = _llama().to(torch.bfloat16)
    FastDecoder(bf16)
    q_proj = bf16.model.layers[0].self_attn.q_proj
    assert type(q_proj) is RowSplitLinear and q_proj.row_chunks == 1  # not split: one row goes to ATen's kernel


def test_weights_that_stay_in_cache_are_not_split(monkeypatch):
    monkeypatch.setattr("finechat.models.row_split.MIN_SPLIT_WEIGHTS", 128 * 64)  # the MLP's, not q_proj's 64 x 64
    model = _llama()
    assert split_linear_layers(model) == 2 * 3 + 1  # gate/up/down per layer and the 300 x 64 head
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.up_proj) is RowSplitLinear


def test_lora_adapter_still_saves_after_splitting(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    ids = [1, 2, 3, 4]
    decoder = fast_decoder(model)
    answer = greedy(decoder, ids, 8)
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(_llama(), tmp_path / "adapter").eval()
    assert greedy(FastDecoder(again, split_rows=False), ids, 8) == answer


@pytest.mark.parametrize("bits", [8, 4])
def test_chatglm_with_finechat_quantization_and_int8_head(bits):
    """finechat's own INT8/INT4 (embedding and tied head included: the head has no .weight any more)."""
    from finechat.models.weight_only import quantize_model

    model = quantize_model(chatglm(0), bits, group_size=32, include_embedding=True)
    prompt = [11, 12, 13, 14, 15, GMASK, BOS]
    expected = hf_greedy(model, prompt, 12)
    decoder = fast_decoder(model)
    assert decoder.device.type == "cpu"
    assert greedy(decoder, prompt, 12) == expected


def test_compiled_one_token_step_chatglm():
    """compile=True: one graph over the whole static cache (later positions masked), same greedy tokens here."""
    model = chatglm(0)
    prompt = [11, 12, 13, 14, 15, GMASK, BOS]
    expected = hf_greedy(model, prompt, 12)
    decoder = fast_decoder(model, compile=True)
    assert greedy(decoder, prompt, 12) == expected
    assert decoder._compiled_step is not None


def test_chatglm_with_a_lora_adapter_matches_its_generate():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(chatglm(0), LoraConfig(r=4, target_modules=["query_key_value", "dense_h_to_4h"],
                                                  init_lora_weights=False)).eval()
    prompt = [11, 12, 13, 14, 15, GMASK, BOS]
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    decoder = fast_decoder(model)
    assert isinstance(decoder, ChatGLMFastDecoder)
    assert greedy(decoder, prompt, 12) == out[0, len(prompt):].tolist()


def test_aten_single_row_products_switch_is_scoped():
    before = torch._C._get_mkldnn_enabled()
    with aten_single_row_products(1, torch.bfloat16, torch.device("cpu")):
        assert not torch._C._get_mkldnn_enabled()
    assert torch._C._get_mkldnn_enabled() == before
    with pytest.raises(RuntimeError), aten_single_row_products(1, torch.bfloat16, torch.device("cpu")):
        raise RuntimeError("a failing step")
    assert torch._C._get_mkldnn_enabled() == before  # restored on error too
    for rows, dtype in ((4, torch.bfloat16), (1, torch.float32), (1, torch.float16)):
        with aten_single_row_products(rows, dtype, torch.device("cpu")):
            assert torch._C._get_mkldnn_enabled() == before  # only one bf16 row is switched


@pytest.mark.parametrize("family", ["chatglm", "llama"])
def test_bf16_one_row_products_use_atens_kernel_and_match_generate(family, monkeypatch):
    """A bf16 Linear product of one row runs without oneDNN (its single-row bf16 product is the slow one); the
    prompt's products and everything else keep it; greedy tokens stay generate's (the same modules)."""
    seen: list[tuple[int, bool]] = []
    real_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append((x.numel() // x.shape[-1], torch._C._get_mkldnn_enabled()))
        return real_linear(x, weight, bias)

    if family == "chatglm":
        model, prompt = chatglm(3).to(torch.bfloat16), [11, 12, 13, 14, GMASK, BOS]
    else:
        model, prompt = _llama().to(torch.bfloat16), [5, 6, 7, 8, 9]
    decoder = fast_decoder(model)
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    tokens = greedy(decoder, prompt, 12)
    assert torch._C._get_mkldnn_enabled()
    assert {on for rows, on in seen if rows == 1} == {False} and {on for rows, on in seen if rows > 1} == {True}
    seen.clear()
    expected = hf_greedy(model, prompt, 12) if family == "chatglm" else \
        model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert tokens == expected and {on for rows, on in seen if rows == 1} == {False}
