"""The HTTP server: an OpenAI-compatible API, ChatGLM-6B's ``POST /`` and the web chat page, one engine behind.

``create_app(engine, settings)`` builds a FastAPI app around a loaded :class:`ChatModel`; nothing is loaded
at import. Every route generates through one :class:`~finechat.generate.batching.BatchScheduler`, so
concurrent requests share forward passes, and through ``ChatModel.stream_text``, so answers (stop tokens,
stop strings, post-processing) are those of ``chat``.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (streaming as server-sent events ending with
``data: [DONE]``), ``POST /v1/completions``, ``POST /`` (ChatGLM-6B's api.py: ``{prompt, history, max_length,
top_p, temperature}`` -> ``{response, history, status, time}``), ``GET /`` (the page), ``GET /health``.

Errors always use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 malformed JSON or
a prompt longer than the context, 401 missing / wrong key, 404 unknown model or route, 413 body too large,
422 invalid field, 429 queue full (with Retry-After), 503 shutting down.
"""


import asyncio
import dataclasses
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from finechat.config import field
from finechat.errors import FinechatError

STATIC_DIR = Path(__file__).parent / "static"


@dataclasses.dataclass
class ServeSettings:
    """Limits and access rules of the server."""

    model_name: str | None = field(None, help="the model id in /v1/models (default: the model folder's name)")
    api_key: str | None = field(None, help="require 'Authorization: Bearer KEY' on /v1/* and POST /")
    max_batch_size: int = field(16, help="most requests decoded together in one forward pass")
    max_queue: int = field(64, help="most requests waiting for a batch slot; more get 429")
    max_body_bytes: int = field(1_000_000, help="largest request body in bytes; larger gets 413")
    max_prompt_tokens: int | None = field(None, help="longest prompt in tokens (default: the model's context)")
    max_tokens_limit: int = field(4096, help="largest max_tokens a request may ask for")
    default_max_tokens: int = field(512, help="max_tokens when a request gives none")
    cors_origins: list[str] = field([], help="origins allowed by CORS (empty: CORS off)")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_body_bytes", "max_tokens_limit", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request schemas (pydantic: a wrong type or range is a 422 naming the field) ---------------------------
def _schemas():
    from pydantic import BaseModel, ConfigDict, Field

    class ContentPart(BaseModel):
        model_config = ConfigDict(extra="allow")
        type: str
        text: str | None = None

    class FunctionCall(BaseModel):
        name: str
        arguments: str | dict = "{}"

    class ToolCall(BaseModel):
        model_config = ConfigDict(extra="allow")
        id: str | None = None
        type: Literal["function"] = "function"
        function: FunctionCall

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[ContentPart] | None = None
        name: str | None = None
        tool_calls: list[ToolCall] | None = None
        tool_call_id: str | None = None

    class FunctionSpec(BaseModel):
        model_config = ConfigDict(extra="allow")
        name: str = Field(min_length=1, max_length=64)
        description: str | None = None
        parameters: dict | None = None

    class Tool(BaseModel):
        type: Literal["function"]
        function: FunctionSpec

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, logprobs, ...) are accepted
        model: str | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        max_tokens: int | None = Field(None, ge=1)
        stop: str | list[str] | None = None
        seed: int | None = None
        n: int = Field(1, ge=1, le=1)
        presence_penalty: float = Field(0.0, ge=-2, le=2)
        frequency_penalty: float = Field(0.0, ge=-2, le=2)
        stream: bool = False
        stream_options: StreamOptions | None = None

    class ChatRequest(Sampling):
        messages: list[ChatMessage] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        tools: list[Tool] | None = None
        tool_choice: Literal["none", "auto", "required"] | dict | None = None

    class CompletionRequest(Sampling):
        prompt: str | list[str]
        echo: bool = False

    class GlmRequest(BaseModel):
        model_config = ConfigDict(extra="allow")
        prompt: str
        history: list[tuple[str, str]] | None = None
        max_length: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0, le=1)
        temperature: float | None = Field(None, ge=0)

    return ChatRequest, CompletionRequest, GlmRequest


# -- the app ----------------------------------------------------------------------------------------------
def create_app(engine: Any, settings: ServeSettings | None = None, scheduler: Any = None, tools: Any = None):
    """A FastAPI app serving ``engine`` (a :class:`finechat.generate.engine.ChatModel`).

    ``tools`` (a :class:`finechat.tools.registry.ToolRegistry`) runs those tools inside the server for chat
    requests that bring no ``tools`` of their own (see :mod:`finechat.serve.tools_api`).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.staticfiles import StaticFiles

    from finechat.generate.batching import BatchScheduler, QueueFull, SchedulerClosed
    from finechat.generate.engine import GenerationSettings
    from finechat.tools import toolcalls

    settings = dataclasses.replace(settings or ServeSettings())
    settings.model_name = settings.model_name or _default_name(engine)
    ChatRequest, CompletionRequest, GlmRequest = _schemas()
    if scheduler is None:
        scheduler = BatchScheduler(engine, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue)
    engine.batcher = scheduler
    agent = None
    if tools is not None and len(tools):
        from finechat.tools.agent import Agent

        agent = Agent(engine, tools)
    context = _context_length(engine)
    max_prompt = min(x for x in (settings.max_prompt_tokens, context) if x) if (settings.max_prompt_tokens or context) \
        else None
    created = int(time.time())

    app = FastAPI(title="finechat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler, app.state.settings = engine, scheduler, settings
    app.router.add_event_handler("shutdown", scheduler.close)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)

    # -- errors --------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(message, code=code), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(_ValidationFailed)
    async def schema_error(request: Request, exc: _ValidationFailed):
        return _validation_response(exc.errors)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _validation_response(exc.errors())

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # a bug, never the client's input
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)

    def check_key(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def parse(request: Request, schema: Any) -> Any:
        check_key(request)
        body = await request.body()
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise _ValidationFailed(e.errors()) from None

    @app.exception_handler(FinechatError)
    async def finechat_error(request: Request, exc: FinechatError):
        return JSONResponse(error_body(str(exc), param=None, code="invalid_value"), 422)

    def check_model(name: str | None) -> None:
        if name and name not in (settings.model_name, "default", "finechat"):
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")

    def generation(req: Any, max_tokens: int | None) -> GenerationSettings:
        gen: dict[str, Any] = {}
        if req.temperature is not None:
            gen["temperature"] = req.temperature
            gen["do_sample"] = req.temperature > 0
        if req.top_p is not None:
            gen["top_p"] = req.top_p
        if req.seed is not None:
            gen["seed"] = req.seed
        for name in ("presence_penalty", "frequency_penalty"):  # absent: the server's own default stays
            if name in req.model_fields_set:
                gen[name] = getattr(req, name)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 16 or any(not s for s in stop):
            raise ApiError(422, "stop takes at most 16 non-empty strings", param="stop", code="invalid_value")
        if stop:
            gen["stop"] = stop
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            raise ApiError(422, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
                           param="max_tokens", code="invalid_value")
        gen["max_new_tokens"] = max_tokens or settings.default_max_tokens
        gen["max_length"] = None
        return GenerationSettings.from_kwargs(engine.generation, **gen)

    def check_prompt(prompt_ids: list[int], gen: GenerationSettings, explicit: bool) -> GenerationSettings:
        if max_prompt and len(prompt_ids) > max_prompt:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most {max_prompt}",
                           param="messages", code="context_length_exceeded")
        if context and len(prompt_ids) + gen.max_new_tokens > context:
            room = context - len(prompt_ids)
            if explicit or room < 1:
                raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({gen.max_new_tokens}) is more "
                               f"than the model's context of {context} tokens", param="max_tokens",
                               code="context_length_exceeded")
            gen = dataclasses.replace(gen, max_new_tokens=room)
        return gen

    def start(messages: list[dict], prompt_ids: list[int], gen: GenerationSettings) -> _Run:
        """Queue the request now (so a full queue is a 429 before any answer starts) and stream its text."""
        try:
            stream = scheduler.submit(prompt_ids, gen)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", type="rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except SchedulerClosed as e:
            raise ApiError(503, str(e), code="shutting_down", type="server_error", headers={"Retry-After": "5"}) from None
        return _Run(engine, messages, prompt_ids, gen, stream)

    # -- routes --------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [_model_card(settings.model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        check_key(request)
        check_model(name)
        return _model_card(settings.model_name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        check_model(req.model)
        messages = [_message_dict(m, i) for i, m in enumerate(req.messages)]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        if agent is not None and not tools:
            return await server_tools(request, req, messages)
        messages, template_tools = toolcalls.prepare(engine, messages, tools, req.tool_choice)
        max_tokens = req.max_completion_tokens or req.max_tokens
        gen = generation(req, max_tokens)
        try:
            prompt_ids = engine.encode_prompt(engine.build_prompt(messages, template_tools))
        except FinechatError as e:
            raise ApiError(422, str(e), param="messages", code="invalid_value") from None
        except Exception as e:  # a Jinja template that rejects this conversation  # noqa: BLE001
            raise ApiError(422, f"the model's chat template cannot render these messages: {e}",
                           param="messages", code="invalid_value") from None
        gen = check_prompt(prompt_ids, gen, max_tokens is not None)
        run = start(messages, prompt_ids, gen)
        rid, model = "chatcmpl-" + uuid.uuid4().hex, settings.model_name
        use_tools = bool(tools) and req.tool_choice != "none"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(request, run, _chat_chunks(run, rid, model, use_tools, include_usage))
        text = await run.final(request)
        content, calls = toolcalls.parse(text) if use_tools else (text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else run.stats["finish_reason"]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": run.usage()}

    async def server_tools(request: Request, req: Any, messages: list[dict]):
        """The answer from the tool runtime: the model's tool calls run here (``finechat serve --tools``)."""
        from finechat.data.templates import validate_messages
        from finechat.serve import tools_api

        try:
            validate_messages(messages)  # now: a bad conversation is a 422, not an error mid-answer
        except FinechatError as e:
            raise ApiError(422, str(e), param="messages", code="invalid_value") from None
        run = tools_api.AgentRun(agent, messages, generation(req, req.max_completion_tokens or req.max_tokens),
                                 scheduler.submit)
        rid = "chatcmpl-" + uuid.uuid4().hex
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(request, run, tools_api.chunks(run, rid, settings.model_name, include_usage))
        watcher = asyncio.ensure_future(_wait_disconnect(request, run))
        try:
            return await tools_api.complete(run, rid, settings.model_name)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", type="rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except Exception as e:  # noqa: BLE001  the model or scheduler failed mid-answer
            raise ApiError(503, f"generation failed: {type(e).__name__}: {e}", type="server_error",
                           code="generation_failed") from None
        finally:
            watcher.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(422, "prompt must be one string (batches of prompts are not supported)", param="prompt")
        prompt = prompts[0]
        gen = generation(req, req.max_tokens if req.max_tokens is not None else None)
        prompt_ids = engine.tokenizer(prompt)["input_ids"] if prompt else [
            engine.tokenizer.bos_token_id or engine.tokenizer.eos_token_id]
        gen = check_prompt(prompt_ids, gen, req.max_tokens is not None)
        run = start([], prompt_ids, gen)
        rid, model = "cmpl-" + uuid.uuid4().hex, settings.model_name
        prefix = prompt if req.echo else ""
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(request, run, _completion_chunks(run, rid, model, prefix, include_usage))
        text = await run.final(request)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "text": prefix + text, "finish_reason": run.stats["finish_reason"],
                             "logprobs": None}],
                "usage": run.usage()}

    @app.post("/")
    async def chatglm_api(request: Request):
        """ChatGLM-6B's api.py, unchanged for its clients."""
        req = await parse(request, GlmRequest)
        history = [tuple(pair) for pair in req.history or []]
        from finechat.data.templates import history_to_messages

        messages = history_to_messages(req.prompt, history)
        gen = GenerationSettings.from_kwargs(
            engine.generation, max_length=req.max_length or 2048, max_new_tokens=settings.max_tokens_limit,
            top_p=req.top_p or 0.7, temperature=req.temperature if req.temperature is not None else 0.95,
            do_sample=not (req.temperature == 0))
        prompt_ids = engine.encode_prompt(engine.build_prompt(messages))
        if max_prompt and len(prompt_ids) > max_prompt or context and len(prompt_ids) >= context:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                           f"{min(x for x in (max_prompt, context) if x)}", param="prompt", code="context_length_exceeded")
        if context:  # ChatGLM's max_length counts prompt + answer; never past the model's context
            gen = dataclasses.replace(gen, max_length=min(gen.max_length or context, context))
        run = start(messages, prompt_ids, gen)
        response = await run.final(request)
        history.append((req.prompt, response))
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        return {"response": response, "history": [list(p) for p in history], "status": 200, "time": now}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "active": scheduler.active,
                "waiting": scheduler.waiting, "batched": scheduler.batched}

    @app.get("/")
    async def page():
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# The page loads nothing from elsewhere; the policy makes sure of it (and blocks injected scripts).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _ValidationFailed(Exception):
    def __init__(self, errors: list):
        self.errors = errors


def _validation_response(errors: list):
    from fastapi.responses import JSONResponse

    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",))
    message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return JSONResponse(error_body(message, param=where or None, code="invalid_value"), 422)


def _default_name(engine: Any) -> str:
    source = getattr(engine, "source", None)
    return Path(source).name if source else "finechat"


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "finechat"}


def _context_length(engine: Any) -> int | None:
    config = getattr(getattr(engine, "model", None), "config", None)
    for name in ("max_position_embeddings", "seq_length", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _message_dict(message: Any, index: int) -> dict:
    """A validated OpenAI message as the engine's ``{"role", "content", ...}``."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise ApiError(422, f"messages.{index}.content: only text parts are supported, got {part.type!r}",
                               param=f"messages.{index}.content", code="invalid_value")
            texts.append(part.text)
        content = "".join(texts)
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": content or ""}
    if message.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    if role == "system" and index != 0:
        raise ApiError(422, f"messages.{index}: a system message may only come first", param=f"messages.{index}.role",
                       code="invalid_value")
    return out


class _Run:
    """One request's answer: ``stream_text`` over the scheduler runs in a thread and hands text to asyncio."""

    def __init__(self, engine: Any, messages: list[dict], prompt_ids: list[int], gen: Any, stream: Any):
        self.stats: dict = {"prompt_tokens": len(prompt_ids), "completion_tokens": 0, "finish_reason": "stop"}
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        fields = {f.name: getattr(gen, f.name) for f in dataclasses.fields(gen)}
        fields.pop("greedy", None)  # from_kwargs would re-derive it; do_sample already says it

        def work() -> None:
            try:
                texts = engine.stream_text(messages, generate=lambda ids, settings: stream, stats=self.stats,
                                           prompt_ids=prompt_ids, **fields)
                for text in texts:
                    if self._cancel.is_set():
                        texts.close()
                        break
                    self._put(("text", text))
                self._put(("end", None))
            except BaseException as e:  # noqa: BLE001  handed to the request
                self._put(("error", e))
            finally:
                stream.close()

        threading.Thread(target=work, name="finechat-request", daemon=True).start()

    def _put(self, item: tuple) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopping)
            self.cancel()

    def cancel(self) -> None:
        self._cancel.set()
        self._stream.close()  # the scheduler drops the sequence before its next step

    async def texts(self) -> AsyncIterator[str]:
        """The growing answer text; cancels generation when the consumer stops early."""
        try:
            while True:
                kind, value = await self._queue.get()
                if kind == "text":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            self.cancel()

    async def final(self, request: Any) -> str:
        """The whole answer; stops generating if the client disconnects while waiting."""
        watcher = asyncio.ensure_future(_wait_disconnect(request, self))
        text = ""
        try:
            async for text in self.texts():
                pass
        except FinechatError as e:
            raise ApiError(503, f"generation failed: {e}", type="server_error", code="generation_failed") from None
        finally:
            watcher.cancel()
        return text

    def usage(self) -> dict:
        p, c = self.stats["prompt_tokens"], self.stats["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _wait_disconnect(request: Any, run: _Run) -> None:
    """Cancel ``run`` when the client goes away (the body has been read; the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            return


def _sse(request: Any, run: _Run, events: AsyncIterator[dict]):
    from fastapi.responses import StreamingResponse

    async def body() -> AsyncIterator[str]:
        watcher = asyncio.ensure_future(_wait_disconnect(request, run))
        try:
            async for event in events:
                yield "data: " + json.dumps(event, ensure_ascii=False) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            run.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _deltas(run: _Run, hold: Callable[[str], str] | None = None) -> AsyncIterator[str]:
    """New pieces of text as the answer grows (a piece is only sent once it is final)."""
    sent = ""
    try:
        async for text in run.texts():
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

    def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
        out: dict = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        if usage is not None:  # the final usage chunk has no choices
            return {**out, "choices": [], "usage": usage}
        out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        if include_usage:
            out["usage"] = None  # OpenAI sends usage only in the final chunk
        return out

    return chunk


async def _chat_chunks(run: _Run, rid: str, model: str, use_tools: bool, include_usage: bool) -> AsyncIterator[dict]:
    from finechat.tools import toolcalls

    chunk = chunk_builder(rid, model, include_usage)
    yield chunk({"role": "assistant", "content": ""})
    async for piece in _deltas(run, toolcalls.visible_prefix if use_tools else None):
        if piece:
            yield chunk({"content": piece})
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
    yield chunk({}, finish)
    if include_usage:
        yield chunk(usage=run.usage())


async def _completion_chunks(run: _Run, rid: str, model: str, prefix: str, include_usage: bool) -> AsyncIterator[dict]:
    created = int(time.time())

    def chunk(text: str, finish: str | None = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    if prefix:
        yield chunk(prefix)
    async for piece in _deltas(run):
        if piece:
            yield chunk(piece)
    yield chunk("", run.stats["finish_reason"])
    if include_usage:
        yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": run.usage()}


class _BodyLimit:
    """ASGI middleware: answer 413 to bodies over ``limit`` bytes (declared or streamed) before any route runs."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = False
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            too_large = True
        chunks: list[bytes] = []
        size = 0
        while not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_large = size > self.limit
            if not message.get("more_body"):
                break
        if too_large:
            body = json.dumps(error_body(f"the request body is larger than {self.limit} bytes",
                                         code="request_too_large")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
