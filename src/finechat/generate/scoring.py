"""Log-probabilities of tokens under a model's own distribution: scoring prompts and answers token by token.

Used by the server (``logprobs`` / ``echo`` in OpenAI's API) and by the lm-evaluation-harness glue
(log-likelihoods of answer choices). A score is ``log_softmax`` of the model's raw logits, in float32, for the
token that follows the tokens before it: no temperature, top-k / top-p or penalties, so the number does not
depend on how the answer was sampled (what vLLM calls "raw logprobs"). It is the same for every engine the
server runs (``generate``, the fast decoder, the batch scheduler): rather than threading a side channel through
each decoder, the scores come from a forward pass over prompt + answer, which gives the distribution each token
was drawn from (up to float rounding between a padded batch and a single sequence).

Why our own: transformers' ``generate(output_logits=True)`` covers only its own path and not prompts; lm-eval's
``hf`` backend loads its own model. This module works on whatever ``finechat.models.resolve`` returned (base, peft
adapter, quantized, native ChatGLM-6B).

Long sequences are scored in chunks over a KV cache, each chunk reduced to its scores before the next runs, so
that at most ``chunk`` x vocabulary logits are held at once (never ``[n, vocab]``); a prompt whose own scores are
not wanted goes through :meth:`Scorer.add_context`, which keeps only the last position's logits. Models that cannot
take a transformers cache (native ChatGLM-6B, whose prompt is bidirectional up to ``<sop>``, and prompt-learning
adapters, whose virtual tokens live in the cache) run one forward pass over the sequence, but their output head
is held to the last position by a forward pre-hook; the final hidden states [n, hidden] it saw are then put
through the head ``chunk`` rows at a time, so these too never hold [n, vocab]. A model whose forward changes the
head's output afterwards (logit soft-capping, scaling: the last row then differs from the head's own) is scored
from its whole logits instead, the one case left unbounded.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from collections.abc import Iterator
from typing import Any

# positions scored per forward pass over a cache: a [128, vocab] float32 block at a time (25 MB for a 49k
# vocabulary; the logits, their float copy and log_softmax make ~3 such blocks at the peak)
CHUNK = 128


@dataclasses.dataclass
class TokenScore:
    """One token's score: its log-probability given the tokens before it and the most likely alternatives."""

    token: int
    logprob: float | None  # None for a sequence's first token (nothing comes before it)
    top: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # best first
    greedy: bool = True  # the token is the most likely one


class Scorer:
    """Scores the tokens of one growing sequence: ``extend(ids)`` returns the scores of the new tokens.

    With a cache, each call runs the model over the new tokens only (the server scores an answer as it
    streams); without one it runs over the whole sequence again.
    """

    def __init__(self, model: Any, top_n: int = 0, chunk: int = CHUNK):
        self.model, self.top_n, self.chunk = model, top_n, chunk
        self.ids: list[int] = []
        self._cache: Any = None
        self._cache_name = cache_argument(model)
        self._last: Any = None  # [vocab] log-probs of the next token after self.ids

    def extend(self, new_ids: list[int]) -> list[TokenScore]:
        """Scores of ``new_ids`` appended to the sequence; with a cache, ``chunk`` positions at a time, each
        chunk reduced to its scores before the next runs, so no [len, vocab] block is ever held whole."""
        import torch

        new_ids = [int(t) for t in new_ids]
        if not new_ids:
            return []
        scores: list[TokenScore] = []
        with torch.inference_mode():
            if self._cache_name is None:
                every = self.ids + new_ids
                if not self.ids:
                    scores.append(TokenScore(new_ids[0], None, [], True))
                for start, logprobs in self._uncached_rows(every, max(len(self.ids) - 1, 0)):
                    targets = every[start + 1:start + 1 + logprobs.shape[0]]  # row r scores token r + 1
                    scores.extend(token_scores(logprobs[:len(targets)], targets, self.top_n))
                    if start + logprobs.shape[0] == len(every):
                        self._last = logprobs[-1].clone()
                    del logprobs
            else:
                for start in range(0, len(new_ids), self.chunk):
                    part = new_ids[start:start + self.chunk]
                    logprobs = self._cached(part)  # [len(part), vocab]
                    before = self._last[None] if self._last is not None else logprobs[:1] * float("nan")
                    scores.extend(token_scores(torch.cat([before, logprobs[:-1]]), part, self.top_n))
                    self._last = logprobs[-1].clone()
                    del logprobs
        if not self.ids:
            scores[0] = TokenScore(new_ids[0], None, [], True)
        self.ids.extend(new_ids)
        return scores

    def add_context(self, new_ids: list[int]) -> None:
        """Append ``new_ids`` without scoring them (a prompt whose own scores nobody asked for): with a cache,
        only the last position's logits are computed (``logits_to_keep=1``), ``chunk`` tokens a pass."""
        import torch

        new_ids = [int(t) for t in new_ids]
        if not new_ids:
            return
        if self._cache_name is None:
            self.extend(new_ids)
            return
        with torch.inference_mode():
            for start in range(0, len(new_ids), self.chunk):
                self._last = self._cached(new_ids[start:start + self.chunk], last_only=True)[-1]
        self.ids.extend(new_ids)

    def _cached(self, ids: list[int], last_only: bool = False) -> Any:
        import torch
        from transformers import DynamicCache

        device = model_device(self.model)
        if self._cache is None:
            self._cache = DynamicCache()
        start = self._cache.get_seq_length()
        x = torch.tensor([ids], device=device)
        positions = torch.arange(start, start + len(ids), device=device)[None]
        keep = {"logits_to_keep": 1} if last_only else {}
        out = self.model(input_ids=x, position_ids=positions, use_cache=True,
                         attention_mask=torch.ones(1, start + len(ids), dtype=torch.long, device=device),
                         **keep, **{self._cache_name: self._cache})
        return out.logits[0].float().log_softmax(-1)  # [len(ids), vocab] ([1, vocab] with last_only)

    def _uncached_rows(self, ids: list[int], first: int) -> Iterator[tuple[int, Any]]:
        """Log-probabilities of positions ``first..len(ids)-1`` of a model without a cache, as (start, [rows, vocab])
        blocks of at most ``chunk`` rows: one forward pass with the head held to the last position, then the head
        over the final hidden states a chunk at a time."""
        import torch

        device = model_device(self.model)
        x = torch.tensor([ids], device=device)
        head = output_head(self.model)
        seen: list[Any] = []
        me = threading.get_ident()

        def last_position_only(module: Any, args: tuple) -> tuple | None:
            if threading.get_ident() != me:
                return None  # another request's forward pass on the shared model runs untouched
            seen.append(args[0])  # [batch, positions, hidden]: the final hidden states
            return (args[0][:, -1:], *args[1:])

        handle = head.register_forward_pre_hook(last_position_only) if head is not None else None
        try:
            out = self.model(input_ids=x, attention_mask=torch.ones_like(x))
        finally:
            if handle is not None:
                handle.remove()
        hidden = seen[-1][0, -len(ids):] if len(seen) == 1 and seen[0].shape[1] >= len(ids) else None  # [n, hidden]
        if hidden is None or not torch.allclose(head(hidden[-1:]).float()[0], out.logits[0, -1].float(),
                                                rtol=1e-3, atol=1e-3):
            # the forward does more to the logits than its head (or calls it oddly): score from the whole logits
            out = self.model(input_ids=x, attention_mask=torch.ones_like(x))
            logprobs = out.logits[0, -len(ids):].float().log_softmax(-1)  # [len(ids), vocab]
            for start in range(first, len(ids), self.chunk):
                yield start, logprobs[start:start + self.chunk]
            return
        del out
        for start in range(first, len(ids), self.chunk):
            yield start, head(hidden[start:start + self.chunk]).float().log_softmax(-1)  # [chunk, vocab]


def score_sequence(model: Any, ids: list[int], start: int = 1, top_n: int = 0) -> list[TokenScore]:
    """Scores of ``ids[start:]``, each given the tokens before it (``start=0`` also gives the first: None)."""
    scores = Scorer(model, top_n).extend(ids)
    return scores[start:]


def score_batch(model: Any, sequences: list[list[int]], starts: list[int], pad_id: int = 0) -> list[list[TokenScore]]:
    """Scores of ``sequences[i][starts[i]:]`` for several sequences in one right-padded forward pass.

    For the evaluation harness (many short context + choice sequences). Models that cannot take padding
    (native ChatGLM-6B's own masks, prompt-learning adapters) are scored one sequence at a time.
    """
    import torch

    if len(sequences) == 1 or cache_argument(model) is None:
        return [score_sequence(model, ids, start) for ids, start in zip(sequences, starts)]
    device = model_device(model)
    width = max(len(ids) for ids in sequences)
    x = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in sequences], device=device)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences], device=device)
    with torch.inference_mode():
        logits = model(input_ids=x, attention_mask=mask).logits  # [batch, width, vocab]
        out = []
        for row, (ids, start) in enumerate(zip(sequences, starts)):
            start = max(start, 1)
            rows = logits[row, start - 1:len(ids) - 1].float().log_softmax(-1)  # [len - start, vocab]
            out.append(token_scores(rows, ids[start:], 0))
    return out


def token_scores(logprobs: Any, tokens: list[int], top_n: int) -> list[TokenScore]:
    """``TokenScore`` of each token from its row of log-probabilities [tokens, vocab]."""
    import torch

    if not tokens:
        return []
    index = torch.tensor(tokens, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, index)[:, 0].tolist()
    best = logprobs.max(-1)
    k = max(top_n, 1)
    top_values, top_ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    greedy = (logprobs.gather(1, index)[:, 0] >= best.values).tolist()
    return [TokenScore(t, lp, list(zip(ids, vals))[:top_n], g)
            for t, lp, ids, vals, g in zip(tokens, chosen, top_ids, top_values, greedy)]


def cache_argument(model: Any) -> str | None:
    """The name under which ``model``'s forward takes a transformers cache, or None when it cannot take one.

    transformers 5 renamed ``past_key_values`` to ``cache``. Native ChatGLM-6B keeps its own cache format and
    prompt-learning adapters put virtual tokens in the cache: those are scored without one.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - the engine needs transformers anyway
        return None
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel) or getattr(base.config, "model_type", None) == "chatglm":
        return None
    parameters = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def output_head(model: Any) -> Any:
    """The module that turns final hidden states into logits (under a peft wrapper too), or None."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else None


def model_device(model: Any) -> Any:
    return next(model.parameters()).device
