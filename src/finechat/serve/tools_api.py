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

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from finechat.errors import FinechatError
from finechat.serve.api import _Run, chunk_builder


class AgentRun(_Run):
    """One request answered by the tool runtime in a worker thread; its events come out of ``texts()``."""

    def __init__(self, agent: Any, messages: list[dict], gen: Any, submit: Any):  # noqa: D107 (no super: no stream)
        import dataclasses

        self.stats: dict = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "stop"}
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        fields = {f.name: getattr(gen, f.name) for f in dataclasses.fields(gen)}
        fields.pop("greedy", None)  # do_sample already says it

        def work() -> None:
            events = agent.run(messages, generate=submit, stats=self.stats, **fields)
            try:
                for event in events:
                    if self._cancel.is_set():
                        break
                    self._put(("text", event))
                self._put(("end", None))
            except BaseException as e:  # noqa: BLE001  handed to the request
                self._put(("error", e))
            finally:
                events.close()  # closes the current generation (the scheduler drops it)

        threading.Thread(target=work, name="finechat-tools", daemon=True).start()

    def cancel(self) -> None:
        self._cancel.set()  # the worker stops at the next event and closes its generation


def _trace_entry(event: Any) -> dict:
    return {"id": event.call_id, "name": event.name, "arguments": event.arguments}


async def complete(run: AgentRun, rid: str, model: str) -> dict:
    """The whole answer as a ``chat.completion`` with the tool calls that ran."""
    trace: dict[str, dict] = {}
    answer = ""
    async for event in run.texts():
        if event.kind == "tool_call":
            trace[event.call_id] = _trace_entry(event)
        elif event.kind == "tool_result":
            trace.setdefault(event.call_id, _trace_entry(event)).update(result=event.text, ok=event.ok)
        elif event.kind == "done":
            answer = event.text
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    if trace:
        message["finechat_tool_calls"] = list(trace.values())
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": run.stats["finish_reason"],
                         "logprobs": None}],
            "usage": run.usage()}


async def chunks(run: AgentRun, rid: str, model: str, include_usage: bool) -> AsyncIterator[dict]:
    """``chat.completion.chunk`` events: content deltas, with the tool calls and results between them."""
    chunk = chunk_builder(rid, model, include_usage)
    yield chunk({"role": "assistant", "content": ""})
    finish = "stop"
    try:
        async for event in run.texts():
            if event.kind == "text" and event.text:
                yield chunk({"content": event.text})
            elif event.kind == "tool_call":
                yield chunk({"finechat_tool": {"type": "call", **_trace_entry(event)}})
            elif event.kind == "tool_result":
                yield chunk({"finechat_tool": {"type": "result", "id": event.call_id, "name": event.name,
                                               "content": event.text, "ok": event.ok}})
        finish = run.stats["finish_reason"]
    except (FinechatError, Exception) as e:  # noqa: BLE001  headers are sent: report in the stream
        yield chunk({"content": f"\n[error: {type(e).__name__}: {e}]"})
        finish = "error"
    yield chunk({}, finish)
    if include_usage:
        yield chunk(usage=run.usage())
