"""OpenAI's presence / frequency penalties: the formula, and the same answers on every generation path."""

import openai
import pytest
import torch
from serve_helpers import LiveServer

from finechat.generate.sampling import apply_answer_penalties
from finechat.generate.settings import GenerationSettings
from finechat.serve.api import ServeSettings, create_app


def test_formula_counts_only_the_answer():
    logits = torch.zeros(1, 5)
    out = apply_answer_penalties(logits, torch.tensor([[1, 1, 3]]), presence=0.5, frequency=0.25)
    # token 1 twice: 0.5 + 2 * 0.25; token 3 once: 0.5 + 0.25; others untouched
    assert out.tolist() == [[0.0, -1.0, 0.0, -0.75, 0.0]]
    assert apply_answer_penalties(logits, torch.zeros(1, 0, dtype=torch.long), 1.0, 1.0) is logits


def test_settings_reject_out_of_range_penalties():
    from finechat.errors import ConfigError

    with pytest.raises(ConfigError, match="frequency_penalty"):
        GenerationSettings.from_kwargs(frequency_penalty=2.5)


def test_fast_path_and_generate_agree_and_the_penalty_acts(tiny_bot):
    ask = dict(max_new_tokens=24, greedy=True)
    plain, _ = tiny_bot.chat("hello there", **ask)
    fast, _ = tiny_bot.chat("hello there", frequency_penalty=2.0, presence_penalty=1.0, **ask)
    tiny_bot.use_fast_decoder = False
    try:
        slow, _ = tiny_bot.chat("hello there", frequency_penalty=2.0, presence_penalty=1.0, **ask)
    finally:
        tiny_bot.use_fast_decoder = True
    assert fast == slow
    assert fast != plain  # the tiny model repeats itself; the penalties change the greedy answer


def test_server_applies_the_penalties(tiny_bot):
    srv = LiveServer(create_app(tiny_bot, ServeSettings(model_name="tiny")))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                               temperature=0, max_tokens=24, frequency_penalty=2.0,
                                               presence_penalty=1.0)
        expected, _ = tiny_bot.chat("hello there", max_new_tokens=24, greedy=True, frequency_penalty=2.0,
                                    presence_penalty=1.0)
        assert reply.choices[0].message.content == expected
        with pytest.raises(openai.UnprocessableEntityError, match="presence_penalty"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           presence_penalty=3.0)
    finally:
        srv.stop()


def test_batched_requests_apply_the_penalties_as_chat_does(tiny_bot):
    import threading

    from finechat.generate.batching import BatchScheduler

    questions = ["hello there", "What is the capital of France?", "你好"]
    ask = dict(greedy=True, max_new_tokens=20, frequency_penalty=1.5, presence_penalty=0.5)
    expected = [tiny_bot.chat(q, **ask)[0] for q in questions]
    scheduler = BatchScheduler(tiny_bot, max_batch_size=4)
    answers = [None] * len(questions)
    try:
        def run(i):
            for text in tiny_bot.stream_text([{"role": "user", "content": questions[i]}],
                                             generate=scheduler.generate_ids, **ask):
                answers[i] = text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        scheduler.close()
    assert answers == expected
