"""Prompt templates: how a conversation becomes the exact text a model sees, for chat and for training.

A template renders a list of messages (``{"role": "system"|"user"|"assistant"|"tool", "content": str}``) into
text. For training it also returns *segments*, ``(text, trainable)`` pairs whose concatenation is the full
text, so that labels can be put on assistant turns only. The same object serves the chat engine (prompt +
stop strings), the data pipeline (labels) and ``finechat data preview``.

Two kinds exist:
- :class:`Template`, a built-in format described by a few format strings (``chatglm``, ``alpaca``, ...);
- :class:`TokenizerTemplate`, the tokenizer's own Jinja ``chat_template`` (``apply_chat_template``), whose
  trainable spans are defined by rendering growing prefixes of the conversation and taking the differences.
  That costs two renders per assistant turn plus one; for training, the same spans are found from ONE render
  of the whole conversation with each assistant content wrapped in two private-use marker characters, once
  the template has been checked (on first use, against the prefix renders, on a set of probe conversations)
  to write conversations as growing prefixes with a fixed end-of-turn text. A template that fails the probe,
  a conversation with tool turns or marker characters, or a render that does not look as expected, goes
  the prefix way, so the spans (and token labels) are the same either way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from finechat.data.template_shapes import shape_renderer
from finechat.errors import ConfigError, DataError
from finechat.text import clean_chatglm_response

Message = dict[str, Any]

EOS = "{eos}"  # placeholder in format strings, replaced by the tokenizer's end-of-sequence token text
# Private-use characters that mark where each assistant content starts and ends in a one-render segmentation.
_OPEN, _CLOSE = "\ue000", "\ue001"
# Conversations on which a tokenizer template's one-render segmentation must equal the prefix renders'.
_PROBES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Hi"), ("assistant", "Hello there.")),
    (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")),
    (("user", "一"), ("assistant", "二\n"), ("user", " three "), ("assistant", " four "), ("user", "5"),
     ("assistant", "six\n\n")),
    (("system", "系统"), ("user", "问"), ("assistant", ""), ("user", "again"), ("assistant", "答：好")),
    (("user", "a\n"), ("assistant", "\nb"), ("user", "c")),
)


@dataclasses.dataclass(frozen=True)
class Template:
    """A built-in prompt format.

    Format strings take ``{content}`` and ``{round}`` (0-based index of the user turn); ``{eos}`` stands for
    the tokenizer's EOS token. The assistant's content and ``assistant_end`` are the trainable part of a turn.
    """

    name: str
    description: str
    system_format: str = "{content}"
    default_system: str = ""
    user_format: str = "{content}"
    assistant_end: str = EOS
    # End marker of assistant turns inside the history (None: same as assistant_end). ChatGLM-6B writes past
    # answers with no <eop>; only the answer being trained or generated ends with it.
    history_end: str | None = None
    turn_separator: str = ""
    tool_format: str = "{content}"
    stop_strings: tuple[str, ...] = ()
    # Generation defaults a model family documents (e.g. ChatGLM-6B's top_p 0.7, temperature 0.95).
    generation_defaults: tuple[tuple[str, Any], ...] = ()
    supports_system: bool = True
    # Tool-calling turns (an assistant turn followed by a tool turn). MOSS writes <|Inner Thoughts|> and
    # <|Commands|> straight after <eoh> (not after <|MOSS|>:) and its <eoc> already closes the turn, so the
    # user turn before a call uses tool_call_user_format and the call ends with tool_call_end (None: as usual).
    tool_call_user_format: str | None = None
    tool_call_end: str | None = None

    # -- rendering -----------------------------------------------------------------------------------
    def segments(self, messages: list[Message], eos_token: str = "", add_generation_prompt: bool = False) -> list[
        tuple[str, bool]
    ]:
        """Render ``messages`` into ``(text, trainable)`` pieces; assistant content + end marker are trainable."""
        messages = validate_messages(messages)
        out: list[tuple[str, bool]] = []
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"]
            messages = messages[1:]
        if system and self.supports_system:
            out.append((self.system_format.format(content=system), False))
        elif system:
            # No system slot: prepend the instruction to the first user turn instead of dropping it.
            for m in messages:
                if m["role"] == "user":
                    m["content"] = f"{system}\n\n{m['content']}"
                    break
        rnd = 0
        end = self.assistant_end.replace(EOS, eos_token)
        history_end = end if self.history_end is None else self.history_end.replace(EOS, eos_token)
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        def calls_tool(j: int) -> bool:
            return j + 1 < len(messages) and messages[j]["role"] == "assistant" and messages[j + 1]["role"] == "tool"

        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "user":
                fmt = self.tool_call_user_format if self.tool_call_user_format is not None and calls_tool(i + 1) \
                    else self.user_format
                out.append((fmt.format(content=content, round=rnd), False))
                rnd += 1
            elif role == "tool":
                out.append((self.tool_format.format(content=content, round=rnd), False))
            elif role == "assistant":
                closing = end if (i == last_assistant and not add_generation_prompt) else history_end
                if self.tool_call_end is not None and calls_tool(i):
                    closing = self.tool_call_end
                out.append((content + closing, True))
                if i + 1 < len(messages) and self.turn_separator:
                    out.append((self.turn_separator, False))
            else:
                raise DataError(f"role {role!r} is not allowed after the first message")
        if add_generation_prompt and messages and messages[-1]["role"] == "assistant" and self.turn_separator:
            out.append((self.turn_separator, False))
        return [(t, lab) for t, lab in out if t]

    def render(self, messages: list[Message], eos_token: str = "", add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``; with ``add_generation_prompt`` it ends where the answer starts."""
        return "".join(t for t, _ in self.segments(messages, eos_token, add_generation_prompt))

    def stops(self, eos_token: str = "") -> list[str]:
        """Strings that end an assistant turn (the end marker and the next turn's header)."""
        stops = [s for s in self.stop_strings]
        end = self.assistant_end.replace(EOS, eos_token).strip()
        if end:
            stops.append(end)
        if eos_token:
            stops.append(eos_token)
        return list(dict.fromkeys(s for s in stops if s))


class TokenizerTemplate:
    """The tokenizer's own Jinja chat template (``tokenizer.chat_template``)."""

    name = "tokenizer"
    description = "the chat template stored with the tokenizer"
    generation_defaults: tuple = ()
    supports_system = True

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat_template; pass --template NAME")
        self.tokenizer = tokenizer
        self._turn_end: str | None = None  # what follows an answer that ends the conversation (probed)
        self._one_render: bool | None = None  # whether one render gives the prefix renders' segments (probed)
        self._render: Any = None  # plain messages -> text, add_generation_prompt=False (probed)

    def _apply(self, messages: list[Message], add_generation_prompt: bool, tools: list | None = None) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools:
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def render(self, messages: list[Message], eos_token: str = "", add_generation_prompt: bool = True,
               tools: list | None = None) -> str:
        return self._apply(validate_messages(messages), add_generation_prompt, tools)

    def segments(self, messages: list[Message], eos_token: str = "", add_generation_prompt: bool = False,
                 tools: list | None = None) -> list[tuple[str, bool]]:
        messages = validate_messages(messages)
        if not add_generation_prompt and not tools and self._probe():
            out = self._segments_one_render(messages)
            if out is not None:
                return out
        return self._segments_by_prefixes(messages, add_generation_prompt, tools)

    def _probe(self) -> bool:
        """Whether :meth:`_segments_one_render` equals :meth:`_segments_by_prefixes` on every probe (once)."""
        if self._one_render is None:
            self._one_render = False
            try:
                self._render = self._pick_renderer()
                user = [{"role": "user", "content": "Hi"}]
                answer = "Hello" + _OPEN
                full = self._apply([*user, {"role": "assistant", "content": answer}], False)
                prompt = self._apply(user, True)
                if full.startswith(prompt + answer):
                    self._turn_end = full[len(prompt) + len(answer):]
                    self._one_render = all(
                        self._segments_one_render(msgs) == self._segments_by_prefixes(msgs, False, None)
                        for msgs in ([{"role": r, "content": c} for r, c in probe] for probe in _PROBES))
            except Exception:  # noqa: BLE001 - any failure of the probe means: render by prefixes
                self._one_render = False
        return self._one_render

    def _pick_renderer(self) -> Any:
        """The compiled template called directly when it renders the probes exactly as apply_chat_template.

        apply_chat_template spends about half its time on normalizing and copying messages of any shape; the
        messages here are plain ``{"role", "content"}`` text, so the template transformers compiled (its
        sandboxed environment, filters and special-token variables) is rendered with them as they are.
        """
        def apply(messages: list[Message]) -> str:
            return self._apply(messages, False)

        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.tokenizer.get_chat_template())
            variables = {k: (list(v) if isinstance(v, (list, tuple)) else str(v))
                         for k, v in self.tokenizer.special_tokens_map.items()}

            def direct(messages: list[Message]) -> str:
                return compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=False,
                                       **variables)

            marked = [[{"role": r, "content": _OPEN + c + _CLOSE if r == "assistant" else c} for r, c in probe]
                      for probe in _PROBES]
            if all(direct(m) == apply(m) for m in marked):
                # Rendered once per sequence of roles where the template only pastes texts (template_shapes).
                fast = shape_renderer(compiled.environment, self.tokenizer.get_chat_template(), direct)
                return direct if fast is None or not all(fast(m) == direct(m) for m in marked) else fast
        except Exception:  # noqa: BLE001 - another transformers version: its public apply_chat_template
            pass
        return apply

    def _segments_one_render(self, messages: list[Message]) -> list[tuple[str, bool]] | None:
        """The prefix renders' segments from one render with marked answers; None where that cannot be sure."""
        if self._turn_end is None or any(m["role"] not in ("system", "user", "assistant") or _OPEN in m["content"]
                                         or _CLOSE in m["content"] or len(m) != 2 for m in messages):
            return None  # tool turns, marker characters, or more than role and content: render by prefixes
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        marked = [{"role": m["role"], "content": _OPEN + m["content"] + _CLOSE} if m["role"] == "assistant" else m
                  for m in messages]
        try:
            text = self._render(marked)
        except Exception:  # noqa: BLE001 - the prefix renders then raise (or not) exactly as before
            return None
        if text.count(_OPEN) != len(answers) or text.count(_CLOSE) != len(answers):
            return None
        clean = text.replace(_OPEN, "").replace(_CLOSE, "")
        out: list[tuple[str, bool]] = []
        done, cursor = 0, 0
        for i, content in enumerate(answers):
            a = text.index(_OPEN, cursor)
            b = text.index(_CLOSE, a)
            cursor = b + 1
            start = a - 2 * i  # where the answer starts in the clean text (two marks per earlier answer)
            if text[a + 1:b] != content or start < done:
                return None
            trained = (content + self._turn_end).rstrip("\n")
            if not clean.startswith(trained, start):
                return None
            out.append((clean[done:start], False))
            out.append((trained, True))
            done = start + len(trained)
        if len(clean) > done:
            out.append((clean[done:], False))
        return [(t, lab) for t, lab in out if t]

    def _segments_by_prefixes(self, messages: list[Message], add_generation_prompt: bool, tools: list | None
                              ) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = self._apply(messages[:i], True, tools)
                full = self._apply(messages[: i + 1], False, tools)
                if not prompt.startswith(done) or not full.startswith(prompt):
                    raise ConfigError(
                        "the tokenizer's chat template does not render conversations as growing prefixes; "
                        "use a built-in --template for training"
                    )
                out.append((prompt[len(done):], False))
                answer = full[len(prompt):]
                # Text after the end-of-turn marker (a newline) belongs to the next turn's header.
                stripped = answer.rstrip("\n")
                out.append((stripped, True))
                done = prompt + stripped
        final = self._apply(messages, add_generation_prompt, tools)
        if final.startswith(done) and len(final) > len(done):
            out.append((final[len(done):], False))
        return [(t, lab) for t, lab in out if t]

    def stops(self, eos_token: str = "") -> list[str]:
        stops = []
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>"):
            if tok in (self.tokenizer.chat_template or ""):
                stops.append(tok)
        if eos_token:
            stops.append(eos_token)
        return list(dict.fromkeys(stops))


MOSS_META_INSTRUCTION = (
    "You are an AI assistant whose name is MOSS.\n"
    "- MOSS is a conversational language model that is helpful, honest and harmless.\n"
    "- MOSS understands and answers in the language the user chooses, such as English and 中文.\n"
    "Capabilities and tools that MOSS can possess.\n"
)

TEMPLATES: dict[str, Template] = {}


def register_template(template: Template) -> Template:
    """Add a built-in template (the name must be new)."""
    if template.name in TEMPLATES:
        raise ValueError(f"template {template.name!r} is already registered")
    TEMPLATES[template.name] = template
    return template


@dataclasses.dataclass(frozen=True)
class ChatGLMTemplate(Template):
    """ChatGLM-6B's format plus its response clean-up (the reference's ``process_response``)."""

    def postprocess(self, text: str) -> str:
        """Strip, and make ASCII , ! : ; ? full-width where they touch a CJK character."""
        return clean_chatglm_response(text)


register_template(ChatGLMTemplate(
    name="chatglm",
    description="ChatGLM-6B: [Round i]\\n问：...\\n答：...",
    system_format="{content}\n",
    user_format="[Round {round}]\n问：{content}\n答：",
    assistant_end=EOS,
    history_end="",
    turn_separator="\n",
    stop_strings=("[Round",),
    generation_defaults=(("max_length", 2048), ("top_p", 0.7), ("temperature", 0.95)),
))
register_template(Template(
    name="alpaca",
    description="Stanford Alpaca: ### Instruction: / ### Response:",
    system_format="{content}\n\n",
    default_system=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    ),
    user_format="### Instruction:\n{content}\n\n### Response:\n",
    assistant_end=EOS,
    turn_separator="\n\n",
    stop_strings=("### Instruction:",),
))
register_template(Template(
    name="vicuna",
    description="Vicuna v1.1: USER: ... ASSISTANT: ...",
    system_format="{content} ",
    default_system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    user_format="USER: {content} ASSISTANT: ",
    assistant_end=EOS,
    stop_strings=("USER:",),
))
register_template(Template(
    name="moss",
    description="MOSS: <|Human|>: ...<eoh> / <|MOSS|>: ...<eom>",
    system_format="{content}",
    default_system=MOSS_META_INSTRUCTION,
    user_format="<|Human|>: {content}<eoh>\n<|MOSS|>:",
    assistant_end="<eom>",
    turn_separator="\n",
    tool_format="<|Results|>:\n{content}\n<eor>\n<|MOSS|>:",
    tool_call_user_format="<|Human|>: {content}<eoh>\n",
    tool_call_end="",
    stop_strings=("<eom>", "<|Human|>"),
))
register_template(Template(
    name="chatml",
    description="ChatML: <|im_start|>role ... <|im_end|>",
    system_format="<|im_start|>system\n{content}<|im_end|>\n",
    user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    turn_separator="\n",
    tool_format="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
    stop_strings=("<|im_end|>", "<|im_start|>"),
))
register_template(Template(
    name="huatuo",
    description="Huatuo (本草): 下面是一个问题，运用医学知识来正确回答提问. ### 问题: / ### 回答:",
    system_format="{content}\n",
    default_system="下面是一个问题，运用医学知识来正确回答提问.",
    user_format="### 问题:\n{content}\n### 回答:\n",
    assistant_end=EOS,
    turn_separator="\n",
    stop_strings=("### 问题:",),
))
register_template(Template(
    name="chatdoctor",
    description="ChatDoctor: Patient: ... ChatDoctor: ...",
    system_format="{content}\n",
    default_system="If you are a doctor, please answer the medical questions based on the patient's description.",
    user_format="Patient: {content}\nChatDoctor: ",
    assistant_end=EOS,
    turn_separator="\n",
    stop_strings=("Patient:",),
))


def get_template(name: str | None, tokenizer: Any = None, model_type: str | None = None) -> Template | TokenizerTemplate:
    """Pick a template: the named built-in, else the tokenizer's chat_template, else a family default."""
    if name and name != "auto":
        if name == "tokenizer":
            return TokenizerTemplate(tokenizer)
        if name not in TEMPLATES:
            raise ConfigError(f"unknown template {name!r}; choose from: tokenizer, {', '.join(TEMPLATES)}")
        return TEMPLATES[name]
    if model_type == "chatglm":
        return TEMPLATES["chatglm"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return TokenizerTemplate(tokenizer)
    return TEMPLATES["alpaca"]


def validate_messages(messages: list[Message]) -> list[Message]:
    """Check roles and contents; return a copy (templates may edit it)."""
    if not isinstance(messages, list):
        raise DataError("messages must be a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"message {i}: expected an object with 'role' and 'content'")
        role = m["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"message {i}: unknown role {role!r} (system, user, assistant, tool)")
        if role == "system" and i != 0:
            raise DataError(f"message {i}: a system message may only come first")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise DataError(f"message {i}: content must be text")
        out.append({**m, "role": role, "content": content})
    return out


def history_to_messages(query: str | None, history: list | None = None, system: str | None = None) -> list[Message]:
    """ChatGLM-style ``history`` ([(query, response), ...]) plus a new query -> messages."""
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})
    for i, pair in enumerate(history or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(f"history[{i}] must be a (query, response) pair")
        q, r = pair
        messages.append({"role": "user", "content": str(q)})
        messages.append({"role": "assistant", "content": str(r)})
    if query is not None:
        messages.append({"role": "user", "content": query})
    return messages
