"""Log-probabilities in OpenAI's API: the request checks, the response shapes and the text-completion route.

``POST /v1/completions`` with ``logprobs: N`` answers ``choices[].logprobs = {tokens, token_logprobs,
top_logprobs, text_offset}`` for the answer's tokens; with ``echo: true`` the prompt's tokens come first (the
first one's log-probability is null, nothing precedes it), and ``max_tokens: 0`` with ``echo`` scores a prompt
without generating (what lm-evaluation-harness's ``local-completions`` asks for). ``top_logprobs`` holds the N
most likely tokens and the chosen one, best first, as vLLM answers. ``text_offset`` counts characters in the
choice's ``text``. Prompts may be a string, a list of strings, a list of token ids or a list of such lists
(one choice each, in order). ``POST /v1/chat/completions`` with ``logprobs: true, top_logprobs: N`` answers
``choices[].logprobs = {content: [{token, logprob, bytes, top_logprobs}]}``; streamed, each chunk carries the
tokens generated since the previous one.

The numbers are the model's own distribution before any sampling setting: ``log_softmax`` of the raw logits
at temperature 1, with no top-p / top-k and no repetition / presence / frequency penalty, whatever the request
samples with, from the engine's own ``scorer(top_n)`` (PyTorch: :mod:`finechat.generate.scoring`; llama.cpp:
:mod:`finechat.generate.llamacpp_logprobs`). A stop token that ended the answer is included in a text
completion's tokens (vLLM does the same; lm-eval relies on one generated token after the echo) and left out of
a chat answer's. Limits: N up to ``max_logprobs``, echo with log-probabilities up to ``max_echo_tokens``
prompt tokens; beyond them, and for ``top_logprobs`` without ``logprobs``, a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from finechat.generate.contract import ChatEngine
from finechat.generate.scoring import TokenScore
from finechat.serve import runs
from finechat.serve.schemas import ApiError, CompletionRequest, ServeSettings

DECODE_WINDOW = 6  # tokens decoded before each one to find its own text (spaces, multi-byte characters)


# -- checks -----------------------------------------------------------------------------------------------
def _count(value: Any, name: str, settings: ServeSettings) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= settings.max_logprobs:
        raise ApiError(400, f"{name} must be an integer from 0 to {settings.max_logprobs}, got {value!r}",
                       param=name, code="invalid_value")
    return value


def completion_top_n(req: Any, settings: ServeSettings) -> int | None:
    """``logprobs`` of a text-completion request: None (not asked) or how many alternatives per token."""
    return None if req.logprobs is None else _count(req.logprobs, "logprobs", settings)


def chat_top_n(req: Any, settings: ServeSettings) -> int | None:
    """``logprobs`` / ``top_logprobs`` of a chat request: None (not asked) or how many alternatives per token."""
    if req.logprobs is not None and not isinstance(req.logprobs, bool):
        raise ApiError(400, f"logprobs must be true or false, got {req.logprobs!r}", param="logprobs",
                       code="invalid_value")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return _count(req.top_logprobs, "top_logprobs", settings)
    return 0 if req.logprobs else None


def check_scorable(engine: ChatEngine, param: str) -> None:
    """A 400 when the engine cannot score tokens (a scripted double without a model); asks ``engine.scorer``."""
    make = getattr(engine, "scorer", None)
    if make is None or make(0) is None:
        raise ApiError(400, "this server's engine does not give log-probabilities", param=param,
                       code="logprobs_not_supported")


# -- shapes -----------------------------------------------------------------------------------------------
def token_texts(tokenizer: Any, ids: list[int], context: list[int] = ()) -> list[str]:
    """The text each token adds after ``context`` (a leading space, a whole character), for ``tokens``."""
    full = list(context) + list(ids)
    out = []
    for i in range(len(context), len(full)):
        start = max(0, i - DECODE_WINDOW)
        before = tokenizer.decode(full[start:i], skip_special_tokens=False)
        after = tokenizer.decode(full[start:i + 1], skip_special_tokens=False)
        out.append(after[len(before):] if after.startswith(before) else tokenizer.decode([full[i]]))
    return out


def _top(tokenizer: Any, score: TokenScore, text: str) -> list[tuple[str, float]]:
    """The alternatives and the chosen token, best first (a text seen twice keeps its better value)."""
    seen: dict[str, float] = {}
    pairs = [(tokenizer.decode([t], skip_special_tokens=False), v) for t, v in score.top] + [(text, score.logprob)]
    for name, value in sorted(pairs, key=lambda p: -p[1]):
        seen.setdefault(name, value)
    return list(seen.items())


def completion_block(tokenizer: Any, scores: list[TokenScore], context: list[int], offset: int = 0) -> dict:
    """``choices[].logprobs`` of a text completion."""
    texts = token_texts(tokenizer, [s.token for s in scores], context)
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": [None if s.logprob is None else dict(_top(tokenizer, s, t)) for s, t in zip(scores, texts)],
            "text_offset": offsets}


def chat_content(tokenizer: Any, scores: list[TokenScore], context: list[int]) -> list[dict]:
    """``choices[].logprobs.content`` of a chat answer."""
    texts = token_texts(tokenizer, [s.token for s in scores], context)

    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(t, s.logprob),
             "top_logprobs": [entry(tokenizer.decode([i], skip_special_tokens=False), v) for i, v in s.top]}
            for s, t in zip(scores, texts)]


class AnswerScores:
    """Scores of a run's answer tokens (recorded by the run in ``stats["token_ids"]``) as they are generated."""

    def __init__(self, engine: ChatEngine, prompt_ids: list[int], top_n: int, chat: bool):
        self.tokenizer, self.prompt_ids, self.chat = engine.tokenizer, list(prompt_ids), chat
        self.scorer = engine.scorer(top_n)
        self.stop_ids = set(engine.stop_token_ids()) if chat else set()
        self.done = 0  # answer tokens already scored
        self.offset = 0

    async def prompt(self) -> list[TokenScore]:
        """Scores of the prompt's tokens (the first one None); always run first."""
        return await asyncio.to_thread(self.scorer.extend, self.prompt_ids)

    async def take(self, stats: dict) -> list[TokenScore]:
        """Scores of the answer tokens generated since the last call (a chat answer leaves its stop token out)."""
        ids = list(stats.get("token_ids", ()))
        new = [t for t in ids[self.done:] if t not in self.stop_ids]
        self.done = len(ids)
        return await asyncio.to_thread(self.scorer.extend, new) if new else []

    async def chat_delta(self, stats: dict) -> dict:
        scores = await self.take(stats)
        return {"content": chat_content(self.tokenizer, scores, self.scorer.ids[:len(self.scorer.ids) - len(scores)])}

    async def completion_delta(self, stats: dict) -> dict:
        scores = await self.take(stats)
        block = completion_block(self.tokenizer, scores, self.scorer.ids[:len(self.scorer.ids) - len(scores)],
                                 self.offset)
        self.offset += sum(len(t) for t in block["tokens"])
        return block


# -- the text-completion route ----------------------------------------------------------------------------
def prompt_list(engine: ChatEngine, prompt: Any) -> list[tuple[str, list[int]]]:
    """Each prompt of a request as (text, token ids); token ids are checked against the vocabulary."""
    tokenizer = engine.tokenizer
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
    vocab = max(len(tokenizer), getattr(getattr(getattr(engine, "model", None), "config", None), "vocab_size", 0) or 0)
    out = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            ids = tokenizer(item)["input_ids"] if item else [tokenizer.bos_token_id or tokenizer.eos_token_id]
            out.append((item, ids))
            continue
        bad = next((t for t in item if not 0 <= t < vocab), None)
        if not item or bad is not None:
            raise ApiError(400, f"prompt.{i}: token ids must be a non-empty list of ids from 0 to {vocab - 1}"
                           + (f", got {bad}" if bad is not None else ""), param="prompt", code="invalid_value")
        out.append((tokenizer.decode(item, skip_special_tokens=False), list(item)))
    return out


async def completions(request: Any, req: CompletionRequest, routes: Any) -> Any:
    """``POST /v1/completions``: text, echo and log-probabilities for each prompt (one choice each)."""
    engine, settings = routes.engine, routes.settings
    top_n = completion_top_n(req, settings)
    prompts = prompt_list(engine, req.prompt)
    if req.stream and len(prompts) > 1:
        raise ApiError(400, "stream takes one prompt (send several prompts without stream)", param="stream",
                       code="invalid_value")
    if top_n is not None:
        check_scorable(engine, "logprobs")
    planned = []  # every prompt is checked before any generation starts
    for text, ids in prompts:
        if req.echo and top_n is not None and len(ids) > settings.max_echo_tokens:
            raise ApiError(400, f"echo with logprobs scores at most {settings.max_echo_tokens} prompt tokens; this "
                           f"prompt has {len(ids)}", param="echo", code="context_length_exceeded")
        gen = routes._generation(req, req.max_tokens or None)
        if req.max_tokens == 0:  # score only: the prompt must fit, nothing is generated
            most = routes.limit.max_prompt
            if most and len(ids) > most:
                raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most {most}",
                               param="prompt", code="context_length_exceeded")
            planned.append((text, ids, None))
        else:
            planned.append((text, ids, routes.limit.fit(ids, gen, req.max_tokens is not None)))
    started = [(text, ids, None if gen is None else runs.start_text_run(engine, routes.scheduler, [], ids, gen))
               for text, ids, gen in planned]
    rid, model = "cmpl-" + uuid.uuid4().hex, settings.model_name
    if req.stream:
        text, ids, run = started[0]
        if run is None:
            run = runs.Run(_nothing, {"prompt_tokens": len(ids), "completion_tokens": 0, "finish_reason": "length"})
        scores = AnswerScores(engine, ids, top_n, chat=False) if top_n is not None else None
        prefix_block = None
        if scores is not None:
            prompt_scores = await scores.prompt()
            if req.echo:
                prefix_block = completion_block(engine.tokenizer, prompt_scores, [])
                scores.offset = sum(len(t) for t in prefix_block["tokens"])
        return runs.sse(request, run, runs.completion_chunks(
            run, rid, model, text if req.echo else "", req.include_usage,
            logprobs=scores.completion_delta if scores else None, prefix_logprobs=prefix_block))
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for index, (text, ids, run) in enumerate(started):
        answer = await run.final(request) if run is not None else ""
        stats = run.stats if run is not None else {"prompt_tokens": len(ids), "completion_tokens": 0,
                                                   "finish_reason": "length"}
        block = None
        if top_n is not None:
            scores = AnswerScores(engine, ids, top_n, chat=False)
            prompt_scores = await scores.prompt()
            answer_scores = await scores.take(stats)
            block = completion_block(engine.tokenizer, prompt_scores + answer_scores, []) if req.echo else \
                completion_block(engine.tokenizer, answer_scores, ids)
        choices.append({"index": index, "text": (text if req.echo else "") + answer,
                        "finish_reason": stats["finish_reason"], "logprobs": block})
        usage["prompt_tokens"] += stats["prompt_tokens"]
        usage["completion_tokens"] += stats["completion_tokens"]
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def _nothing() -> Any:
    yield from ()
