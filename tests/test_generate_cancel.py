"""A client that leaves stops the engines that run one request at a time: inside the prompt's prefill and between
decoding steps, on native ChatGLM-6B's fast decoder and in transformers' ``generate`` (prompt-learning adapters).

The batch engine's chunked prefill has its own test (tests/test_serve_batching.py). Here the cancel flag is set by
a hook at a known point of the forward pass (the first decoder layer's n-th call), never by a clock.
"""

from __future__ import annotations

import pytest
import torch
from serve_helpers import wait_until

from finechat.generate.batching import BatchScheduler
from finechat.generate.engine import ChatModel, GenerationSettings


def _bot(kind, tmp_path):
    """A ChatModel the scheduler runs serially: native ChatGLM-6B on its fast decoder or through ``generate``,
    or a tiny Llama under a peft prefix adapter (``generate``)."""
    torch.manual_seed(0)
    if kind.startswith("chatglm"):
        from chatglm_tiny import make_ice_text, tiny_config

        from finechat.models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
        from finechat.models.chatglm.tokenization_chatglm import ChatGLMTokenizer

        tokenizer = ChatGLMTokenizer(str(make_ice_text(tmp_path)))
        model = ChatGLMForConditionalGeneration(tiny_config(tokenizer)).eval()
        bot = ChatModel(model, tokenizer)
        bot.use_fast_decoder = kind == "chatglm"
        return bot, model.transformer.layers
    from peft import PrefixTuningConfig, get_peft_model
    from tiny import make_tiny_llama, make_tokenizer

    tokenizer = make_tokenizer()
    model = get_peft_model(make_tiny_llama(vocab_size=len(tokenizer)),
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    return ChatModel(model, tokenizer), model.get_base_model().model.layers


def _prompt(bot):
    return bot.encode_prompt(bot.build_prompt([{"role": "user", "content": "Write a long poem about the sea " * 6}]))


class _LayerCalls:
    """Counts each decoder layer's calls; ``on_first(n, ...)`` runs at the start of the first layer's n-th call."""

    def __init__(self, layers, on_first):
        self.calls = [0] * len(layers)
        self.handles = [layer.register_forward_pre_hook(self._hook(i, on_first)) for i, layer in enumerate(layers)]

    def _hook(self, index, on_first):
        def hook(module, args):
            self.calls[index] += 1
            if index == 0:
                on_first(self.calls[0])
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("kind", ["chatglm", "chatglm-generate", "prefix"])
def test_a_client_leaving_during_a_serial_prefill_stops_it_before_the_next_layer(kind, tmp_path):
    bot, layers = _bot(kind, tmp_path)
    assert not BatchScheduler(bot).batched  # the serial path under test
    streams = []

    def leave(call):
        if call == 1:  # the prompt's prefill has begun
            assert wait_until(lambda: streams, timeout=10)
            streams[0].close()  # the client leaves (the server's disconnect does this)

    calls = _LayerCalls(layers, leave)
    scheduler = BatchScheduler(bot)
    try:
        streams.append(scheduler.submit(_prompt(bot), GenerationSettings(max_new_tokens=20, greedy=True)))
        assert wait_until(lambda: scheduler.active == 0, timeout=60)
        assert calls.calls == [1] + [0] * (len(layers) - 1)  # the prefill stopped after its first layer
        assert bot.lock.acquire(timeout=10)  # and the engine is free for the next request
        bot.lock.release()
    finally:
        calls.remove()
        scheduler.close()


@pytest.mark.parametrize("kind", ["chatglm", "chatglm-generate", "prefix"])
def test_cancelled_during_decoding_no_step_follows(kind, tmp_path):
    """The flag set during the second decoding step (the first layer's third call): that step is the last."""
    bot, layers = _bot(kind, tmp_path)
    flag = []
    calls = _LayerCalls(layers, lambda call: call == 3 and flag.append(True))
    try:
        tokens = [t for step in bot.generate_ids(_prompt(bot), GenerationSettings(max_new_tokens=20, greedy=True),
                                                 cancelled=lambda: bool(flag)) for t in step]
    finally:
        calls.remove()
    assert calls.calls[0] == 3 and 2 <= len(tokens) <= 3  # the step under way may still give its token


@pytest.mark.parametrize("kind", ["chatglm", "prefix"])
def test_not_cancelled_answers_as_before(kind, tmp_path):
    bot, _ = _bot(kind, tmp_path)
    prompt, settings = _prompt(bot), GenerationSettings(max_new_tokens=6, greedy=True)
    plain = [t for step in bot.generate_ids(prompt, settings) for t in step]
    asked = [t for step in bot.generate_ids(prompt, settings, cancelled=lambda: False) for t in step]
    assert asked == plain and plain


def test_a_cancelled_generation_leaves_other_threads_forward_passes_alone(tmp_path):
    """The cancel check sits on the shared model's layers: scoring in another thread while a cancelled request
    is still in its prefill must run to the end."""
    import threading

    bot, layers = _bot("prefix", tmp_path)
    ids = _prompt(bot)
    flag, beside = [], []

    def cancel_and_score_beside(call):
        if call == 1 and not flag:
            flag.append(True)  # this request is cancelled from now on ...
            worker = threading.Thread(target=lambda: beside.append(bot.model(input_ids=torch.tensor([ids])).logits))
            worker.start()  # ... while another thread runs the model through every layer
            worker.join()

    calls = _LayerCalls(layers, cancel_and_score_beside)
    try:
        tokens = [t for step in bot.generate_ids(ids, GenerationSettings(max_new_tokens=5, greedy=True),
                                                 cancelled=lambda: bool(flag)) for t in step]
    finally:
        calls.remove()
    assert tokens == [] and beside and beside[0].shape[1] == len(ids)
