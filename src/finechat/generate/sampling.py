"""Picking the next token: transformers' logits processors in their order and formulas, on explicit generators.

One sampler for every path that does not run transformers' ``generate`` (the fast batch-1 decoder and the
batch scheduler), so their answers match ``generate``'s: repetition penalty, OpenAI's presence / frequency
penalties, temperature, top-k, top-p, then a draw from an explicit ``torch.Generator`` (a seed repeats an
answer without touching the global RNG). :func:`generate_kwargs` is the other direction: the same settings
as keyword arguments for ``generate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.generation.logits_process import LogitsProcessor

from finechat.generate.settings import GenerationSettings


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as ``RepetitionPenaltyLogitsProcessor``: divide positive, multiply negative scores."""
    score = torch.gather(logits, 1, seen)  # [batch, seen]
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def apply_answer_penalties(logits: torch.Tensor, answer: torch.Tensor, presence: float,
                           frequency: float) -> torch.Tensor:
    """OpenAI's presence / frequency penalties over the tokens generated so far (``answer`` [batch, n]).

    score[j] -= frequency * count[j] + presence * (count[j] > 0); the prompt does not count.
    """
    if answer.shape[1] == 0 or not (presence or frequency):
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, answer, torch.ones_like(answer, dtype=logits.dtype))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


class AnswerPenalties(LogitsProcessor):
    """:func:`apply_answer_penalties` as a transformers logits processor (the answer starts at ``prompt_length``)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return apply_answer_penalties(scores, input_ids[:, self.prompt_length:], self.presence, self.frequency)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering, as transformers' warpers do them."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k > 0:
        k = min(top_k, logits.shape[-1])
        threshold = torch.topk(logits, k)[0][..., -1, None]
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(1, sorted_index, remove), -float("inf"))
    return logits


def pick_next_token(logits: torch.Tensor, seen: torch.Tensor | None, do_sample: bool, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    generator: torch.Generator | None = None, answer: torch.Tensor | None = None,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> torch.Tensor:
    """logits [batch, vocab] float32 -> next tokens [batch, 1]. ``seen``: prompt + answer; ``answer``: answer."""
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if answer is not None and (presence_penalty or frequency_penalty):
        logits = apply_answer_penalties(logits, answer, presence_penalty, frequency_penalty)
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def next_token(logits: torch.Tensor, settings: GenerationSettings, seen: torch.Tensor, answer: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
    """:func:`pick_next_token` with the sampling fields of ``settings``; logits [batch, vocab] -> [batch, 1]."""
    return pick_next_token(logits, seen, settings.do_sample, settings.temperature, settings.top_k, settings.top_p,
                           settings.repetition_penalty, generator, answer, settings.presence_penalty,
                           settings.frequency_penalty)


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """An explicit random generator for sampling: seeded when asked, else from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@contextlib.contextmanager
def seeded_global_rng(seed: int | None, device: torch.device | str) -> Iterator[None]:
    """Seeds torch's global random generator (the one transformers' ``generate`` samples from) for the block and
    puts its state back afterwards, so a seeded request leaves the caller's random state as it was."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        yield


def generate_kwargs(settings: GenerationSettings, prompt_length: int, stop_token_ids: list[int],
                    pad_token_id: int | None) -> dict[str, Any]:
    """``settings`` as keyword arguments of transformers' ``generate`` for prompts ``prompt_length`` tokens wide.

    Stops at ``stop_token_ids``; pads with ``pad_token_id``, or the first stop token when the tokenizer has none.
    """
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens_for(prompt_length),
        "do_sample": settings.do_sample,
        "eos_token_id": stop_token_ids or None,
        "pad_token_id": pad_token_id if pad_token_id is not None else (stop_token_ids or [0])[0],
        "repetition_penalty": settings.repetition_penalty,
    }
    if settings.presence_penalty or settings.frequency_penalty:
        kwargs["logits_processor"] = [AnswerPenalties(prompt_length, settings.presence_penalty,
                                                      settings.frequency_penalty)]
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs
