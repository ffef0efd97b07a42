"""Continuous batching: concurrent requests share forward passes and answer exactly as ``chat`` does."""

import json
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import LiveServer, ScriptedChat, wait_until

from finechat.generate.batching import BatchScheduler, QueueFull
from finechat.generate.engine import GenerationSettings
from finechat.serve.api import ServeSettings, create_app


@pytest.fixture(scope="module")
def varied_bot(tmp_path_factory):
    """A tiny model whose greedy answers depend on the prompt (the default tiny one repeats one token)."""
    from tiny import save_tiny_model

    import finechat

    return finechat.load(str(save_tiny_model(tmp_path_factory.mktemp("varied"), initializer_range=0.3)))


QUESTIONS = ["hello", "What is the capital of France?", "你好", "Write a short poem about the sea", "a", "中国的首都"]


def test_concurrent_greedy_answers_equal_chat_in_fewer_steps(varied_bot):
    tiny_bot = varied_bot
    scheduler = BatchScheduler(tiny_bot, max_batch_size=8)
    try:
        assert scheduler.batched
        expected = [tiny_bot.chat(q, greedy=True, max_new_tokens=24)[0] for q in QUESTIONS]
        assert len(set(expected)) == len(QUESTIONS)  # answers that a mixed-up row would change
        answers = [None] * len(QUESTIONS)

        def ask(i):
            messages = [{"role": "user", "content": QUESTIONS[i]}]
            for answers[i] in tiny_bot.stream_text(messages, generate=scheduler.generate_ids, greedy=True,
                                                   max_new_tokens=24):
                pass

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == expected
        # six answers of up to 24 tokens took far fewer than 6 x 24 forward passes
        assert scheduler.tokens > 2 * 24 and scheduler.steps < scheduler.tokens / 2
        assert wait_until(lambda: scheduler.active == 0)
    finally:
        scheduler.close()


def test_seeded_sampling_repeats_through_the_scheduler(tiny_bot):
    scheduler = BatchScheduler(tiny_bot)
    try:
        def sample(seed):
            settings = GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=seed,
                                          repetition_penalty=1.2)
            return [t for step in scheduler.generate_ids([1, 2, 3], settings) for t in step]

        a, b = sample(7), sample(7)
        assert a == b and 1 <= len(a) <= 10
        # another seed samples other tokens: the repeat above is the seed's doing, not silent greedy decoding
        assert sample(8) != a
    finally:
        scheduler.close()


def test_closing_a_stream_drops_it_from_the_batch(tiny_bot):
    scheduler = BatchScheduler(tiny_bot, max_batch_size=2, max_queue=1)
    try:
        settings = GenerationSettings(max_new_tokens=400, greedy=True)
        streams = [scheduler.submit([5, 6, 7], settings) for _ in range(3)]
        with pytest.raises(QueueFull):
            scheduler.submit([5, 6, 7], settings)
        for s in streams:
            next(s)
            s.close()
        assert wait_until(lambda: scheduler.active == 0 and scheduler.waiting == 0)
        assert scheduler.tokens < 3 * 400
    finally:
        scheduler.close()


def test_a_reader_that_stops_reading_does_not_stall_others(tiny_bot):
    srv = LiveServer(create_app(tiny_bot, ServeSettings(max_batch_size=4)))
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300,
                           "temperature": 0, "stream": True}).encode()
        stalled = socket.create_connection(("127.0.0.1", srv.port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        # never read from `stalled`; other clients still get whole answers promptly
        start = time.time()
        for _ in range(3):
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                           json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 20})
            assert r.status_code == 200
        assert time.time() - start < 20
        stalled.close()
        assert wait_until(lambda: srv.app.state.scheduler.active == 0, timeout=10)
    finally:
        srv.stop()


def test_a_lone_request_moves_into_the_batch_when_another_arrives(tiny_bot):
    scheduler = BatchScheduler(tiny_bot)
    try:
        settings = GenerationSettings(max_new_tokens=30, greedy=True)
        prompt = tiny_bot.encode_prompt(tiny_bot.build_prompt([{"role": "user", "content": "hello"}]))
        expected = [t for step in tiny_bot.generate_ids(prompt, settings) for t in step]
        first = scheduler.submit(prompt, settings)
        head = [next(first)[0] for _ in range(5)]  # running alone on the fast decoder
        assert scheduler._solo is not None
        second = scheduler.submit(prompt, settings)
        rest = [t for step in first for t in step]
        other = [t for step in second for t in step]
        assert head + rest == expected and other == expected
        assert wait_until(lambda: scheduler.active == 0)
    finally:
        scheduler.close()


@pytest.mark.parametrize("prefill_tokens", [2048, 40])
def test_requests_that_arrive_together_are_prefilled_together(varied_bot, monkeypatch, prefill_tokens):
    """Prompts of different lengths, left-padded into shared prefills, answer exactly as alone; one that
    ends at its first token leaves its group before the batch."""
    monkeypatch.setattr("finechat.generate.batching.PREFILL_TOKENS", prefill_tokens)
    tiny_bot = varied_bot
    scheduler = BatchScheduler(tiny_bot)
    groups = []
    admit_group = scheduler._admit_group
    monkeypatch.setattr(scheduler, "_admit_group", lambda seqs: groups.append(len(seqs)) or admit_group(seqs))
    try:
        prompts = [tiny_bot.encode_prompt(tiny_bot.build_prompt([{"role": "user", "content": q}])) for q in QUESTIONS]
        settings = [GenerationSettings(max_new_tokens=1 if i == 2 else 16, greedy=True) for i in range(len(prompts))]
        expected = [[t for step in tiny_bot.generate_ids(p, s) for t in step] for p, s in zip(prompts, settings)]
        assert len({len(p) for p in prompts}) > 2 and len({tuple(e) for e in expected}) == len(prompts)
        with scheduler._cond:  # the loop waits for this lock: every request is queued before it looks
            streams = [scheduler.submit(p, s) for p, s in zip(prompts, settings)]
        answers = [[t for step in stream for t in step] for stream in streams]
        assert answers == expected
        assert sum(groups) == len(prompts)
        widest = max(len(p) for p in prompts)
        assert groups == [len(prompts)] if prefill_tokens >= widest * len(prompts) else max(groups) < len(prompts)
        assert wait_until(lambda: scheduler.active == 0)
    finally:
        scheduler.close()


def test_a_full_queue_says_how_many_run_and_wait(tiny_bot):
    scheduler = BatchScheduler(tiny_bot, max_batch_size=4, max_queue=2)
    scheduler._thread = threading.current_thread()  # no scheduler loop: everything submitted stays waiting
    settings = GenerationSettings(max_new_tokens=4, greedy=True)
    for _ in range(6):
        scheduler.submit([5, 6, 7], settings)
    with pytest.raises(QueueFull, match=r"^0 requests are running and 6 waiting \(this server runs 4 together and "
                                        r"queues 2\)"):
        scheduler.submit([5, 6, 7], settings)


def test_a_request_of_many_prompts_is_admitted_all_or_nothing(tiny_bot):
    bot = ScriptedChat(tiny_bot.tokenizer, "fine", delay=0.05)
    srv = LiveServer(create_app(bot, ServeSettings(model_name="s", max_batch_size=2, max_queue=1)))
    try:
        body = {"prompt": [f"prompt {i}" for i in range(5)], "max_tokens": 3}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 429 and "this request needs 5 places" in r.json()["error"]["message"]
        assert bot.prompts == []  # nothing of it started
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
        assert srv.app.state.scheduler._reserved == 0  # every held place given back
    finally:
        srv.stop()


def test_scoring_takes_a_place_in_the_same_queue(tiny_bot):
    scheduler = BatchScheduler(tiny_bot, max_batch_size=1, max_queue=0)
    srv = LiveServer(create_app(tiny_bot, ServeSettings(model_name="tiny"), scheduler=scheduler))
    try:
        with scheduler.reserve(1):  # the one place is taken (as by a running answer)
            for path, body in (("/v1/completions", {"prompt": "hello there", "max_tokens": 0, "echo": True,
                                                    "logprobs": 2}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 2, "logprobs": True})):
                r = httpx.post(srv.url + path, json=body, timeout=60)
                assert r.status_code == 429, (path, r.text)
        scored = httpx.post(srv.url + "/v1/completions", json={"prompt": "hello there", "max_tokens": 0,
                                                               "echo": True, "logprobs": 2}, timeout=60)
        assert scored.status_code == 200 and scheduler._reserved == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("fast", [True, False])
def test_a_client_leaving_stops_a_long_prefill(tiny_bot, monkeypatch, fast):
    from finechat.generate import batching
    from finechat.models import fast_decoder

    monkeypatch.setattr(batching, "PREFILL_CHUNK", 4)
    monkeypatch.setattr(fast_decoder, "PREFILL_CHUNK", 4)
    monkeypatch.setattr(tiny_bot, "use_fast_decoder", fast)
    prompt = list(range(5, 45))  # 40 tokens: 10 chunks
    streams, fed = [], []

    def leave_after_the_first_chunk(module, args):
        fed.append(args[0].shape[1])
        if len(fed) == 1:
            assert wait_until(lambda: streams, timeout=10)
            streams[0].close()  # the client leaves while its prompt is being prefilled

    hook = tiny_bot.model.get_input_embeddings().register_forward_pre_hook(leave_after_the_first_chunk)
    scheduler = BatchScheduler(tiny_bot)
    try:
        streams.append(scheduler.submit(prompt, GenerationSettings(max_new_tokens=5, greedy=True)))
        assert wait_until(lambda: fed and scheduler.active == 0 and scheduler.waiting == 0, timeout=30)
        assert fed[0] == 4 and sum(fed) < len(prompt)  # stopped within a chunk, not after the whole prompt
        assert scheduler.tokens == 0
    finally:
        hook.remove()
        scheduler.close()


def test_chunked_prefill_gives_the_same_answer(tiny_bot, monkeypatch):
    from finechat.generate import batching
    from finechat.models import fast_decoder

    prompt = list(range(5, 45))
    settings = GenerationSettings(max_new_tokens=8, greedy=True)
    answers = {}
    for chunk in (10_000, 4):
        monkeypatch.setattr(batching, "PREFILL_CHUNK", chunk)
        monkeypatch.setattr(fast_decoder, "PREFILL_CHUNK", chunk)
        for fast in (True, False):
            monkeypatch.setattr(tiny_bot, "use_fast_decoder", fast)
            scheduler = BatchScheduler(tiny_bot)
            try:
                answers[chunk, fast] = [t for step in scheduler.generate_ids(prompt, settings) for t in step]
            finally:
                scheduler.close()
    assert len(set(map(tuple, answers.values()))) == 1, answers
