"""What the server accepts: its settings, the request bodies (pydantic), and the checks that turn a request into
generation settings, each failure an :class:`ApiError` naming the field.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: a wrong type or range is a 422
naming the field, malformed JSON a 400, a prompt longer than the context a 400.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finechat.config import field
from finechat.generate.contract import ChatEngine
from finechat.generate.settings import GenerationSettings

# ChatGLM-6B's api.py defaults, kept for its clients.
GLM_MAX_LENGTH, GLM_TOP_P, GLM_TEMPERATURE = 2048, 0.7, 0.95
# The seeds torch's generators take (a signed or an unsigned 64-bit integer); others are a 422 naming ``seed``.
SEED_RANGE = (-(2**63), 2**64 - 1)


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
    allowed_hosts: list[str] = field([], help="Host names accepted besides localhost, 127.0.0.1 and [::1] (DNS "
                                              "rebinding guard; the --host given is added; '*' accepts any)")
    max_logprobs: int = field(20, help="most alternatives a request may ask for (logprobs / top_logprobs)")
    max_echo_tokens: int = field(4096, help="longest prompt in tokens that echo scores (log-probabilities)")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_body_bytes", "max_tokens_limit", "default_max_tokens",
                     "max_echo_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request bodies ---------------------------------------------------------------------------------------
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
    """The sampling fields that chat and text completions share."""

    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, logprobs, ...) are accepted
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(1, ge=1, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    logprobs: Any = None  # checked by serve.logprobs (a 400 naming the field, as OpenAI answers)
    top_logprobs: Any = None


class CompletionRequest(Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]  # text, texts, token ids or several lists of ids
    echo: bool = False
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    logprobs: Any = None  # checked by serve.logprobs (a 400 naming the field, as OpenAI answers)


class GlmRequest(BaseModel):
    """``POST /``: ChatGLM-6B's api.py."""

    model_config = ConfigDict(extra="allow")
    prompt: str
    history: list[tuple[str, str]] | None = None
    max_length: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    temperature: float | None = Field(None, ge=0)


# -- checks -----------------------------------------------------------------------------------------------
def parse_body(body: bytes, schema: type[BaseModel]) -> Any:
    """The request body as ``schema``: 400 when it is not a JSON object, 422 naming the first bad field."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    where = lone_surrogate(data)
    if where is not None:  # JSON allows "\ud800"; no tokenizer takes it (a TypeError deep inside)
        raise ApiError(400, f"{where or 'body'}: the text holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                       "which is not valid Unicode", param=where or None, code="invalid_unicode")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def lone_surrogate(data: Any) -> str | None:
    """The dotted path of the first key or string in ``data`` holding a lone surrogate, or None.

    Walked with a stack, not recursion: the body may nest as deep as the JSON parser allows.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return path
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")  # the path goes into the reply
                child = f"{path}.{name}" if path else name
                stack.append((child, item))
                stack.append((child, key))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in reversed(list(enumerate(value))))
    return None


def validation_error(errors: list) -> ApiError:
    """A 422 naming the first invalid field of pydantic's ``errors`` (and how many more there are)."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",))
    message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(422, message, param=where or None, code="invalid_value")


def message_dict(message: ChatMessage, index: int) -> dict:
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


def generation_settings(req: Sampling, max_tokens: int | None, defaults: GenerationSettings,
                        settings: ServeSettings) -> GenerationSettings:
    """An OpenAI request's sampling fields over the engine's ``defaults``; fields the request omits keep them."""
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
    return GenerationSettings.from_kwargs(defaults, **gen)


def glm_generation_settings(req: GlmRequest, defaults: GenerationSettings,
                            settings: ServeSettings) -> GenerationSettings:
    """ChatGLM-6B's ``{max_length, top_p, temperature}`` with its own defaults (``max_length`` counts the prompt)."""
    return GenerationSettings.from_kwargs(
        defaults, max_length=req.max_length or GLM_MAX_LENGTH, max_new_tokens=settings.max_tokens_limit,
        top_p=req.top_p or GLM_TOP_P, temperature=req.temperature if req.temperature is not None else GLM_TEMPERATURE,
        do_sample=not (req.temperature == 0))


@dataclasses.dataclass(frozen=True)
class PromptLimit:
    """How long a prompt may be: the server's ``max_prompt_tokens`` and the model's context, when known."""

    max_prompt: int | None
    context: int | None

    @classmethod
    def of(cls, engine: ChatEngine, settings: ServeSettings) -> PromptLimit:
        context = context_length(engine)
        limits = [x for x in (settings.max_prompt_tokens, context) if x]
        return cls(min(limits) if limits else None, context)

    def fit(self, prompt_ids: list[int], gen: GenerationSettings, explicit: bool) -> GenerationSettings:
        """``gen`` for an OpenAI route: 400 when the prompt is too long, or with the ``explicit`` max_tokens too
        long; a default max_tokens shrinks to the room left instead."""
        if self.max_prompt and len(prompt_ids) > self.max_prompt:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most {self.max_prompt}",
                           param="messages", code="context_length_exceeded")
        context = self.context
        if context and len(prompt_ids) + gen.max_new_tokens > context:
            room = context - len(prompt_ids)
            if explicit or room < 1:
                raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({gen.max_new_tokens}) is more "
                               f"than the model's context of {context} tokens", param="max_tokens",
                               code="context_length_exceeded")
            gen = dataclasses.replace(gen, max_new_tokens=room)
        return gen

    def fit_glm(self, prompt_ids: list[int], gen: GenerationSettings) -> GenerationSettings:
        """``gen`` for ChatGLM's route, whose ``max_length`` counts prompt + answer: never past the context."""
        max_prompt, context = self.max_prompt, self.context
        if max_prompt and len(prompt_ids) > max_prompt or context and len(prompt_ids) >= context:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                           f"{min(x for x in (max_prompt, context) if x)}", param="prompt", code="context_length_exceeded")
        if context:
            gen = dataclasses.replace(gen, max_length=min(gen.max_length or context, context))
        return gen


def context_length(engine: ChatEngine) -> int | None:
    """The model's context in tokens, from its config (None when it does not say)."""
    config = getattr(getattr(engine, "model", None), "config", None)
    for name in ("max_position_embeddings", "seq_length", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_model_name(engine: ChatEngine) -> str:
    """The model id shown in ``/v1/models``: the model folder's name."""
    source = getattr(engine, "source", None)
    return Path(source).name if source else "finechat"
