"""The fast decoder: same greedy tokens as transformers' generate, HF sampling semantics, engine wiring."""

import pytest
import torch
from tiny import make_tokenizer

from finechat.generate.fast import generate_tokens
from finechat.generate.sampling import (
    apply_repetition_penalty,
    filter_logits,
    make_generator,
    pick_next_token,
)
from finechat.generate.settings import GenerationSettings
from finechat.models.decoder_table import unsupported_reason
from finechat.models.fast_decoder import FastDecoder


def greedy(n, **kw):
    return GenerationSettings(greedy=True, max_new_tokens=n, **kw)


PROMPT = "Hello, how are you today? 你好，我是一个人工智能助手。"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # a wide initialisation so that greedy answers vary instead of repeating one token
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _qwen2(vocab: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def _hf_greedy(model, ids, n, **kw):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def _lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, config).eval()


def _quantized(bits):
    from finechat.models.weight_only import quantize_model

    return lambda vocab: quantize_model(_llama(vocab), bits, group_size=32, include_embedding=True)


@pytest.mark.parametrize("build", [
    _llama, _qwen2, lambda v: _llama(v).to(torch.bfloat16), lambda v: _lora(_llama(v)), lambda v: _lora(_qwen2(v)),
    _quantized(8), _quantized(4),
], ids=["llama", "qwen2", "llama-bf16", "llama-lora", "qwen2-lora", "llama-int8", "llama-int4"])
def test_greedy_tokens_equal_generate(tokenizer, build):
    model = build(len(tokenizer))
    ids = tokenizer(PROMPT)["input_ids"]
    expected = _hf_greedy(model, ids, 24)
    assert len(set(expected)) > 3, "the tiny model should not just repeat one token"
    decoder = FastDecoder(model)
    assert list(generate_tokens(decoder, ids, greedy(24))) == expected
    # a second answer reuses the cache; with a repetition penalty it still matches
    assert list(generate_tokens(decoder, ids, greedy(24, repetition_penalty=1.3))) == _hf_greedy(model, ids, 24, repetition_penalty=1.3)


def test_stop_token_ends_and_is_yielded(tokenizer):
    model = _llama(len(tokenizer))
    ids = tokenizer(PROMPT)["input_ids"]
    first = list(generate_tokens(FastDecoder(model), ids, greedy(10)))
    stop = first[3]
    got = list(generate_tokens(FastDecoder(model), ids, greedy(10), stop_token_ids=[stop]))
    assert got == first[:first.index(stop) + 1]


def test_sampling_is_seeded_by_its_generator(tokenizer):
    model = _llama(len(tokenizer))
    decoder = FastDecoder(model)
    ids = tokenizer(PROMPT)["input_ids"]
    state = torch.random.get_rng_state()
    sample = GenerationSettings(max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50)
    runs = [list(generate_tokens(decoder, ids, sample, generator=make_generator("cpu", seed))) for seed in (1, 1, 2)]
    # the settings' own seed drives the same generator
    assert list(generate_tokens(decoder, ids, GenerationSettings.from_kwargs(sample, seed=1))) == runs[0]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert torch.equal(state, torch.random.get_rng_state()), "sampling must not touch the global RNG"


def test_filters_match_transformers_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(2, 50) * 3
    seen = torch.randint(0, 50, (2, 7))
    expected = RepetitionPenaltyLogitsProcessor(1.2)(seen, logits.clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        expected = warper(seen, expected)
    got = filter_logits(apply_repetition_penalty(logits, seen, 1.2), temperature=0.7, top_k=10, top_p=0.8)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
    greedy = pick_next_token(logits, seen, do_sample=False, repetition_penalty=1.2)
    assert torch.equal(greedy[:, 0], RepetitionPenaltyLogitsProcessor(1.2)(seen, logits.clone()).argmax(-1))


def test_unsupported_models_are_named():
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in unsupported_reason(gpt2)
    prefix = get_peft_model(_llama(100), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert "PREFIX_TUNING" in unsupported_reason(prefix)
    with pytest.raises(ValueError, match="does not support"):
        FastDecoder(gpt2)


def test_engine_uses_fast_path_with_same_answers(tiny_model_dir):
    import finechat
    from finechat.generate.fast import fast_decoder_for

    bot = finechat.load(str(tiny_model_dir))
    assert fast_decoder_for(bot) is not None
    fast_answer = bot.chat("What is the capital of France?", greedy=True, max_new_tokens=20)[0]
    bot.use_fast_decoder = False
    assert fast_decoder_for(bot) is None
    assert bot.chat("What is the capital of France?", greedy=True, max_new_tokens=20)[0] == fast_answer
    bot.use_fast_decoder = True
    seeded = [bot.chat("你好", temperature=1.0, seed=7, max_new_tokens=12)[0] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_closing_the_stream_cancels(tiny_model_dir):
    import finechat
    from finechat.generate.engine import GenerationSettings

    bot = finechat.load(str(tiny_model_dir))
    ids = bot.encode_prompt(bot.build_prompt([{"role": "user", "content": "hi"}]))
    stream = bot.generate_ids(ids, GenerationSettings(max_new_tokens=400, greedy=True))
    next(stream)
    stream.close()  # must release the model at once ...
    assert bot.lock.acquire(timeout=1)
    bot.lock.release()
    # ... and the next answer starts from a clean cache
    again = list(bot.generate_ids(ids, GenerationSettings(max_new_tokens=5, greedy=True)))
    assert 1 <= len(again) <= 5


def test_prefix_adapter_falls_back_to_generate(tokenizer):
    from peft import PrefixTuningConfig, get_peft_model

    from finechat.generate.engine import ChatModel
    from finechat.generate.fast import fast_decoder_for

    model = get_peft_model(_llama(len(tokenizer)), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    bot = ChatModel(model.eval(), tokenizer)
    assert fast_decoder_for(bot) is None
    answer, history = bot.chat("hi", greedy=True, max_new_tokens=6)
    assert history == [("hi", answer)]


def test_compiled_one_token_step_llama(tokenizer):
    """compile=True: the one-token step is compiled once for every position; same greedy tokens here."""
    model = _llama(len(tokenizer))
    ids = tokenizer(PROMPT)["input_ids"]
    expected = _hf_greedy(model, ids, 12)
    decoder = FastDecoder(model, compile=True)
    assert list(generate_tokens(decoder, ids, greedy(12))) == expected
    assert decoder._compiled_step is not None


def test_load_with_compile_answers_as_without(tiny_model_dir):
    import finechat
    from finechat.generate.fast import fast_decoder_for

    plain = finechat.load(str(tiny_model_dir))
    compiled = finechat.load(str(tiny_model_dir), compile=True)
    assert fast_decoder_for(compiled).compile and not fast_decoder_for(plain).compile
    ask = dict(max_new_tokens=10, greedy=True)
    assert compiled.chat("hello", **ask)[0] == plain.chat("hello", **ask)[0]
