"""finechat.generate.scoring: chunked scores equal one pass, and no chunk ever holds more than ``chunk`` rows."""

from __future__ import annotations

import math

import pytest

from finechat.generate import scoring


def _close(a, b):
    assert [s.token for s in a] == [s.token for s in b]
    for x, y in zip(a, b):
        assert (x.logprob is None) == (y.logprob is None)
        if x.logprob is not None:
            assert math.isclose(x.logprob, y.logprob, abs_tol=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_scores_equal_one_pass_and_never_hold_more_than_a_chunk(tiny_bot, monkeypatch, chunk):
    ids = tiny_bot.tokenizer("The capital of France is Paris, and the capital of Italy is Rome.")["input_ids"]
    assert len(ids) > 2 * chunk
    whole = scoring.Scorer(tiny_bot.model, top_n=3, chunk=10_000).extend(ids)
    rows = []
    real = scoring.token_scores

    def spy(logprobs, tokens, top_n):
        rows.append(logprobs.shape[0])
        return real(logprobs, tokens, top_n)

    monkeypatch.setattr(scoring, "token_scores", spy)
    scorer = scoring.Scorer(tiny_bot.model, top_n=3, chunk=chunk)
    chunked = scorer.extend(ids[:5]) + scorer.extend(ids[5:])
    _close(chunked, whole)
    assert max(rows) <= chunk  # never an [n, vocab] block


def test_a_prompt_as_context_is_not_scored_but_conditions_the_answer(tiny_bot, monkeypatch):
    ids = tiny_bot.tokenizer("One two three four five six seven eight nine ten")["input_ids"]
    prompt, answer = ids[:7], ids[7:]
    whole = scoring.Scorer(tiny_bot.model, top_n=2, chunk=3).extend(ids)
    scored = []
    real = scoring.token_scores
    monkeypatch.setattr(scoring, "token_scores", lambda lp, tokens, n: scored.append(len(tokens)) or real(lp, tokens, n))
    scorer = scoring.Scorer(tiny_bot.model, top_n=2, chunk=3)
    scorer.add_context(prompt)
    assert not scored  # the prompt's own scores are never computed
    _close(scorer.extend(answer), whole[len(prompt):])


def _cacheless_model(kind):
    """A tiny model that cannot take a transformers cache: native ChatGLM-6B (plain or with its P-Tuning v2
    prefix) or a tiny Llama under a peft prompt-learning adapter."""
    import torch

    torch.manual_seed(0)
    if kind.startswith("chatglm"):
        from test_models_chatglm_model import make_model

        model = make_model()
        if kind == "chatglm-ptuning":
            model.enable_prefix_tuning(pre_seq_len=3)
        return model.eval(), list(range(5, 40)) + [293, 290] + list(range(40, 50))  # ... [gMASK] <sop> ...
    from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model
    from tiny import make_tiny_llama

    config = (PrefixTuningConfig if kind == "prefix" else PromptEncoderConfig)(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=4)
    return get_peft_model(make_tiny_llama(), config).eval(), list(range(3, 50))


def _one_pass(model, ids):
    """Log-probabilities [len(ids), vocab] from one forward pass over ``ids`` (what the old scoring held)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return out.logits[0, -len(ids):].float().log_softmax(-1)


@pytest.mark.parametrize("kind", ["chatglm", "chatglm-ptuning", "prefix", "p-tuning"])
def test_models_without_a_cache_are_scored_in_chunks_equal_to_one_pass(kind):
    """Native ChatGLM-6B and prompt-learning adapters: never more than ``chunk`` rows of logits at once, the same
    scores as one pass. (ChatGLM's prompt is bidirectional up to <sop>: each ``extend`` scores the sequence so far
    in a pass of its own, as before.)"""
    import torch

    model, ids = _cacheless_model(kind)
    assert scoring.cache_argument(model) is None  # the case under test: no transformers cache
    cut = len(ids) - 6
    before, whole = _one_pass(model, ids[:cut]), _one_pass(model, ids)
    expected = [before[i - 1, ids[i]].item() for i in range(1, cut)] + [whole[i - 1, ids[i]].item()
                                                                        for i in range(cut, len(ids))]
    best = before[:-1].argmax(-1).tolist() + whole[cut - 1:-1].argmax(-1).tolist()
    head = scoring.output_head(model)
    rows = []
    hook = head.register_forward_hook(lambda module, args, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0]))
    try:
        scorer = scoring.Scorer(model, top_n=2, chunk=4)
        scores = scorer.extend(ids[:cut]) + scorer.extend(ids[cut:])
    finally:
        hook.remove()
    assert scores[0].logprob is None and [s.token for s in scores] == ids
    assert max(abs(s.logprob - e) for s, e in zip(scores[1:], expected)) < 1e-5
    assert [s.top[0][0] for s in scores[1:]] == best
    assert max(rows) <= 4  # the head never made more than a chunk of logits (one pass made len(ids) rows)
    assert torch.allclose(scorer._last, whole[-1], atol=1e-5)


def test_the_head_hook_leaves_other_threads_forward_passes_alone():
    """While one request is scored, another thread's forward pass on the same model keeps its whole logits."""
    import threading

    model, ids = _cacheless_model("chatglm")
    whole = _one_pass(model, ids)
    beside, started = [], []

    def another_request(module, args):
        if not started:  # once, in the middle of the scorer's forward pass (its head hook is in place)
            started.append(True)
            worker = threading.Thread(target=lambda: beside.append(_one_pass(model, ids)))
            worker.start()
            worker.join()

    hook = model.transformer.layers[0].register_forward_pre_hook(another_request)
    try:
        scores = scoring.Scorer(model, chunk=4).extend(ids)
    finally:
        hook.remove()
    assert beside[0].shape == whole.shape and scores[1].logprob == pytest.approx(whole[0, ids[1]].item(), abs=1e-5)


def test_a_forward_that_changes_the_heads_logits_is_scored_from_its_own_logits():
    """A model whose forward does more after its head (soft-capping, scaling: here a hook doubling the logits) is
    caught by the last-row check and scored from its whole logits, still equal to one pass."""
    model, ids = _cacheless_model("chatglm")

    def double(module, args, out):
        out.logits = out.logits * 2

    hook = model.register_forward_hook(double)
    try:
        whole = _one_pass(model, ids)
        scores = scoring.Scorer(model, chunk=4).extend(ids)
    finally:
        hook.remove()
    assert max(abs(s.logprob - whole[i - 1, ids[i]].item()) for i, s in enumerate(scores) if i) < 1e-5
