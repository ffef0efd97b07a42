"""The HTTP server: an OpenAI-compatible API, ChatGLM-6B's ``POST /`` and the web chat page, one engine behind.

``create_app(engine, settings)`` builds a FastAPI app around a loaded engine (any
:class:`~finechat.generate.contract.ChatEngine`); nothing is loaded at import. Every route generates through
one :class:`~finechat.generate.batching.BatchScheduler`, so concurrent requests share forward passes, and
through the engine's ``stream_text``, so answers (stop tokens, stop strings, post-processing) are those of
``chat``.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (streaming as server-sent events ending with
``data: [DONE]``), ``POST /v1/completions``, ``POST /`` (ChatGLM-6B's api.py: ``{prompt, history, max_length,
top_p, temperature}`` -> ``{response, history, status, time}``), ``GET /`` (the page), ``GET /health``.
Log-probabilities (``logprobs``, ``echo``, ``top_logprobs``) are answered as OpenAI and vLLM do: see
:mod:`finechat.serve.completions`.

Errors always use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 malformed JSON or
a prompt longer than the context, 401 missing / wrong key, 404 unknown model or route, 413 body too large,
415 a body that is not ``application/json``, 421 a Host this server does not answer to (see
:mod:`finechat.serve.guards`), 422 invalid field, 429 queue full (with Retry-After), 503 shutting down.

The request bodies and their checks are in :mod:`finechat.serve.schemas`, the answer being generated (worker
thread, event streams) in :mod:`finechat.serve.runs`, server-side tools in :mod:`finechat.serve.tools_api`.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint's ``request: Request`` annotation,
# and ``Request`` is imported inside a function (fastapi is imported only when an app is built).

import dataclasses
import html
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from finechat.data.templates import history_to_messages
from finechat.errors import FinechatError
from finechat.generate.batching import BatchScheduler
from finechat.generate.contract import ChatEngine
from finechat.serve import completions, runs, tools_api
from finechat.serve.guards import HostNames, RequestGuard, api_key_problem
from finechat.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    GlmRequest,
    PromptLimit,
    ServeSettings,
    default_model_name,
    error_body,
    generation_settings,
    glm_generation_settings,
    message_dict,
    parse_body,
    validation_error,
)
from finechat.tools import toolcalls
from finechat.tools.agent import Agent
from finechat.tools.toolbox import ToolRegistry

STATIC_DIR = Path(__file__).parent / "static"
PAGE_LINKS_MARK = "<!-- page links -->"  # where the page lists the views mounted beside it

# The page loads nothing from elsewhere; the policy makes sure of it (and blocks injected scripts).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

__all__ = ["ApiError", "ServeSettings", "create_app"]


def create_app(engine: ChatEngine, settings: ServeSettings | None = None, scheduler: BatchScheduler | None = None,
               tools: ToolRegistry | None = None):
    """A FastAPI app serving ``engine`` (any :class:`finechat.generate.contract.ChatEngine`).

    ``tools`` (a :class:`finechat.tools.toolbox.ToolRegistry`) runs those tools inside the server for chat
    requests that bring no ``tools`` of their own (see :mod:`finechat.serve.tools_api`).
    """
    from fastapi import FastAPI
    from starlette.staticfiles import StaticFiles

    settings = dataclasses.replace(settings or ServeSettings())
    settings.model_name = settings.model_name or default_model_name(engine)
    if scheduler is None:
        scheduler = BatchScheduler(engine, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue)
    agent = Agent(engine, tools) if tools is not None and len(tools) else None
    routes = Routes(engine, scheduler, settings, agent)

    app = FastAPI(title="finechat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler, app.state.settings = engine, scheduler, settings
    app.state.drain = runs.Drain()
    app.router.add_event_handler("startup", app.state.drain.bind)
    app.router.add_event_handler("shutdown", scheduler.close)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestGuard, hosts=HostNames(settings.allowed_hosts), headers=PAGE_HEADERS)  # outermost
    add_error_handlers(app)
    for method, path, handler in routes.table():
        app.add_api_route(path, _endpoint(handler), methods=[method], name=handler.__name__)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


class Routes:
    """The route handlers of one app: each takes the request and returns a JSON body or a response."""

    def __init__(self, engine: ChatEngine, scheduler: BatchScheduler, settings: ServeSettings, agent: Agent | None):
        self.engine, self.scheduler, self.settings, self.agent = engine, scheduler, settings, agent
        self.limit = PromptLimit.of(engine, settings)
        self.created = int(time.time())

    def table(self) -> list[tuple[str, str, Callable[[Any], Awaitable[Any]]]]:
        return [("GET", "/v1/models", self.list_models), ("GET", "/v1/models/{name:path}", self.get_model),
                ("POST", "/v1/chat/completions", self.chat_completions), ("POST", "/v1/completions", self.completions),
                ("POST", "/", self.chatglm_api), ("GET", "/health", self.health), ("GET", "/", self.page)]

    # -- routes --------------------------------------------------------------------------------------
    async def list_models(self, request: Any) -> dict:
        self._check_key(request)
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, request: Any) -> dict:
        self._check_key(request)
        self._check_model(request.path_params["name"])
        return self._model_card()

    async def chat_completions(self, request: Any) -> Any:
        req = await self._parse(request, ChatRequest)
        self._check_model(req.model)
        messages = [message_dict(m, i) for i, m in enumerate(req.messages)]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        top_n = completions.chat_top_n(req, self.settings)
        if self.agent is not None and not tools:  # the server runs its own tools (finechat serve --tools)
            if top_n is not None:  # several rounds of generation and tool results: no one token sequence to score
                raise ApiError(400, "logprobs are not available when the server runs its own tools (--tools)",
                               param="logprobs", code="logprobs_not_supported")
            tools_api.check_messages(messages)
            return await tools_api.answer(request, self.agent, self.scheduler.submit, messages,
                                          self._generation(req, max_tokens), self.limit, max_tokens is not None,
                                          self.settings.model_name, req.stream, req.include_usage)
        if top_n is not None:
            completions.check_scorable(self.engine, "logprobs")
        messages, template_tools = toolcalls.prepare(self.engine, messages, tools, req.tool_choice)
        gen = self._generation(req, max_tokens)
        try:
            prompt_ids = self.engine.encode_prompt(self.engine.build_prompt(messages, template_tools))
        except FinechatError as e:
            raise ApiError(422, str(e), param="messages", code="invalid_value") from None
        except Exception as e:  # a Jinja template that rejects this conversation  # noqa: BLE001
            raise ApiError(422, f"the model's chat template cannot render these messages: {e}",
                           param="messages", code="invalid_value") from None
        gen = self.limit.fit(prompt_ids, gen, max_tokens is not None)
        # the answer and, with logprobs, the scoring beside the batch both hold a place before either starts
        with runs.reserve_now(self.scheduler, 1 + (top_n is not None)) as reservation:
            run = runs.start_text_run(self.engine, reservation, messages, prompt_ids, gen)
            scores = completions.AnswerScores(self.engine, prompt_ids, top_n, chat=True) if top_n is not None \
                else None
            if scores is not None:
                try:
                    await scores.prompt(scored=False)
                except BaseException:
                    run.cancel()
                    raise
        rid, model = "chatcmpl-" + uuid.uuid4().hex, self.settings.model_name
        use_tools = bool(tools) and req.tool_choice != "none"
        if req.stream:
            return runs.sse(request, run, runs.chat_chunks(run, rid, model, use_tools, req.include_usage,
                                                           scores.chat_delta if scores else None))
        text = await run.final(request)
        content, calls = toolcalls.parse(text) if use_tools else (text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else run.stats["finish_reason"]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish,
                             "logprobs": await scores.chat_delta(run.stats) if scores else None}],
                "usage": run.usage()}

    async def completions(self, request: Any) -> Any:
        req = await self._parse(request, CompletionRequest)
        self._check_model(req.model)
        return await completions.completions(request, req, self)

    async def chatglm_api(self, request: Any) -> dict:
        """ChatGLM-6B's api.py, unchanged for its clients."""
        req = await self._parse(request, GlmRequest)
        history = [tuple(pair) for pair in req.history or []]
        messages = history_to_messages(req.prompt, history)
        gen = glm_generation_settings(req, self.engine.generation, self.settings)
        try:
            prompt_ids = self.engine.encode_prompt(self.engine.build_prompt(messages))
        except Exception as e:  # a Jinja template that rejects this conversation  # noqa: BLE001
            raise ApiError(422, f"the model's chat template cannot render this prompt and history: {e}",
                           param="history", code="invalid_value") from None
        gen = self.limit.fit_glm(prompt_ids, gen)
        run = runs.start_text_run(self.engine, self.scheduler, messages, prompt_ids, gen)
        response = await run.final(request)
        history.append((req.prompt, response))
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        return {"response": response, "history": [list(p) for p in history], "status": 200, "time": now}

    async def health(self, request: Any) -> dict:
        scheduler = self.scheduler
        return {"status": "ok", "model": self.settings.model_name, "active": scheduler.active,
                "waiting": scheduler.waiting, "batched": scheduler.batched}

    async def page(self, request: Any) -> Any:
        """The chat page, with a link to each view mounted beside it (``app.state.page_links``: the board)."""
        from fastapi.responses import FileResponse, HTMLResponse

        links = getattr(request.app.state, "page_links", None)
        if not links:
            return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)
        shown = "".join(f'<a class="view-link" id="{html.escape(label.lower())}-link" href="{html.escape(href)}">'
                        f'{html.escape(label)}</a>' for label, href in links)
        text = (STATIC_DIR / "index.html").read_text(encoding="utf-8").replace(PAGE_LINKS_MARK, shown)
        return HTMLResponse(text, headers=PAGE_HEADERS)

    # -- checks --------------------------------------------------------------------------------------
    def _check_key(self, request: Any) -> None:
        problem = api_key_problem(request.headers.get("authorization", ""), self.settings.api_key)
        if problem == "missing":
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if problem == "invalid":
            raise ApiError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _parse(self, request: Any, schema: Any) -> Any:
        self._check_key(request)
        return parse_body(await request.body(), schema)

    def _check_model(self, name: str | None) -> None:
        served = self.settings.model_name
        if name and name not in (served, "default", "finechat"):
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                           param="model", code="model_not_found")

    def _generation(self, req: Any, max_tokens: int | None) -> Any:
        return generation_settings(req, max_tokens, self.engine.generation, self.settings)

    def _model_card(self) -> dict:
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "finechat"}


def _endpoint(handler: Callable[[Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``handler(request)`` as a FastAPI endpoint (FastAPI hands the request to a parameter annotated Request)."""
    from fastapi import Request

    async def endpoint(request: Request):
        return await handler(request)

    endpoint.__name__, endpoint.__doc__ = handler.__name__, handler.__doc__
    return endpoint


# -- errors -----------------------------------------------------------------------------------------------
def add_error_handlers(app: Any) -> None:
    """Every error in OpenAI's shape; a 500 only for a bug, never for the client's input."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(FinechatError, _finechat_error)
    app.add_exception_handler(Exception, _internal_error)


def _json(body: dict, status: int, headers: dict | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status, headers=headers)


async def _api_error(request: Any, exc: ApiError) -> Any:
    return _json(exc.body(), exc.status, exc.headers)


async def _http_error(request: Any, exc: Any) -> Any:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return _json(error_body(message, code=code), exc.status_code, getattr(exc, "headers", None))


async def _request_validation_error(request: Any, exc: Any) -> Any:
    return await _api_error(request, validation_error(exc.errors()))


async def _finechat_error(request: Any, exc: FinechatError) -> Any:
    return _json(error_body(str(exc), param=None, code="invalid_value"), 422)


async def _internal_error(request: Any, exc: Exception) -> Any:
    return _json(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)


class BodyLimit:
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
