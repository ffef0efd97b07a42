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

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from finechat.data.templates import validate_messages
from finechat.errors import FinechatError
from finechat.generate.batching import QueueFull
from finechat.serve.runs import Run, cancel_on_disconnect, chunk_builder, generation_kwargs, queue_full, sse
from finechat.serve.schemas import ApiError


async def answer(request: Any, agent: Any, submit: Any, messages: list[dict], gen: Any, model: str, stream: bool,
                 include_usage: bool) -> Any:
    """The tool runtime's answer to one chat request: a ``chat.completion``, or an event stream with ``stream``.

    ``messages`` have passed :func:`check_messages`; ``submit`` is the scheduler's, so every round of the agent's
    generation goes through the server's batches.
    """
    run = agent_run(agent, messages, gen, submit)
    rid = "chatcmpl-" + uuid.uuid4().hex
    if stream:
        return sse(request, run, chunks(run, rid, model, include_usage))
    async with cancel_on_disconnect(request, run):
        try:
            return await complete(run, rid, model)
        except QueueFull as e:
            raise queue_full(e) from None
        except Exception as e:  # noqa: BLE001  the model or scheduler failed mid-answer
            raise ApiError(503, f"generation failed: {type(e).__name__}: {e}", type="server_error",
                           code="generation_failed") from None


def check_messages(messages: list[dict]) -> None:
    """422 for a conversation the agent cannot take, now rather than as an error mid-answer."""
    try:
        validate_messages(messages)
    except FinechatError as e:
        raise ApiError(422, str(e), param="messages", code="invalid_value") from None


def agent_run(agent: Any, messages: list[dict], gen: Any, submit: Any) -> Run:
    """One request answered by the tool runtime in a worker thread; its items are the agent's events."""
    stats: dict = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "stop"}
    kwargs = generation_kwargs(gen)

    def events() -> Iterator[Any]:
        return agent.run(messages, generate=submit, stats=stats, **kwargs)

    # cancelling stops the worker at the next event, which closes the current generation (the scheduler drops it)
    return Run(events, stats, name="finechat-tools")


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
