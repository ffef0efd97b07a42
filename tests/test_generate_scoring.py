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
