"""One request's answer while it is generated: a worker thread feeding asyncio, and the responses built from it.

Generation is blocking code (the engine's ``stream_text``, the tool agent's ``run``), so a :class:`Run` drives it
in a worker thread and hands each item to the event loop through an ``asyncio.Queue``. A client that goes away
cancels the run, and the scheduler drops its sequence before the next step. The rest of the module turns a
run into a server-sent event stream of ``chat.completion.chunk`` / ``text_completion`` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from finechat.errors import FinechatError
from finechat.generate.batching import BatchScheduler, QueueFull, SchedulerClosed
from finechat.generate.contract import ChatEngine
from finechat.serve.schemas import ApiError
from finechat.tools import toolcalls


class Run:
    """Items of a blocking generator, produced in a worker thread and read with ``async for`` from asyncio.

    ``produce()`` builds the generator inside the thread (so its errors reach the request too). ``on_cancel``
    stops the work underneath at once when the request is cancelled; ``on_end`` runs in the thread at the end.
    ``stats`` is shared with the producer (``prompt_tokens``, ``completion_tokens``, ``finish_reason``).
    """

    def __init__(self, produce: Callable[[], Iterator], stats: dict, on_cancel: Callable[[], None] | None = None,
                 on_end: Callable[[], None] | None = None, name: str = "finechat-request"):
        self.stats = stats
        self._on_cancel = on_cancel
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        threading.Thread(target=self._work, args=(produce, on_end), name=name, daemon=True).start()

    def _work(self, produce: Callable[[], Iterator], on_end: Callable[[], None] | None) -> None:
        items = None
        try:
            items = produce()
            for item in items:
                if self._cancel.is_set():
                    break
                self._put(("item", item))
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001  handed to the request
            self._put(("error", e))
        finally:
            if items is not None:
                items.close()  # a generation still running stops here (the scheduler drops it)
            if on_end is not None:
                on_end()

    def _put(self, item: tuple) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopping)
            self.cancel()

    def cancel(self) -> None:
        """Stop generating: the worker stops at its next item."""
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def abort(self, error: Exception) -> None:
        """Stop generating and end the items with ``error`` (called on the event loop)."""
        self.cancel()
        self._queue.put_nowait(("error", error))

    async def items(self) -> AsyncIterator[Any]:
        """The items as they come; cancels generation when the consumer stops early."""
        try:
            while True:
                kind, value = await self._queue.get()
                if kind == "item":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            self.cancel()

    async def final(self, request: Any) -> Any:
        """The last item (a text run's whole answer); stops generating if the client disconnects while waiting."""
        last = ""
        async with cancel_on_disconnect(request, self):
            try:
                async for last in self.items():
                    pass
            except FinechatError as e:
                raise ApiError(503, f"generation failed: {e}", type="server_error", code="generation_failed") from None
        return last

    def usage(self) -> dict:
        p, c = self.stats["prompt_tokens"], self.stats["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def generation_kwargs(gen: Any) -> dict:
    """``GenerationSettings`` as keyword arguments for ``stream_text`` / ``Agent.run``."""
    fields = {f.name: getattr(gen, f.name) for f in dataclasses.fields(gen)}
    fields.pop("greedy", None)  # from_kwargs would re-derive it; do_sample already says it
    return fields


def start_text_run(engine: ChatEngine, scheduler: BatchScheduler, messages: list[dict], prompt_ids: list[int], gen: Any) -> Run:
    """Queue the request now (so a full queue is a 429 before any answer starts) and stream its growing text.

    The text comes from ``engine.stream_text`` (stop strings, post-processing: the answer of ``chat``) over the
    scheduler's stream of tokens.
    """
    stream = submit_now(scheduler.submit, prompt_ids, gen)
    stats = {"prompt_tokens": len(prompt_ids), "completion_tokens": 0, "finish_reason": "stop"}
    kwargs = generation_kwargs(gen)

    def recorded(ids: list[int], settings: Any) -> Iterator[list[int]]:
        # the answer's token ids, for log-probabilities (serve.logprobs)
        tokens = stats.setdefault("token_ids", [])
        for step in stream:
            tokens.extend(step)
            yield step

    def texts() -> Iterator[str]:
        return engine.stream_text(messages, generate=recorded, stats=stats, prompt_ids=prompt_ids, **kwargs)

    # closing the stream makes the scheduler drop the sequence before its next step
    return Run(texts, stats, on_cancel=stream.close, on_end=stream.close)


def submit_now(submit: Callable[..., Any], prompt_ids: list[int], gen: Any) -> Any:
    """``submit(prompt_ids, gen)`` (the scheduler's), with a full queue as a 429 and a stopping server as a 503."""
    try:
        return submit(prompt_ids, gen)
    except QueueFull as e:
        raise queue_full(e) from None
    except SchedulerClosed as e:
        raise shutting_down(str(e)) from None


def queue_full(e: QueueFull) -> ApiError:
    return ApiError(429, str(e), code="queue_full", type="rate_limit_error", headers={"Retry-After": str(e.retry_after)})


def shutting_down(message: str = "the server is shutting down") -> ApiError:
    return ApiError(503, message, code="shutting_down", type="server_error", headers={"Retry-After": "5"})


class Drain:
    """The server stopping: requests still running ``after`` seconds from :meth:`begin` end with a 503.

    ``finechat.serve.server`` calls :meth:`begin` on SIGTERM / Ctrl-C, a little before uvicorn's own deadline,
    at which uvicorn would cancel the requests (a plain-text 500, a stream cut short).
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expired: asyncio.Event | None = None

    def bind(self) -> None:
        """At startup, on the server's event loop."""
        self._loop, self._expired = asyncio.get_running_loop(), asyncio.Event()

    def begin(self, after: float) -> None:
        """From any thread (a signal handler): end the running requests ``after`` seconds from now."""
        loop, expired = self._loop, self._expired
        if loop is not None and expired is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.call_later, after, expired.set)

    async def expired(self) -> None:
        if self._expired is None:
            await asyncio.Event().wait()  # never bound: never expires
        await self._expired.wait()


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Any, run: Run) -> AsyncIterator[None]:
    """Within the block, cancel ``run`` when the client goes away, and end it with a 503 when the server's
    drain expires (see :class:`Drain`)."""
    watcher = asyncio.ensure_future(_watch(request, run, getattr(request.app.state, "drain", None)))
    try:
        yield
    finally:
        watcher.cancel()


async def _watch(request: Any, run: Run, drain: Drain | None) -> None:
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    waits = {disconnect} | ({asyncio.ensure_future(drain.expired())} if drain is not None else set())
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    if disconnect in done:
        run.cancel()
    else:
        run.abort(shutting_down("the server is shutting down; this answer was cut short"))


async def _wait_disconnect(request: Any) -> None:
    # the body has been read: the next message is the disconnect
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(request: Any, run: Run, events: AsyncIterator[dict]) -> Any:
    """A server-sent event stream of ``events`` ending with ``data: [DONE]``; a client leaving cancels ``run``."""
    from fastapi.responses import StreamingResponse

    async def body() -> AsyncIterator[str]:
        try:
            async with cancel_on_disconnect(request, run):
                async for event in events:
                    yield "data: " + json.dumps(event, ensure_ascii=False) + "\n\n"
                yield "data: [DONE]\n\n"
        finally:
            run.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _deltas(run: Run, hold: Callable[[str], str] | None = None) -> AsyncIterator[str]:
    """New pieces of text as the answer grows (a piece is only sent once it is final)."""
    sent = ""
    try:
        async for text in run.items():
            run.stats["text"] = text
            visible = hold(text) if hold else text
            if visible.startswith(sent) and len(visible) > len(sent):
                yield visible[len(sent):]
                sent = visible
    except Exception as e:  # noqa: BLE001  headers are sent: report in the stream, keep it well-formed
        run.stats["error"] = f"{type(e).__name__}: {e}"
    run.stats["sent"] = sent


def chunk_builder(rid: str, model: str, include_usage: bool) -> Callable[..., dict]:
    """A maker of one stream's ``chat.completion.chunk`` events (same id, creation time and model)."""
    created = int(time.time())

    def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None,
              logprobs: dict | None = None) -> dict:
        out: dict = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        if usage is not None:  # the final usage chunk has no choices
            return {**out, "choices": [], "usage": usage}
        out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
        if include_usage:
            out["usage"] = None  # OpenAI sends usage only in the final chunk
        return out

    return chunk


async def chat_chunks(run: Run, rid: str, model: str, use_tools: bool, include_usage: bool,
                      logprobs: Callable[[dict], Awaitable[dict]] | None = None) -> AsyncIterator[dict]:
    """A text run as ``chat.completion.chunk`` events; with ``use_tools``, tool-call markup becomes ``tool_calls``.

    ``logprobs(stats)``, when given, returns the log-probabilities of the tokens generated since its last call.
    """
    chunk = chunk_builder(rid, model, include_usage)
    yield chunk({"role": "assistant", "content": ""})
    async for piece in _deltas(run, toolcalls.visible_prefix if use_tools else None):
        if piece:
            yield chunk({"content": piece}, logprobs=await logprobs(run.stats) if logprobs else None)
    finish = run.stats["finish_reason"]
    last_text = run.stats.get("text", "")
    content, calls = toolcalls.parse(last_text) if use_tools else (last_text, [])
    if calls:
        content = content or ""
        sent = run.stats.get("sent", "")
        if content.startswith(sent) and len(content) > len(sent):
            yield chunk({"content": content[len(sent):]})
        for i, call in enumerate(calls):
            yield chunk({"tool_calls": [{"index": i, **call}]})
        finish = "tool_calls"
    elif use_tools:
        rest = last_text[len(run.stats.get("sent", "")):]
        if rest:
            yield chunk({"content": rest})
    if "error" in run.stats:
        yield chunk({"content": f"\n[error: {run.stats['error']}]"})
        finish = "error"
    yield chunk({}, finish, logprobs=await logprobs(run.stats) if logprobs else None)
    if include_usage:
        yield chunk(usage=run.usage())


async def completion_chunks(run: Run, rid: str, model: str, prefix: str, include_usage: bool,
                            logprobs: Callable[[dict], Awaitable[dict]] | None = None,
                            prefix_logprobs: dict | None = None) -> AsyncIterator[dict]:
    """A text run as ``text_completion`` events, starting with the echoed ``prefix`` (and its ``prefix_logprobs``).

    ``logprobs(stats)``, when given, returns the log-probabilities of the tokens generated since its last call.
    """
    created = int(time.time())

    def chunk(text: str, finish: str | None = None, block: dict | None = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": block}]}

    if prefix:
        yield chunk(prefix, block=prefix_logprobs)
    async for piece in _deltas(run):
        if piece:
            yield chunk(piece, block=await logprobs(run.stats) if logprobs else None)
    yield chunk("", run.stats["finish_reason"], await logprobs(run.stats) if logprobs else None)
    if include_usage:
        yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": run.usage()}
