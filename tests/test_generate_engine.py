import threading

import pytest
from scripted import ScriptedChat

import finechat
from finechat.errors import ConfigError, ModelLoadError


def test_chat_history_grows_one_pair_per_call(tiny_bot):
    r1, h1 = tiny_bot.chat("hello", history=[], greedy=True, max_new_tokens=6)
    assert h1 == [("hello", r1)]
    r2, h2 = tiny_bot.chat("again", history=h1, greedy=True, max_new_tokens=6)
    assert h2 == [("hello", r1), ("again", r2)]


def test_last_streamed_response_equals_chat(tiny_bot):
    response, _ = tiny_bot.chat("你好", greedy=True, max_new_tokens=12)
    parts = list(tiny_bot.stream_chat("你好", greedy=True, max_new_tokens=12))
    assert parts[-1][0] == response
    assert parts[-1][1] == [("你好", response)]
    # partial responses grow
    assert all(len(a[0]) <= len(b[0]) for a, b in zip(parts, parts[1:]))


def test_seeded_sampling_repeats(tiny_bot):
    a, _ = tiny_bot.chat("hi", do_sample=True, temperature=1.0, seed=3, max_new_tokens=8)
    b, _ = tiny_bot.chat("hi", do_sample=True, temperature=1.0, seed=3, max_new_tokens=8)
    assert a == b
    # ... and it is sampling: other seeds give other answers (greedy decoding would give one answer)
    others = {tiny_bot.chat("hi", do_sample=True, temperature=1.0, seed=seed, max_new_tokens=8)[0] for seed in (4, 5)}
    assert others - {a}


def test_unknown_generation_setting(tiny_bot):
    with pytest.raises(ConfigError, match="unknown generation setting"):
        tiny_bot.chat("hi", max_new_tokenz=3)


def test_stops_at_end_of_turn_and_stop_strings(tiny_bot):
    tok = tiny_bot.tokenizer
    bot = ScriptedChat(tok, "Paris is nice<|im_end|><|im_start|>user\nmore")
    assert bot.chat("q")[0] == "Paris is nice"
    bot = ScriptedChat(tok, "one two three four")
    assert bot.chat("q", stop=["three"])[0] == "one two"


def test_closing_the_stream_stops_generation(tiny_bot):
    bot = ScriptedChat(tiny_bot.tokenizer, "a b c d e f g h i j k l m n o p")
    stream = bot.stream_chat("q")
    next(stream)
    stream.close()
    assert bot.emitted < len(bot.script)


def test_closing_a_real_stream_cancels_generate(tiny_bot):
    """transformers' generate runs in a worker thread: closing the stream stops it at the next token."""
    steps = []
    hook = tiny_bot.model.register_forward_hook(lambda *args: steps.append(1))  # one forward pass per token
    tiny_bot.use_fast_decoder = False
    threads = threading.active_count()
    try:
        stream = tiny_bot.stream_chat("hello", greedy=True, max_new_tokens=200, stop=["never said"])
        next(stream)
        stream.close()  # must not hang: the worker is told to stop and joined
        assert threading.active_count() == threads
        stopped_after = len(steps)
        steps.clear()
        tiny_bot.chat("hello", greedy=True, max_new_tokens=200, stop=["never said"])
    finally:
        hook.remove()
        tiny_bot.use_fast_decoder = True
    assert len(steps) > stopped_after + 20, "the answer must be long enough to show the stop"


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="not found"):
        finechat.load(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="adapter folder not found"):
        finechat.load(str(tiny_model_dir), adapter=str(tmp_path / "nope"))
    (tmp_path / "empty_adapter").mkdir()
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        finechat.load(str(tiny_model_dir), adapter=str(tmp_path / "empty_adapter"))


def test_adapter_for_another_base_is_a_clear_error(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other", hidden=32)
    bot = finechat.load(str(other))
    peft_model = get_peft_model(bot.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match="does not fit this base model"):
        finechat.load(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))


def test_adapter_loads_and_changes_nothing_at_init(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    bot = finechat.load(str(tiny_model_dir))
    base_answer, _ = bot.chat("hello", greedy=True, max_new_tokens=5)
    peft_model = get_peft_model(bot.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    with_adapter = finechat.load(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))
    assert type(with_adapter.model).__name__ == "PeftModelForCausalLM"
    assert with_adapter.chat("hello", greedy=True, max_new_tokens=5)[0] == base_answer  # LoRA B starts at 0


def test_a_budget_that_ends_inside_a_character_leaves_no_replacement_mark(tiny_bot):
    tok = tiny_bot.tokenizer
    text = "好龘"  # a character outside the tokenizer's corpus: several byte tokens
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3 and "\ufffd" in tok.decode(ids[:-1]), "need a character split over byte tokens"
    bot = ScriptedChat(tok, text)
    answer, _ = bot.chat("q", max_new_tokens=len(ids) - 1)
    assert answer == tok.decode(ids[:-1]).rstrip("\ufffd") and "\ufffd" not in answer
    assert bot.chat("q", max_new_tokens=len(ids))[0] == text


def test_a_seeded_answer_leaves_the_callers_random_state(tiny_bot):
    import torch

    from finechat.eval.predict import generate_answers
    from finechat.generate.settings import GenerationSettings

    before = torch.random.get_rng_state()
    a, _ = tiny_bot.chat("hi", do_sample=True, temperature=1.0, seed=3, max_new_tokens=8)
    settings = GenerationSettings(do_sample=True, temperature=1.0, seed=3, max_new_tokens=8)
    batch = generate_answers(tiny_bot, [[{"role": "user", "content": "hi"}]], settings, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)  # seeding did not reseed the process
    assert batch == generate_answers(tiny_bot, [[{"role": "user", "content": "hi"}]], settings, progress=False)
    assert tiny_bot.chat("hi", do_sample=True, temperature=1.0, seed=3, max_new_tokens=8)[0] == a


def test_a_wrong_adapter_path_lists_the_checkpoints_before_loading_the_model(tmp_path, monkeypatch):
    run = tmp_path / "adgen-lora"
    for step in (10, 2, 30):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    loaded = []
    monkeypatch.setattr("finechat.generate.chat_loader.load_model_and_tokenizer", lambda *a, **k: loaded.append(1))
    with pytest.raises(ModelLoadError, match=rf"adapter folder not found: {run}/checkpoint-40; checkpoints in {run}: "
                                             rf"{run}/checkpoint-2, {run}/checkpoint-10, {run}/checkpoint-30"):
        finechat.load("default", adapter=str(run / "checkpoint-40"))
    with pytest.raises(ModelLoadError, match=rf"{run} is a training run folder, not an adapter; give one of its "
                                             rf"checkpoints: .*{run}/checkpoint-30"):
        finechat.load("default", adapter=str(run))
    assert not loaded  # the model was never loaded


def test_a_finechat_run_folder_as_adapter_means_its_newest_checkpoint(tmp_path):
    from finechat.models.resolve import check_adapter_folder

    run = tmp_path / "adgen-lora"  # what `finechat train` leaves: run files at the top, checkpoints inside
    for step in (2, 10, 4):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    (run / "checkpoint-12").mkdir()  # not a checkpoint that was written whole
    (run / "finechat_run.json").write_text("{}")
    assert check_adapter_folder(str(run)) == run / "checkpoint-10"
    (run / "checkpoint-10" / "adapter_config.json").unlink()
    assert check_adapter_folder(str(run)) == run / "checkpoint-4"


def _contract_members() -> set[str]:
    from finechat.generate.contract import ChatEngine

    return {name for name in dir(ChatEngine) if not name.startswith("_")} | set(ChatEngine.__annotations__)


def test_both_engines_keep_the_engine_contract(tiny_bot):
    """The PyTorch, llama.cpp and vLLM engines are ChatEngines (checked without llama-cpp-python or vLLM)."""
    import types

    from finechat.generate.contract import ChatEngine
    from finechat.generate.llamacpp import LlamaCppChatModel, LlamaCppModel
    from finechat.generate.vllm_engine import VllmChatModel, VllmModel

    members = _contract_members()
    assert {"lock", "hooks", "build_prompt", "encode_prompt", "stop_token_ids", "stream_chat", "chat",
            "score_batch"} <= members
    assert isinstance(tiny_bot, ChatEngine)
    runner = types.SimpleNamespace(n_ctx=lambda: 64)  # stands in for llama_cpp.Llama: nothing is generated
    cpp = LlamaCppChatModel(LlamaCppModel(runner, {"architecture": "llama"}), tiny_bot.tokenizer, None)
    assert isinstance(cpp, ChatEngine)
    server = types.SimpleNamespace(url="http://127.0.0.1:9", stop=lambda: None)  # stands in for the vLLM child
    served = VllmChatModel(VllmModel(server, {"model_type": "llama"}, None, "finechat"), tiny_bot.tokenizer, None)
    assert isinstance(served, ChatEngine)
    for engine in (tiny_bot, cpp, served):
        assert not [m for m in members if not hasattr(engine, m)]
        assert isinstance(engine.lock, type(threading.Lock())) and engine.hooks == []
    assert not isinstance(types.SimpleNamespace(chat=lambda q: q), ChatEngine)  # a part of it is not an engine


def test_one_chat_drains_the_stream_for_engine_and_agent(tiny_bot):
    """``chat`` is the last item of ``stream_chat`` for the engine and for the tool agent, through one function."""
    from finechat.generate.contract import chat_answer
    from finechat.tools.agent import Agent
    from finechat.tools.toolbox import build_registry

    assert chat_answer(iter([]), "q", [("a", "b")]) == ("", [("a", "b"), ("q", "")])
    bot = ScriptedChat(tiny_bot.tokenizer, "42")
    agent = Agent(bot, build_registry("calculator"))
    pairs = list(agent.stream_chat("what is 6*7?", []))
    assert agent.chat("what is 6*7?", []) == pairs[-1] == ("42", [("what is 6*7?", "42")])
    assert bot.chat("hi", []) == list(bot.stream_chat("hi", []))[-1] == ("42", [("hi", "42")])
