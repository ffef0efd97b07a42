"""Log-probabilities on the llama.cpp engine: the same ``TokenScore``\\s as the PyTorch scorer, from llama.cpp's logits.

The server (``logprobs`` / ``echo``) and the lm-eval glue ask an engine for ``scorer(top_n)`` and
``score_batch(...)``; :class:`~finechat.generate.llamacpp.LlamaCppChatModel` answers with this module. The
numbers are as on the PyTorch engine: ``log_softmax`` of the raw logits in float32, no sampling setting.

Why a second llama.cpp context for scoring rather than loading the engine with ``logits_all=True``: with
``logits_all`` llama.cpp computes and copies the vocabulary-sized logits of *every* prompt position on each
``eval`` and keeps an ``n_ctx x vocabulary`` float32 array (SmolLM2-135M at 4096 tokens: 768 MiB) — a cost
every chat answer would pay although most never ask for log-probabilities. The scoring context is opened on the
first request that asks, with ``logits_all=True``; the weights are memory-mapped, so the two contexts share them
and the extra memory is the second KV cache plus the logits array. Its KV cache is float32 (llama.cpp's default
f16 moves log-probabilities by ~1e-2): an f32 GGUF then scores as the PyTorch engine does, to ~1e-5. Scoring also leaves the generating
context's KV cache alone (a conversation's history stays cached) and runs beside a generation under its own lock.
The scoring context keeps the longest common prefix between calls (a streamed answer is scored token by token
without the prompt again; lm-eval's answer choices share their context).
"""

from __future__ import annotations

import threading
from typing import Any

from finechat.errors import FinechatError
from finechat.generate.scoring import TokenScore, token_scores


class ScoringContext:
    """A ``llama_cpp.Llama`` with ``logits_all=True``, opened on first use by ``open()`` and shared under a lock."""

    def __init__(self, open_context: Any):
        self._open = open_context
        self._llm: Any = None
        self.lock = threading.Lock()

    def get(self) -> Any:
        """The scoring ``Llama`` (call with ``lock`` held)."""
        if self._llm is None:
            self._llm = self._open()
        return self._llm

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def logprob_rows(self, ids: list[int], first: int) -> Any:
        """[len(ids) - 1 - first, vocab] float32 log-probabilities of ``ids[first + 1:]``, each given the ids before it."""
        import torch

        with self.lock:
            llm = self.get()
            if len(ids) > llm.n_ctx():
                raise FinechatError(f"{len(ids)} tokens to score; the llama.cpp context holds {llm.n_ctx()} "
                                    "(load with a larger n_ctx)")
            cached = llm.input_ids[:llm.n_tokens].tolist()
            common = next((i for i, (a, b) in enumerate(zip(cached, ids)) if a != b), min(len(cached), len(ids)))
            # keep the rows of the common prefix; evaluate at least one token so the last row is fresh
            llm.n_tokens = min(common, len(ids) - 1)
            llm.eval(ids[llm.n_tokens:])
            rows = torch.from_numpy(llm.scores[first:len(ids) - 1].copy())  # logits, copied out under the lock
        return rows.log_softmax(-1)


class LlamaCppScorer:
    """Scores the tokens of one growing sequence on the scoring context (the interface of ``generate.logprobs.Scorer``)."""

    def __init__(self, context: ScoringContext, top_n: int = 0):
        self.context, self.top_n = context, top_n
        self.ids: list[int] = []

    def extend(self, new_ids: list[int]) -> list[TokenScore]:
        new_ids = [int(t) for t in new_ids]
        if not new_ids:
            return []
        full = self.ids + new_ids
        first = max(len(self.ids) - 1, 0)  # the row before the first new token (none before a sequence's first)
        scored = new_ids if self.ids else new_ids[1:]
        scores = token_scores(self.context.logprob_rows(full, first), scored, self.top_n) if scored else []
        if not self.ids:
            scores.insert(0, TokenScore(new_ids[0], None, [], True))
        self.ids = full
        return scores

    def add_context(self, new_ids: list[int]) -> None:
        """Append tokens without scoring them; llama.cpp evaluates them with the next :meth:`extend`."""
        self.ids = self.ids + [int(t) for t in new_ids]


def score_batch(context: ScoringContext, sequences: list[list[int]], starts: list[int]) -> list[list[TokenScore]]:
    """Scores of ``sequences[i][starts[i]:]`` one sequence at a time (shared prefixes are evaluated once)."""
    return [LlamaCppScorer(context).extend(ids)[start:] for ids, start in zip(sequences, starts)]
