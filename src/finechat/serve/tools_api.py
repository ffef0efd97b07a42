"""Server-side tools for ``/v1/chat/completions`` (``finechat serve --tools calculator,solver,search``).

When the server was started with tools and a request brings no ``tools`` of its own, the answer is produced
by the tool runtime (:class:`finechat.tools.agent.Agent`): the model's calls run inside the server and the
client receives the final answer. A request that does pass ``tools`` gets the standard OpenAI flow instead
(``tool_calls`` back to the client, which runs them).

What ran is reported alongside the standard fields, so OpenAI clients ignore it and the web page can
show it folded: the non-streaming message carries ``finechat_tool_calls`` (``[{id, name, arguments, result,
ok}]``) and a stream sends, between content deltas, ``delta.finechat_tool`` objects
(``{"type": "call", id, name, arguments}`` then ``{"type": "result", id, name, content, ok}``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from finechat.data.templates import validate_messages
from finechat.errors import FinechatError
from finechat.serve.runs import Run, cancel_on_disconnect, chunk_builder, generation_kwargs, sse, submit_now
from finechat.serve.schemas import ApiError, PromptLimit
from finechat.tools import toolcalls
from finechat.tools.agent import Agent


async def answer(request: Any, agent: Agent, submit: Any, messages: list[dict], gen: Any, limit: PromptLimit,
                 explicit: bool, model: str, stream: bool, include_usage: bool) -> Any:
    """The tool runtime's answer to one chat request: a ``chat.completion``, or an event stream with ``stream``.

    ``messages`` have passed :func:`check_messages`; ``submit`` is the scheduler's, so every round of the agent's
    generation goes through the server's batches. The first round's prompt is checked against ``limit`` (400)
    and queued (429 when full) before the answer starts, as on the plain path.
    """
    rounds = Rounds(submit, limit)
    gen = rounds.start(first_prompt_ids(agent, messages), gen, explicit)
    run = agent_run(agent, messages, gen, rounds)
    rid = "chatcmpl-" + uuid.uuid4().hex
    if stream:
        return sse(request, run, chunks(run, rid, model, include_usage))
    async with cancel_on_disconnect(request, run):
        try:
            return await complete(run, rid, model)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001  the model or scheduler failed mid-answer
            raise ApiError(503, f"generation failed: {type(e).__name__}: {e}", type="server_error",
                           code="generation_failed") from None


def check_messages(messages: list[dict]) -> None:
    """422 for a conversation the agent cannot take, now rather than as an error mid-answer."""
    try:
        validate_messages(messages)
    except FinechatError as e:
        raise ApiError(422, str(e), param="messages", code="invalid_value") from None


def first_prompt_ids(agent: Agent, messages: list[dict]) -> list[int]:
    """The prompt of the agent's first round, built as the agent builds it (422 when the template refuses)."""
    bot = agent.bot
    try:
        messages, _ = agent.prepare(messages)  # the engine's hooks, once, as the agent applies them
        if agent.protocol == "moss":
            return bot.encode_prompt(agent.moss_prompt(messages))
        prompt_messages, template_tools = toolcalls.prepare(bot, messages, agent.tools.openai_schemas())
        return bot.encode_prompt(bot.build_prompt(prompt_messages, template_tools, hooks=False))
    except Exception as e:  # a Jinja template that rejects this conversation  # noqa: BLE001
        raise ApiError(422, f"the model's chat template cannot render these messages: {e}", param="messages",
                       code="invalid_value") from None


class Cancelled(Exception):
    """The request was cancelled (its client left, or the server is stopping) before this round."""


class Rounds:
    """The agent's ``generate``: each round of one answer through the server's queue and prompt limit, cancellable.

    :meth:`start` queues the first round before the answer starts; a later round (its prompt grows with the
    tool results) is checked against the limit again, its ``max_tokens`` shrunk to the room left. :meth:`cancel`
    closes the round being generated and refuses the next, so a client that leaves stops the tool loop within
    a token, even mid-round while the agent has nothing to show (a tool call being written).
    """

    def __init__(self, submit: Callable[..., Any], limit: PromptLimit):
        self.submit, self.limit = submit, limit
        self._first: tuple[list[int], Any] | None = None
        self._current: Any = None
        self._cancelled = threading.Event()
        self._state_lock = threading.Lock()

    def start(self, prompt_ids: list[int], gen: Any, explicit: bool) -> Any:
        """Check and queue the first round now; returns ``gen`` fitted to the prompt."""
        gen = self.limit.fit(prompt_ids, gen, explicit)
        self._first = (list(prompt_ids), submit_now(self.submit, prompt_ids, gen))
        return gen

    def __call__(self, prompt_ids: list[int], settings: Any) -> Any:
        with self._state_lock:
            if self._cancelled.is_set():
                raise Cancelled("the request was cancelled")
            first, self._first = self._first, None
            if first is not None and first[0] == list(prompt_ids):
                stream = first[1]
            else:
                if first is not None:
                    first[1].close()
                stream = submit_now(self.submit, prompt_ids, self.limit.fit(prompt_ids, settings, False))
            self._current = stream
            return stream

    def cancel(self) -> None:
        with self._state_lock:
            self._cancelled.set()
            for stream in (self._current, self._first[1] if self._first else None):
                if stream is not None:
                    stream.close()


def agent_run(agent: Agent, messages: list[dict], gen: Any, rounds: Rounds) -> Run:
    """One request answered by the tool runtime in a worker thread; its items are the agent's events."""
    stats: dict = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "stop"}
    kwargs = generation_kwargs(gen)

    def events() -> Iterator[Any]:
        return agent.run(messages, generate=rounds, stats=stats, **kwargs)

    # cancelling closes the round being generated (the scheduler drops it) and stops the worker at its next event
    # (and at the end, a first round queued ahead that the agent never took)
    return Run(events, stats, on_cancel=rounds.cancel, on_end=rounds.cancel, name="finechat-tools")


def _trace_entry(event: Any) -> dict:
    return {"id": event.call_id, "name": event.name, "arguments": event.arguments}


async def complete(run: Run, rid: str, model: str) -> dict:
    """The whole answer as a ``chat.completion`` with the tool calls that ran."""
    trace: dict[str, dict] = {}
    text = ""
    async for event in run.items():
        if event.kind == "tool_call":
            trace[event.call_id] = _trace_entry(event)
        elif event.kind == "tool_result":
            trace.setdefault(event.call_id, _trace_entry(event)).update(result=event.text, ok=event.ok)
        elif event.kind == "done":
            text = event.text
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if trace:
        message["finechat_tool_calls"] = list(trace.values())
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": run.stats["finish_reason"],
                         "logprobs": None}],
            "usage": run.usage()}


async def chunks(run: Run, rid: str, model: str, include_usage: bool) -> AsyncIterator[dict]:
    """``chat.completion.chunk`` events: content deltas, with the tool calls and results between them."""
    chunk = chunk_builder(rid, model, include_usage)
    yield chunk({"role": "assistant", "content": ""})
    finish = "stop"
    try:
        async for event in run.items():
            if event.kind == "text" and event.text:
                yield chunk({"content": event.text})
            elif event.kind == "tool_call":
                yield chunk({"finechat_tool": {"type": "call", **_trace_entry(event)}})
            elif event.kind == "tool_result":
                yield chunk({"finechat_tool": {"type": "result", "id": event.call_id, "name": event.name,
                                               "content": event.text, "ok": event.ok}})
        finish = run.stats["finish_reason"]
    except Exception as e:  # noqa: BLE001  headers are sent: report in the stream
        yield chunk({"content": f"\n[error: {type(e).__name__}: {e}]"})
        finish = "error"
    yield chunk({}, finish)
    if include_usage:
        yield chunk(usage=run.usage())
