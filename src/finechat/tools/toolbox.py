"""Tools a model can call: the registry, the built-in MOSS plugins and how a call runs.

A :class:`Tool` is a name (the API name the model writes, ``Calculate``), a description, JSON-schema
parameters and a Python function. :class:`ToolRegistry` holds the enabled tools, renders them for a
prompt (MOSS capability lines or OpenAI ``tools`` schemas) and runs calls: arguments are checked against
the schema, each call runs under a time limit, and whatever goes wrong (bad arguments, an exception, a
timeout, an over-long call) comes back as the call's *result text* so the conversation goes on.

Built-ins (``build_registry("calculator,solver,search,text2image", docs=DIR)``):
``Calculate(expression)`` (:mod:`finechat.tools.calculator`), ``Solve(equation)``
(:mod:`finechat.tools.solver`), ``Search(query)`` (:mod:`finechat.tools.search`) and
``Text2Image(description)``, which answers "not configured" unless an image backend is plugged in.

A call runs in a thread. A Python thread cannot be killed, so a tool marked ``stoppable`` (``Search``) gets a
``stop`` event that is set at its time limit and ends at its next check; any other call past its limit is
abandoned.
A tool marked ``isolate`` (``Solve``: sympy can run for a very long time on a hard equation) runs in a
forked process instead, which is killed at the limit.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from finechat.errors import ConfigError
from finechat.tools.calculator import calculate
from finechat.tools.search import LocalSearch, make_search
from finechat.tools.solver import solve

MAX_ARGUMENT_CHARS = 4000  # a longer call is refused before it runs
MAX_RESULT_CHARS = 4000  # a longer result is cut (and says so) before it goes back into the prompt
DEFAULT_TIMEOUT = 10.0

_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
               "object": dict, "null": type(None)}


@dataclasses.dataclass
class Tool:
    """One callable tool.

    ``capability`` is the label of MOSS's meta-instruction line ("Calculator" ->
    ``- Calculator: enabled. API: Calculate(expression)``); it defaults to the name.
    """

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]
    capability: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    isolate: bool = False  # run each call in a forked process that is killed at the time limit
    stoppable: bool = False  # fn takes ``stop`` (a threading.Event set at the time limit) and returns soon after

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or not self.name[0].isalpha():
            raise ConfigError(f"tool name {self.name!r}: use letters, digits and _ (starting with a letter)")
        if not isinstance(self.parameters, dict) or self.parameters.get("type", "object") != "object":
            raise ConfigError(f"tool {self.name}: parameters must be a JSON schema of type 'object'")
        self.parameters.setdefault("type", "object")
        self.parameters.setdefault("properties", {})
        if self.timeout <= 0:
            raise ConfigError(f"tool {self.name}: timeout must be > 0")

    @property
    def parameter_names(self) -> list[str]:
        return list(self.parameters.get("properties", {}))

    def moss_line(self) -> str:
        return f"- {self.capability or self.name}: enabled. API: {self.name}({', '.join(self.parameter_names)})"

    def openai_schema(self) -> dict:
        """The OpenAI / chat-template ``tools`` entry for this tool."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclasses.dataclass
class ToolResult:
    """What one call returned (``ok`` False: ``content`` is the error message shown to the model)."""

    name: str
    arguments: dict
    content: str
    ok: bool = True
    seconds: float = 0.0


def _check_arguments(tool: Tool, arguments: Any) -> dict:
    """Map a call's arguments onto the schema: a lone positional string goes to the first parameter."""
    names = tool.parameter_names
    if isinstance(arguments, str):
        text = arguments.strip()
        if text.startswith("{"):
            try:
                arguments = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"arguments are not valid JSON: {e.msg}") from None
        else:
            arguments = [arguments]
    if isinstance(arguments, (list, tuple)):
        if len(arguments) > len(names):
            raise ValueError(f"{tool.name} takes {len(names)} argument(s) ({', '.join(names)}), got {len(arguments)}")
        arguments = dict(zip(names, arguments))
    if not isinstance(arguments, dict):
        raise ValueError("arguments must be an object")
    unknown = sorted(set(arguments) - set(names))
    if unknown and not tool.parameters.get("additionalProperties", False):
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; {tool.name} takes: {', '.join(names) or 'none'}")
    missing = [n for n in tool.parameters.get("required", []) if n not in arguments]
    if missing:
        raise ValueError(f"missing argument(s): {', '.join(missing)}")
    for key, value in arguments.items():
        spec = tool.parameters["properties"].get(key, {})
        kinds = spec.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds or []
        expected: tuple = ()
        for k in kinds:
            python_type = _JSON_TYPES.get(k, object)
            expected += python_type if isinstance(python_type, tuple) else (python_type,)
        if expected and (not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected)):
            if "string" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
                arguments[key] = str(value)  # Calculate(1+2) written without quotes
                continue
            raise ValueError(f"argument {key!r} must be {' or '.join(kinds)}, got {type(value).__name__}")
        if "enum" in spec and value not in spec["enum"]:
            raise ValueError(f"argument {key!r} must be one of {spec['enum']}")
    return arguments


def _schema_from_signature(fn: Callable) -> dict:
    types = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = p.annotation if not isinstance(p.annotation, str) else {
            "str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}.get(p.annotation)
        props[p.name] = {"type": types.get(annotation, "string")}
        if p.default is p.empty:
            required.append(p.name)
    return {"type": "object", "properties": props, "required": required}


class ToolRegistry:
    """The tools enabled for a conversation."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> Tool:
        if tool.name in self._tools:
            raise ConfigError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def register(self, fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
                 parameters: dict | None = None, timeout: float = DEFAULT_TIMEOUT, capability: str | None = None,
                 isolate: bool = False, stoppable: bool = False):
        """Register a Python function as a tool (also usable as a decorator).

        Without ``parameters`` the JSON schema comes from the signature; without ``description`` from
        the docstring's first line.
        """

        def wrap(f: Callable) -> Callable:
            doc = (inspect.getdoc(f) or "").split("\n")[0]
            self.add(Tool(name or f.__name__, description or doc or (name or f.__name__),
                          parameters or _schema_from_signature(f), f, capability=capability, timeout=timeout,
                          isolate=isolate, stoppable=stoppable))
            return f

        return wrap(fn) if fn is not None else wrap

    def get(self, name: str) -> Tool | None:
        if name in self._tools:
            return self._tools[name]
        lowered = {k.lower(): t for k, t in self._tools.items()}
        return lowered.get(name.lower())

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def openai_schemas(self) -> list[dict]:
        return [t.openai_schema() for t in self]

    def moss_capabilities(self, inner_thoughts: bool = True) -> str:
        """MOSS's capability lines: one per enabled tool, the other MOSS plugins listed as disabled."""
        lines = [f"- Inner thoughts: {'enabled' if inner_thoughts else 'disabled'}."]
        enabled = {t.capability or t.name for t in self}
        lines += [t.moss_line() for t in self]
        lines += [f"- {label}: disabled." for label in MOSS_CAPABILITIES if label not in enabled]
        return "\n".join(lines) + "\n"

    def call(self, name: str, arguments: Any = None, timeout: float | None = None) -> ToolResult:
        """Run one call; never raises: problems come back as a result with ``ok=False``."""
        started = time.perf_counter()

        def failed(message: str, args: Any = None) -> ToolResult:
            return ToolResult(name, args if isinstance(args, dict) else {}, f"error: {message}", False,
                              time.perf_counter() - started)

        tool = self.get(name)
        if tool is None:
            return failed(f"unknown tool {name!r}; available: {', '.join(self.names) or 'none'}")
        size = len(json.dumps(arguments, ensure_ascii=False, default=str)) if arguments is not None else 0
        if size > MAX_ARGUMENT_CHARS:
            return failed(f"the call to {tool.name} is too long ({size} characters, at most {MAX_ARGUMENT_CHARS})")
        try:
            args = _check_arguments(tool, arguments if arguments is not None else {})
        except ValueError as e:
            return failed(str(e))
        limit = tool.timeout if timeout is None else timeout
        run = _in_process if tool.isolate and "fork" in multiprocessing.get_all_start_methods() else _in_thread
        kind, content = run(tool, args, limit)
        if kind == "timeout":
            return failed(f"{tool.name} did not finish within {limit:g} s", args)
        if kind == "error":
            return failed(content, args)
        if len(content) > MAX_RESULT_CHARS:
            content = content[:MAX_RESULT_CHARS] + f"... [cut: {len(content)} characters in all]"
        return ToolResult(tool.name, args, content, True, time.perf_counter() - started)


def _outcome(tool: Tool, args: dict) -> tuple[str, str]:
    """("value", text) or ("error", message) of one call."""
    try:
        value = tool.fn(**args)
    except BaseException as e:  # noqa: BLE001  any failure becomes the result text
        message = str(e) or e.__class__.__name__
        if not isinstance(e, ValueError):  # our tools' refusals are ValueErrors; name anything else
            message = f"{e.__class__.__name__}: {message}"
        return "error", message
    return "value", value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _in_thread(tool: Tool, args: dict, limit: float) -> tuple[str, str]:
    """Run in a thread; past the limit a stoppable tool is told to stop, any other call is abandoned."""
    box: list = []
    stop = threading.Event()
    call_args = {**args, "stop": stop} if tool.stoppable else args
    worker = threading.Thread(target=lambda: box.append(_outcome(tool, call_args)), name=f"tool-{tool.name}",
                              daemon=True)
    worker.start()
    worker.join(limit)
    if box:
        return box[0]
    stop.set()
    return "timeout", ""


def _in_process(tool: Tool, args: dict, limit: float) -> tuple[str, str]:
    """Run in a forked child that is killed at the limit, so a runaway call (sympy on a hard equation)
    does not keep a core busy. Fork, not spawn: the child starts at once with everything imported."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        send.send(_outcome(tool, args))

    process = context.Process(target=child, name=f"tool-{tool.name}", daemon=True)
    process.start()
    send.close()
    try:
        if receive.poll(limit):
            return receive.recv()
        return "timeout", ""
    except EOFError:  # the child died without answering
        return "error", f"{tool.name} stopped unexpectedly (exit code {process.exitcode})"
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()


# -- built-in tools ------------------------------------------------------------------------------------
# Capability labels exactly as MOSS's plugin meta instruction writes them.
MOSS_CAPABILITIES = ("Web search", "Calculator", "Equation solver", "Text-to-image", "Image edition",
                     "Text-to-speech")


class ImageBackend(Protocol):
    """What a text-to-image service plugged into ``Text2Image`` provides: a description -> a path or URL."""

    def generate(self, description: str) -> str: ...


def calculator_tool() -> Tool:
    return Tool("Calculate", "Exact arithmetic: + - * / // % ** (or ^), sqrt, log, sin, factorial, ...",
                {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 3*(2+5)/7"}},
                 "required": ["expression"]}, calculate, capability="Calculator", timeout=5.0)


def solver_tool() -> Tool:
    # Imported here, not in the call: calls run in a forked child, which should not have to import sympy.
    import sympy  # noqa: F401

    return Tool("Solve", "Solve an equation or a small system, e.g. 'x^2-4=0' or 'x+y=3, x-y=1'",
                {"type": "object", "properties": {"equation": {"type": "string"}}, "required": ["equation"]},
                solve, capability="Equation solver", timeout=20.0, isolate=True)


def search_tool(docs: str | None = None, backend: Any = None, k: int = 3) -> Tool:
    if backend is None:
        if not docs:
            raise ConfigError("the search tool needs --docs DIR (a folder of .txt/.md/.jsonl files) or a backend")
        backend = LocalSearch(docs)
    return Tool("Search", "Search the documents and return numbered snippets with their sources",
                {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
                make_search(backend, k), capability="Web search", timeout=15.0, stoppable=True)


def text2image_tool(backend: ImageBackend | None = None) -> Tool:
    def text2image(description: str) -> str:
        if backend is None:
            return ("Text2Image is not configured: no image backend is set up, so no image was made. "
                    "Tell the user the picture cannot be drawn here.")
        return backend.generate(description)

    return Tool("Text2Image", "Draw a picture from a description (needs an image backend)",
                {"type": "object", "properties": {"description": {"type": "string"}}, "required": ["description"]},
                text2image, capability="Text-to-image", timeout=60.0)


BUILTIN_TOOLS = {"calculator": calculator_tool, "solver": solver_tool, "search": search_tool,
                 "text2image": text2image_tool}


def build_registry(names: str | Iterable[str] | None, docs: str | None = None, search_backend: Any = None,
                   image_backend: ImageBackend | None = None) -> ToolRegistry:
    """A registry of tools from names: built-ins (``"calculator,solver,search"``; ``all`` for every one) and
    the user's own functions as ``my_tools.py:weather`` or ``package.module:weather`` (JSON schema from the
    signature, description from the docstring)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names or [])
    user = [n for n in names if ":" in n]  # my_tools.py:weather or package.module:weather
    names = [n for n in names if ":" not in n]
    if names == ["all"]:
        names = list(BUILTIN_TOOLS) if (docs or search_backend) else [n for n in BUILTIN_TOOLS if n != "search"]
    unknown = [n for n in names if n.lower() not in BUILTIN_TOOLS]
    if unknown:
        raise ConfigError(f"unknown tool(s) {', '.join(unknown)}; choose from: {', '.join(BUILTIN_TOOLS)}, all")
    registry = ToolRegistry()
    for name in dict.fromkeys(n.lower() for n in names):
        if name == "search":
            registry.add(search_tool(docs, search_backend))
        elif name == "text2image":
            registry.add(text2image_tool(image_backend))
        else:
            registry.add(BUILTIN_TOOLS[name]())
    for spec in user:
        registry.register(_user_function(spec))
    if docs and "search" not in names:
        raise ConfigError("--docs is only used by the search tool: add search to --tools")
    return registry


def _user_function(spec: str) -> Callable:
    """The function named by ``file.py:name`` or ``module:name`` (the user's own code, imported)."""
    import importlib
    import importlib.util
    from pathlib import Path

    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"tool {spec}: no file {target}")
            module_spec = importlib.util.spec_from_file_location(f"finechat_user_tools_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  the user's file: say what failed
        raise ConfigError(f"tool {spec}: cannot import {target}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"tool {spec}: {target} has no function {name!r}")
    return fn
