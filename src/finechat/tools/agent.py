"""The tool runtime: generate, detect a tool call, run it, inject the result, continue -- a small state machine.

:class:`Agent` drives an engine (:class:`~finechat.generate.contract.ChatEngine`) with a
:class:`~finechat.tools.toolbox.ToolRegistry` and answers a conversation while yielding :class:`AgentEvent`
objects (answer text as it streams, inner thoughts, each tool call and each result), so that the terminal,
the web page and the API show the same thing. Three protocols, picked from the template (``protocol="auto"``):

``moss``
    MOSS-moon-003-sft-plugin's format. The meta instruction lists one capability line per tool
    (``- Calculator: enabled. API: Calculate(expression)``); after ``<|Human|>: ...<eoh>`` the model
    writes ``<|Inner Thoughts|>: ...<eot>`` and ``<|Commands|>: Calculate("2+3")<eoc>``; generation stops at
    ``<eoc>``, the commands run and ``<|Results|>:\\nCalculate("2+3") =>\\n5\\n<eor>`` is appended, then the
    model goes on to ``<|MOSS|>: ...<eom>``.
``native``
    Every other template, through the OpenAI API's tool-call convention (:mod:`finechat.tools.toolcalls`):
    a chat template that takes ``tools`` (Qwen2.5, Llama 3.1, Hermes, ...) renders them itself, any other
    template gets them in the system prompt; the model's ``<tool_call>{json}</tool_call>`` blocks are
    parsed into name + arguments, and each result goes back as a ``tool`` message.

Each answer makes at most ``max_rounds`` rounds of tool calls; a model that keeps calling is told the limit
and answers without tools. Nothing the model writes is evaluated: calls are parsed with :mod:`ast` and only
literal arguments are read (anything else is passed on as the raw text).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Any

from finechat.data.templates import (
    MOSS_META_INSTRUCTION,
    Message,
    get_template,
    history_to_messages,
    validate_messages,
)
from finechat.errors import ConfigError
from finechat.generate.contract import ChatEngine, Finish, begin_turn, chat_answer
from finechat.generate.engine import held_back
from finechat.tools import toolcalls
from finechat.tools.toolbox import MAX_ARGUMENT_CHARS, ToolRegistry, ToolResult

# MOSS's section markers.
THOUGHTS, END_THOUGHTS = "<|Inner Thoughts|>:", "<eot>"
COMMANDS, END_COMMANDS = "<|Commands|>:", "<eoc>"
RESULTS, END_RESULTS = "<|Results|>:", "<eor>"
ANSWER, END_ANSWER = "<|MOSS|>:", "<eom>"
HUMAN, END_HUMAN = "<|Human|>:", "<eoh>"
_MARKERS = (THOUGHTS, END_THOUGHTS, COMMANDS, END_COMMANDS, RESULTS, END_RESULTS, ANSWER, END_ANSWER)
_CALL_START = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
PROTOCOLS = ("auto", "moss", "native")


@dataclasses.dataclass
class AgentEvent:
    """One thing that happened while answering.

    kinds: ``text`` (a piece of the answer), ``thought`` (a piece of MOSS's inner thoughts, only with
    ``show_thoughts``), ``tool_call`` (name, arguments, call_id, text = the call as written), ``tool_result``
    (name, call_id, text = the result, ok), ``done`` (text = the whole answer, messages = the conversation
    including the tool turns, rounds = tool rounds used).
    """

    kind: str
    text: str = ""
    name: str = ""
    arguments: Any = None
    call_id: str = ""
    ok: bool = True
    messages: list | None = None
    rounds: int = 0


@dataclasses.dataclass
class ToolCall:
    """A call parsed from model output."""

    name: str
    arguments: Any  # dict (keywords / JSON), list (positional literals) or str (raw text)
    raw: str
    call_id: str = ""


# -- parsing model output --------------------------------------------------------------------------------
def _matching_paren(text: str, open_at: int) -> int | None:
    """Index of the ')' closing the '(' at ``open_at``, skipping quoted strings; None if unclosed."""
    depth, quote, i = 0, None, open_at
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _literal_arguments(inner: str) -> Any:
    """``"2+3"`` -> ["2+3"]; ``query="x", k=2`` -> {...}; anything not literal -> the raw text."""
    try:
        node = ast.parse(f"f({inner})", mode="eval").body
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        return inner.strip()
    if not isinstance(node, ast.Call) or any(isinstance(a, ast.Starred) for a in node.args):
        return inner.strip()
    values = node.args + [k.value for k in node.keywords]
    if not all(isinstance(v, ast.Constant) for v in values) or any(k.arg is None for k in node.keywords):
        return inner.strip()  # Calculate(1+2*3) written without quotes
    if node.keywords:
        return {k.arg: k.value.value for k in node.keywords} | {
            str(i): a.value for i, a in enumerate(node.args)}
    return [a.value for a in node.args]


def parse_commands(text: str) -> list[ToolCall]:
    """MOSS commands: ``Search("a"), Calculate("1+2")`` (or one per line); ``None`` means no call."""
    text = text.strip()
    if not text or text.lower() in ("none", "none."):
        return []
    calls, pos = [], 0
    while True:
        m = _CALL_START.search(text, pos)
        if not m:
            break
        close = _matching_paren(text, m.end() - 1)
        if close is None:  # an unclosed call: take the rest of the text as its argument
            calls.append(ToolCall(m.group(1), text[m.end():].strip(), text[m.start():].strip()))
            break
        inner = text[m.end():close]
        raw = text[m.start():close + 1]
        args = _literal_arguments(inner) if len(inner) <= MAX_ARGUMENT_CHARS else inner
        if isinstance(args, dict) and any(k.isdigit() for k in args):
            positional = [args.pop(k) for k in sorted((k for k in args if k.isdigit()), key=int)]
            args = positional if not args else args
        calls.append(ToolCall(m.group(1), args, raw))
        pos = close + 1
    return calls


# -- MOSS transcript sections ----------------------------------------------------------------------------
def _sections(text: str, start: str) -> list[tuple[str, str]]:
    """Split generated MOSS text into (section, text) pieces; ``start`` is the section it begins in."""
    pattern = "(" + "|".join(re.escape(m) for m in _MARKERS) + ")"
    out, section = [], start
    for piece in re.split(pattern, text):
        if piece in (THOUGHTS, COMMANDS, RESULTS, ANSWER):
            section = {THOUGHTS: "thought", COMMANDS: "commands", RESULTS: "results", ANSWER: "answer"}[piece]
        elif piece in (END_THOUGHTS, END_COMMANDS, END_RESULTS, END_ANSWER):
            section = "between"
        elif piece:
            out.append((section, piece))
    return out


def _join(pieces: list[tuple[str, str]], section: str) -> str:
    return "".join(t for s, t in pieces if s == section)


def moss_system_prompt(registry: ToolRegistry, system: str | None = None, inner_thoughts: bool = True) -> str:
    """MOSS's meta instruction (or ``system``) followed by the plugin capability lines."""
    base = system if system else MOSS_META_INSTRUCTION
    if not base.endswith("\n"):
        base += "\n"
    return base + registry.moss_capabilities(inner_thoughts)


class Agent:
    """Answers conversations with an engine, running the tools it calls (a loop over the engine, not a wrapper)."""

    def __init__(self, bot: ChatEngine, tools: ToolRegistry, protocol: str = "auto", max_rounds: int = 4,
                 show_thoughts: bool = False, inner_thoughts: bool = True):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown tool protocol {protocol!r}; choose from: {', '.join(PROTOCOLS)}")
        if max_rounds < 1:
            raise ConfigError(f"max_rounds must be >= 1, got {max_rounds}")
        self.bot = bot
        self.tools = tools
        self.max_rounds = max_rounds
        self.show_thoughts = show_thoughts
        self.inner_thoughts = inner_thoughts
        self.protocol = self.pick_protocol(bot) if protocol == "auto" else protocol

    @staticmethod
    def pick_protocol(bot: ChatEngine) -> str:
        return "moss" if getattr(bot.template, "name", None) == "moss" else "native"

    # -- public API ------------------------------------------------------------------------------------
    def run(self, messages: list[Message], generate: Any = None, stats: dict | None = None,
            **gen: Any) -> Iterator[AgentEvent]:
        """Answer ``messages`` (the last one from the user or a tool), yielding events; ``done`` comes last.

        ``generate`` replaces ``ChatModel.generate_ids`` (the server's batching scheduler); ``stats`` receives
        ``prompt_tokens`` / ``completion_tokens`` summed over all rounds and the last ``finish_reason``.
        """
        plain = validate_messages(messages)
        messages, finish = self.prepare(plain)
        if stats is not None:
            stats.update(prompt_tokens=0, completion_tokens=0, finish_reason="stop")
        runner = self._run_moss if self.protocol == "moss" else self._run_messages
        for event in runner(messages, generate, stats, **gen):
            if event.kind == "done":
                event.messages = plain + (event.messages or [])[len(messages):]  # the caller's, plain answer last
                if finish is not None:  # the engine's hooks finish the whole answer once (sources, a notice)
                    shown = finish(event.text)
                    if shown != event.text:
                        yield AgentEvent("text", shown[len(event.text):] if shown.startswith(event.text) else shown)
                    event.text = shown
            yield event

    def prepare(self, messages: list[Message]) -> tuple[list[Message], Finish | None]:
        """The conversation checked, with the engine's hooks applied once for the whole answer (every round
        generates with ``hooks=False``): the messages the prompts are built from, and the hooks' finish."""
        return begin_turn(self.bot.hooks, validate_messages(messages))

    def stream_events(self, query: str, history: list | None = None, system: str | None = None,
                      **gen: Any) -> Iterator[AgentEvent]:
        """:meth:`run` for ChatGLM-style ``(query, history)``."""
        yield from self.run(history_to_messages(query, history, system), **gen)

    def stream_chat(self, query: str, history: list | None = None, system: str | None = None,
                    **gen: Any) -> Iterator[tuple[str, list]]:
        """Like ``ChatEngine.stream_chat`` with tools: the answer so far as it grows, the whole answer last."""
        history = list(history or [])
        response = ""
        for event in self.stream_events(query, history, system, **gen):
            if event.kind == "text":
                response += event.text
                yield response, history + [(query, response)]
            elif event.kind == "done":  # the history keeps the plain answer, as the engine's does
                plain = event.messages[-1]["content"] if event.messages else event.text
                yield event.text, history + [(query, plain)]

    def chat(self, query: str, history: list | None = None, system: str | None = None,
             **gen: Any) -> tuple[str, list]:
        """Like ``ChatEngine.chat`` with tools: ``(answer, history + [(query, answer)])``."""
        return chat_answer(self.stream_chat(query, history, system, **gen), query, history)

    def call_tools(self, calls: list[ToolCall], round_number: int) -> Iterator[tuple[ToolCall, ToolResult, AgentEvent]]:
        """Run parsed calls in order, yielding the call event before and the result after each."""
        for i, call in enumerate(calls):
            call.call_id = call.call_id or f"call_{round_number}_{i}"
            yield call, None, AgentEvent("tool_call", call.raw, call.name, call.arguments, call.call_id)
            if round_number > self.max_rounds:
                result = ToolResult(call.name, {}, f"error: at most {self.max_rounds} rounds of tool calls per "
                                    "answer; answer now without tools", False)
            else:
                result = self.tools.call(call.name, call.arguments)
            yield call, result, AgentEvent("tool_result", result.content, call.name, result.arguments,
                                           call.call_id, result.ok)

    # -- MOSS ------------------------------------------------------------------------------------------
    def moss_prompt(self, messages: list[Message]) -> str:
        """The whole MOSS prompt text, ending where the model starts its turn (after ``<eoh>\n``).

        Rendered by the ``moss`` template, so that it is the layout finechat trains MOSS data in.
        """
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        rest = messages[1:] if system is not None else messages
        convo = [{"role": "system", "content": moss_system_prompt(self.tools, system, self.inner_thoughts)}] + rest
        template = self.bot.template if getattr(self.bot.template, "name", None) == "moss" else get_template("moss")
        text = template.render(convo, self.bot.eos_token, add_generation_prompt=True)
        if rest and rest[-1]["role"] == "user" and text.endswith(ANSWER):
            text = text[: -len(ANSWER)]  # the model writes <|Inner Thoughts|> / <|Commands|> / <|MOSS|> itself
        return text

    def _run_moss(self, messages: list[Message], generate: Any, stats: dict | None, **gen: Any) -> Iterator[AgentEvent]:
        bot = self.bot
        prompt = self.moss_prompt(messages)
        stops = list(gen.pop("stop", None) or []) + [END_COMMANDS, RESULTS, HUMAN]
        transcript = ""  # what the model wrote this turn plus the injected results
        section = "answer" if prompt.endswith(ANSWER) else "between"  # where the next generated text starts
        answer = thoughts = ""
        rounds = 0
        # The same turn as messages (user, assistant = thoughts + commands, tool = results), the way finechat's
        # MOSS reader trains it; the prompt itself is the exact text below (prompt_ids).
        view = list(messages)
        for _ in range(self.max_rounds + 2):
            prompt_ids = bot.encode_prompt(prompt + transcript)
            segment = ""
            round_stats: dict = {}
            for segment in bot.stream_text(view, generate=generate, prompt_ids=prompt_ids, skip_special_tokens=False,
                                           stop=stops, stats=round_stats, hooks=False, **gen):
                # Stream the answer (and thoughts) as they grow, holding back a half-written marker.
                safe = segment[: len(segment) - held_back(segment, list(_MARKERS))]
                pieces = _sections(safe, section)
                for kind, shown in (("text", "answer"), ("thought", "thought")):
                    full = _join(pieces, shown).lstrip()
                    if kind == "thought" and "None".startswith(full.rstrip()):
                        continue  # MOSS writes "None" when it has no thoughts: nothing to show
                    before = answer if kind == "text" else thoughts
                    if full.startswith(before) and len(full) > len(before):
                        if kind == "text" or self.show_thoughts:
                            yield AgentEvent(kind, full[len(before):])
                        if kind == "text":
                            answer = full
                        else:
                            thoughts = full
            _add_stats(stats, round_stats)
            if END_COMMANDS in segment:  # a model double may hand back text past the stop string
                segment = segment[: segment.index(END_COMMANDS)]
            pieces = _sections(segment, section)
            transcript += segment
            kinds = {s for s, _ in pieces}
            if "answer" in kinds or not kinds - {"between"}:
                final = _join(pieces, "answer").strip()
                if "answer" not in kinds:
                    # No MOSS markers at all: a model that ignores the protocol simply answered.
                    final = _join(pieces, "between").strip()
                    if final and final != answer:
                        yield AgentEvent("text", final[len(answer):] if final.startswith(answer) else final)
                answer = final or answer
                break
            if "commands" not in kinds:  # cut off (length) inside the thoughts: nothing to run
                break
            calls = parse_commands(_join(pieces, "commands"))
            action = segment.strip() + END_COMMANDS
            if not calls:
                transcript += f"{END_COMMANDS}\n{RESULTS} None{END_RESULTS}\n{ANSWER}"
                view += [{"role": "assistant", "content": action}, {"role": "tool", "content": "None"}]
                section = "answer"
                continue
            if rounds > self.max_rounds:  # it was told the limit and still calls: stop here
                break
            rounds += 1
            blocks = []
            for call, result, event in self.call_tools(calls, rounds):
                yield event
                if result is not None:
                    blocks.append(f"{call.raw} =>\n{result.content}")
            transcript += f"{END_COMMANDS}\n{RESULTS}\n" + "\n".join(blocks) + f"\n{END_RESULTS}\n{ANSWER}"
            view += [{"role": "assistant", "content": action}, {"role": "tool", "content": "\n".join(blocks)}]
            section = "answer"
        done = messages + [{"role": "assistant", "content": answer}]
        yield AgentEvent("done", answer, messages=done, rounds=rounds)

    # -- template-native tool calls (OpenAI-style messages) ---------------------------------------------
    def _run_messages(self, messages: list[Message], generate: Any, stats: dict | None,
                      **gen: Any) -> Iterator[AgentEvent]:
        schemas = self.tools.openai_schemas()
        convo = list(messages)
        rounds = 0
        answer = ""
        for _ in range(self.max_rounds + 2):
            prompt_messages, template_tools = toolcalls.prepare(self.bot, convo, schemas)
            text = shown = ""
            round_stats: dict = {}
            for text in self.bot.stream_text(prompt_messages, tools=template_tools, generate=generate,
                                             stats=round_stats, hooks=False, **gen):
                visible = toolcalls.visible_prefix(text).rstrip()
                if visible.startswith(shown) and len(visible) > len(shown):
                    yield AgentEvent("text", visible[len(shown):])
                    shown = visible
            _add_stats(stats, round_stats)
            content, calls = toolcalls.parse(text)
            content = content or ""
            if not calls:
                if content != shown:  # cleaned up at the end: send the rest
                    yield AgentEvent("text", content[len(shown):] if content.startswith(shown) else content)
                answer = (answer + "\n" + content).strip()
                break
            answer = (answer + "\n" + content).strip() if content else answer
            if rounds > self.max_rounds:  # it was told the limit and still calls: stop here
                break
            rounds += 1
            parsed = [ToolCall(c["function"]["name"], c["function"]["arguments"], _call_text(c), c["id"]) for c in calls]
            convo.append({"role": "assistant", "content": content, "tool_calls": calls})
            for call, result, event in self.call_tools(parsed, rounds):
                yield event
                if result is not None:
                    convo.append({"role": "tool", "content": result.content, "tool_call_id": call.call_id,
                                  "name": call.name})
        convo.append({"role": "assistant", "content": answer})
        yield AgentEvent("done", answer, messages=convo, rounds=rounds)


def _call_text(call: dict) -> str:
    """A parsed call as the model wrote it, for people: ``{"name": "Solve", "arguments": {"equation": "x=1"}}``
    (the arguments as an object again, not the JSON string OpenAI's ``tool_calls`` carry)."""
    arguments = call["function"]["arguments"]
    try:
        arguments = json.loads(arguments)
    except (TypeError, ValueError, RecursionError):
        pass
    return json.dumps({"name": call["function"]["name"], "arguments": arguments}, ensure_ascii=False)


def _add_stats(total: dict | None, part: dict) -> None:
    if total is not None:
        total["prompt_tokens"] += part.get("prompt_tokens", 0)
        total["completion_tokens"] += part.get("completion_tokens", 0)
        total["finish_reason"] = part.get("finish_reason", "stop")
