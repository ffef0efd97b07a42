"""Fine-tuning data formats: one Conversation schema, readers for every format users bring, three writers.

Files are JSON arrays, JSONL (also named ``.json``, as ADGEN's), one JSON object, or CSV/TSV with a header.
Readers auto-detect the format from the first record's keys or take ``format=NAME``:

========================  ===================================================================================
``alpaca``                JSON array or JSONL of ``{instruction, input, output}`` (+ optional ``system``,
                          ``history`` [[q, a], ...]); a non-empty ``input`` adds a ``### Input:`` block.
``chatglm-tuning``        ChatGLM-Tuning's old ``{"text": "### Instruction:\\n...\\n\\n### Response:\\n...\\nEND\\n"}``
                          and new ``{"context": ..., "target": ...}``.
``prompt-response``       ChatGLM-6B ptuning's columns (``prompt_column``, ``response_column``,
                          ``history_column``); ADGEN is ``content`` / ``summary``.
``dolly``                 databricks-dolly-15k ``{instruction, context, response, category}`` (a context
                          adds an ``Input:`` block, as Dolly's own training prompt does).
``sharegpt``              ``{conversations: [{from, value}]}`` with human/gpt/system/function_call/observation.
``openai``                ``{messages: [{role, content}]}`` (+ optional ``tools``).
``moss``                  MOSS-003 ``{meta_instruction, chat: {turn_1: {Human, Inner Thoughts, Commands,
                          Tool Responses, MOSS}}}`` with its ``<|Human|>``/``<eoh>`` ... markers.
``chatdoctor``/``huatuo``  ``{instruction, input, output}`` (ChatDoctor's instruction is its system text).
========================  ===================================================================================

Records come with their file and line (``finechat.data.records``) so that a bad record is reported as
``file:line: field: reason``, and ``on_bad_record="skip"`` lists, never silently drops, what it skipped.
The schema itself is ``finechat.data.conversation``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from finechat.data.conversation import Conversation, Turn
from finechat.data.records import RecordError, RecordReader, loads
from finechat.data.sources import TABLE_SUFFIXES, data_suffix, is_datasets_folder, is_hub_name
from finechat.errors import DataError, DataFileError
from finechat.files import atomic_file

FORMATS = ["alpaca", "chatglm-tuning", "prompt-response", "dolly", "sharegpt", "openai", "moss", "chatdoctor",
           "huatuo"]
WRITERS = ["alpaca", "sharegpt", "openai"]
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")
READ_SUFFIXES = DATA_SUFFIXES + TABLE_SUFFIXES
DOLLY_CATEGORIES = ("open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
                    "information_extraction", "summarization", "creative_writing")
# Column pairs tried, in order, when prompt-response columns are not given (ADGEN first).
PROMPT_RESPONSE_COLUMNS = (("content", "summary"), ("prompt", "response"), ("query", "response"),
                           ("question", "answer"), ("input", "target"))


@dataclasses.dataclass
class ReadResult:
    """What a reader returns: the conversations and every record it skipped as (file, line, field, reason)."""

    conversations: list[Conversation]
    skipped: list[tuple[str, int, str, str]] = dataclasses.field(default_factory=list)
    format: str = ""

    def skipped_table(self) -> str:
        rows = [f"  {f}:{ln}  {field}: {reason}" for f, ln, field, reason in self.skipped]
        return "\n".join([f"skipped {len(self.skipped)} bad record(s):"] + rows) if rows else ""


# --------------------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------------------

def _text(rec: dict, key: str, required: bool = True, allow_empty: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise RecordError(key, "missing field")
        return ""
    value = rec[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RecordError(key, f"expected text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(key, "empty text")
    return value


# The block an extra input adds to the prompt, as each project's own prompt writes it (Stanford Alpaca:
# "### Input:", Dolly: "Input:"); an empty input adds nothing.
ALPACA_INPUT = "\n\n### Input:\n"
DOLLY_INPUT = "\n\nInput:\n"


def _join(first: str, second: str, block: str = ALPACA_INPUT) -> str:
    return f"{first}{block}{second}" if second.strip() else first


def _history(rec: dict, key: str) -> list[Turn]:
    value = rec.get(key)
    if value in (None, ""):
        return []
    if not isinstance(value, list):
        raise RecordError(key, f"expected a list of [query, response] pairs, got {type(value).__name__}")
    turns = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise RecordError(f"{key}[{i}]", "expected a [query, response] pair of texts")
        turns += [Turn("user", pair[0]), Turn("assistant", pair[1])]
    return turns


# --------------------------------------------------------------------------------------------------------
# Readers: record dict -> Conversation (raise RecordError on a bad field)
# --------------------------------------------------------------------------------------------------------

def parse_alpaca(rec: dict, **_: Any) -> Conversation:
    instruction = _text(rec, "instruction")
    inp = _text(rec, "input", required=False)
    output = _text(rec, "output")
    turns = _history(rec, "history") + [Turn("user", _join(instruction, inp)), Turn("assistant", output)]
    system = _text(rec, "system", required=False) or None
    meta = {"instruction": instruction, "input": inp} if inp.strip() else {}
    return Conversation(turns, system=system, meta=meta)


_OLD_TUNING = re.compile(r"^\s*### Instruction:\n(?P<q>.*?)\n\n### Response:\n(?P<a>.*?)(?:\nEND\n?)?\s*$", re.S)


def parse_chatglm_tuning(rec: dict, **_: Any) -> Conversation:
    if "text" in rec:
        text = _text(rec, "text")
        m = _OLD_TUNING.match(text)
        if not m:
            raise RecordError("text", "expected '### Instruction:\\n...\\n\\n### Response:\\n...\\nEND'")
        return Conversation([Turn("user", m["q"]), Turn("assistant", m["a"])])
    context = _text(rec, "context")
    target = _text(rec, "target")
    return Conversation([Turn("user", context), Turn("assistant", target)])


def parse_prompt_response(rec: dict, prompt_column: str | None = None, response_column: str | None = None,
                          history_column: str | None = None, **_: Any) -> Conversation:
    if prompt_column is None or response_column is None:
        for p, r in PROMPT_RESPONSE_COLUMNS:
            if p in rec and r in rec:
                prompt_column, response_column = prompt_column or p, response_column or r
                break
        else:
            raise RecordError("(columns)", "no prompt/response columns found; pass prompt_column= and "
                                           f"response_column= (record keys: {', '.join(map(str, rec))})")
    if history_column is None and "history" in rec:
        history_column = "history"  # never drop a history the data carries
    turns = _history(rec, history_column) if history_column else []
    turns += [Turn("user", _text(rec, prompt_column)), Turn("assistant", _text(rec, response_column))]
    return Conversation(turns)


def parse_dolly(rec: dict, **_: Any) -> Conversation:
    instruction = _text(rec, "instruction")
    context = _text(rec, "context", required=False)
    response = _text(rec, "response")
    category = _text(rec, "category", required=False)
    if category and category not in DOLLY_CATEGORIES:
        raise RecordError("category", f"{category!r} is not one of {', '.join(DOLLY_CATEGORIES)}")
    meta = {"category": category} if category else {}
    return Conversation([Turn("user", _join(instruction, context, DOLLY_INPUT)), Turn("assistant", response)],
                        meta=meta)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool",
                  "system": "system"}


def _turns_from_list(items: Any, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> tuple[
        str | None, list[Turn]]:
    if not isinstance(items, list):
        raise RecordError(key, f"expected a list, got {type(items).__name__}")
    system, turns = None, []
    for i, item in enumerate(items):
        field = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise RecordError(field, "expected an object")
        if role_key not in item:
            raise RecordError(f"{field}.{role_key}", "missing field")
        raw_role = item[role_key]
        role = roles.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError(f"{field}.{role_key}", f"unknown role {raw_role!r} (one of {', '.join(roles)})")
        content = item.get(content_key)
        if item.get("tool_calls"):
            # A call is kept as its JSON text (finechat.data.tool_prompt reads it back); text beside it would be
            # lost there, so it is refused rather than dropped.
            if isinstance(content, str) and content.strip():
                raise RecordError("tool_calls", "a message with both text and tool_calls is not supported; put "
                                                "the text in a message of its own")
            content = json.dumps(item["tool_calls"], ensure_ascii=False)
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RecordError(f"{field}.{content_key}", "only text content parts are supported")
            content = "".join(p.get("text", "") for p in content)
        if content is None:
            raise RecordError(f"{field}.{content_key}", "missing field")
        if not isinstance(content, str):
            raise RecordError(f"{field}.{content_key}", f"expected text, got {type(content).__name__}")
        if role == "system":
            if turns or system is not None:
                raise RecordError(f"{field}.{role_key}", "a system message may only come first")
            system = content
            continue
        turns.append(Turn(role, content, name=item.get("name") if role == "tool" else None))
    return system, turns


def parse_sharegpt(rec: dict, **_: Any) -> Conversation:
    system, turns = _turns_from_list(rec.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    system = _text(rec, "system", required=False) or system
    tools = rec.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = loads(tools)
        except json.JSONDecodeError as e:
            raise RecordError("tools", f"not valid JSON ({e.msg})") from None
    return Conversation(turns, system=system, tools=tools or None)


def parse_openai(rec: dict, **_: Any) -> Conversation:
    roles = {"user": "user", "assistant": "assistant", "tool": "tool", "function": "tool", "system": "system",
             "developer": "system"}
    system, turns = _turns_from_list(rec.get("messages"), "messages", "role", "content", roles)
    tools = rec.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RecordError("tools", "expected a list of tool definitions")
    return Conversation(turns, system=system, tools=tools or None)


MOSS_SLOTS = {  # key in a MOSS turn -> (start marker, end marker)
    "Human": ("<|Human|>:", "<eoh>"),
    "Inner Thoughts": ("<|Inner Thoughts|>:", "<eot>"),
    "Commands": ("<|Commands|>:", "<eoc>"),
    "Tool Responses": ("<|Results|>:", "<eor>"),
    "MOSS": ("<|MOSS|>:", "<eom>"),
}


def _moss_slot(turn: dict, key: str, field: str) -> str | None:
    """The text inside a MOSS slot's markers, or None for an absent or "None" slot."""
    if key not in turn or turn[key] is None:
        return None
    value = turn[key]
    if not isinstance(value, str):
        raise RecordError(f"{field}.{key}", f"expected text, got {type(value).__name__}")
    start, end = MOSS_SLOTS[key]
    text = value.strip()
    if text.startswith(start):
        text = text[len(start):]
    if text.endswith(end):
        text = text[: -len(end)]
    text = text.strip()
    return None if text in ("", "None") else text


def moss_action(thoughts: str | None, commands: str | None) -> str:
    """The trained text of a MOSS plugin step: inner thoughts and commands with their markers."""
    parts = []
    if thoughts is not None:
        parts.append(f"<|Inner Thoughts|>: {thoughts}<eot>")
    if commands is not None:
        parts.append(f"<|Commands|>: {commands}<eoc>")
    return "\n".join(parts)


def parse_moss(rec: dict, **_: Any) -> Conversation:
    """MOSS-003: each turn becomes user [, assistant(thoughts+commands), tool(results)], assistant(answer).

    The plugin step is its own assistant turn so that commands are trained and tool results (a tool turn)
    are not, the way MOSS's own training masked them. A turn whose slots all say ``None`` (no plugin
    call) is trained as a direct ``<|MOSS|>:`` answer rather than as MOSS's ``Inner Thoughts: None /
    Commands: None / Results: None`` preamble: the tool runtime (``finechat.tools.agent``) accepts both, so
    a model tuned here answers without spending tokens on the empty slots, and MOSS's own checkpoints,
    which write them, still work.
    """
    chat = rec.get("chat")
    if not isinstance(chat, dict) or not chat:
        raise RecordError("chat", "missing field" if chat is None else "expected an object of turn_1, turn_2 ...")

    def turn_no(k: str) -> int:
        m = re.fullmatch(r"turn_(\d+)", k)
        if not m:
            raise RecordError(f"chat.{k}", "expected keys turn_1, turn_2 ...")
        return int(m[1])

    turns: list[Turn] = []
    for key in sorted(chat, key=turn_no):
        field = f"chat.{key}"
        t = chat[key]
        if not isinstance(t, dict):
            raise RecordError(field, "expected an object")
        human = _moss_slot(t, "Human", field)
        if human is None:
            raise RecordError(f"{field}.Human", "missing field")
        answer = _moss_slot(t, "MOSS", field)
        if answer is None:
            raise RecordError(f"{field}.MOSS", "missing field")
        thoughts = _moss_slot(t, "Inner Thoughts", field)
        commands = _moss_slot(t, "Commands", field)
        results = _moss_slot(t, "Tool Responses", field)
        turns.append(Turn("user", human))
        if thoughts is not None or commands is not None:
            turns.append(Turn("assistant", moss_action(thoughts, commands)))
        if results is not None:
            if commands is None and thoughts is None:
                raise RecordError(f"{field}.Tool Responses", "tool results without a command")
            turns.append(Turn("tool", results))
        turns.append(Turn("assistant", answer))
    system = _text(rec, "meta_instruction", required=False) or None
    meta = {k: rec[k] for k in ("conversation_id", "category") if k in rec}
    return Conversation(turns, system=system, meta=meta)


CHATDOCTOR_DEFAULT = "If you are a doctor, please answer the medical questions based on the patient's description."


def parse_chatdoctor(rec: dict, **_: Any) -> Conversation:
    """ChatDoctor: the instruction is the doctor's role (system text), the input the patient's words."""
    instruction = _text(rec, "instruction")
    inp = _text(rec, "input", required=False)
    output = _text(rec, "output")
    if inp.strip():
        return Conversation([Turn("user", inp), Turn("assistant", output)], system=instruction or None)
    return Conversation([Turn("user", instruction), Turn("assistant", output)])


def parse_huatuo(rec: dict, **_: Any) -> Conversation:
    """Huatuo (本草): instruction is the question; input, when present, is more context."""
    conv = parse_alpaca(rec)
    return conv


PARSERS: dict[str, Callable[..., Conversation]] = {
    "alpaca": parse_alpaca, "chatglm-tuning": parse_chatglm_tuning, "prompt-response": parse_prompt_response,
    "dolly": parse_dolly, "sharegpt": parse_sharegpt, "openai": parse_openai, "moss": parse_moss,
    "chatdoctor": parse_chatdoctor, "huatuo": parse_huatuo,
}


def detect_format(rec: Any, prompt_column: str | None = None) -> str | None:
    """Guess a format from one record's keys (None when nothing fits)."""
    if not isinstance(rec, dict):
        return None
    keys = set(rec)
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "chat" in keys and isinstance(rec.get("chat"), dict):
        return "moss"
    if prompt_column:
        return "prompt-response"
    if "text" in keys and isinstance(rec.get("text"), str) and "### Response:" in rec["text"]:
        return "chatglm-tuning"
    if {"context", "target"} <= keys:
        return "chatglm-tuning"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        if rec.get("instruction") == CHATDOCTOR_DEFAULT:
            return "chatdoctor"
        return "alpaca"
    if any(p in keys and r in keys for p, r in PROMPT_RESPONSE_COLUMNS):
        return "prompt-response"
    return None


def _check_conversation(conv: Conversation) -> None:
    if not conv.turns:
        raise RecordError("(turns)", "no turns")
    if conv.turns[0].role != "user":
        raise RecordError("(turns)", f"a conversation must start with a user turn, not {conv.turns[0].role}")
    if conv.turns[-1].role != "assistant":
        raise RecordError("(turns)", f"the conversation ends on a {conv.turns[-1].role} turn; "
                                     "it must end with an assistant answer")
    for i, t in enumerate(conv.turns):
        if t.role == "assistant" and not t.content.strip():
            raise RecordError(f"turns[{i}]", "empty answer")
        if t.role == "user" and not t.content.strip():
            raise RecordError(f"turns[{i}]", "empty user text")
        if i and t.role == conv.turns[i - 1].role == "user":
            raise RecordError(f"turns[{i}]", "two user turns in a row")


def expand_paths(paths: Iterable[str | Path]) -> list[str]:
    """Files as given, folders replaced by their data files in name order (MOSS ships one file per
    conversation; Parquet data sets ship shards). A ``datasets`` folder (``save_to_disk``) and a
    ``hub:ORG/NAME`` name stay one source each."""
    out: list[str] = []
    for p in paths:
        if is_hub_name(p) or is_datasets_folder(p):
            out.append(str(p))
        elif Path(p).is_dir():
            found = sorted(f for f in Path(p).rglob("*") if f.is_file() and data_suffix(f) in READ_SUFFIXES)
            if not found:
                raise DataFileError(f"{p}: no data files ({', '.join(READ_SUFFIXES)}, also .gz/.zst) in this folder")
            out += [str(f) for f in found]
        else:
            out.append(str(p))
    return out


def read_conversations(path: str | Path | Iterable[str | Path], format: str = "auto", on_bad_record: str = "error",
                       prompt_column: str | None = None, response_column: str | None = None,
                       history_column: str | None = None) -> ReadResult:
    """Read one file, several, or a folder of them (read in name order) into Conversations.

    ``on_bad_record="error"`` raises DataError naming ``file:line: field: reason`` at the first bad record;
    ``"skip"`` skips it and lists it in ``ReadResult.skipped``.
    """
    result = ReadResult([])
    result.conversations = list(iter_conversations(path, result, format, on_bad_record, prompt_column=prompt_column,
                                                   response_column=response_column, history_column=history_column))
    return result


def iter_conversations(path: str | Path | Iterable[str | Path], result: ReadResult, format: str = "auto",
                       on_bad_record: str = "error", **columns: Any) -> Iterator[Conversation]:
    """:func:`read_conversations` one record at a time: nothing is held but the record being read.

    Skipped records and the format go to ``result`` (its ``conversations`` list is left alone).
    """
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"on_bad_record must be 'error' or 'skip', not {on_bad_record!r}")
    format = (format or "auto").strip().lower().replace("_", "-")  # chatglm_tuning == chatglm-tuning
    if format != "auto" and format not in PARSERS:
        raise DataError(f"unknown data format {format!r}; choose from: auto, {', '.join(FORMATS)}")
    paths = expand_paths([path] if isinstance(path, (str, Path)) else list(path))
    for p in paths:
        yield from _read_one(str(p), format, on_bad_record, result, **columns)


def _read_one(path: str, format: str, on_bad_record: str, result: ReadResult, **columns: Any) -> Iterator[Conversation]:
    def detect(path: str, line: int, rec: dict) -> str:
        fmt = detect_format(rec, columns.get("prompt_column"))
        if fmt is None:
            raise DataFileError(f"{path}:{line}: cannot tell the data format from the keys "
                            f"{', '.join(map(str, rec))}; pass format: one of {', '.join(FORMATS)}")
        return fmt

    def parse(fmt: str, rec: dict) -> Conversation:
        conv = PARSERS[fmt](rec, **columns)
        _check_conversation(conv)
        return conv

    reader = RecordReader(path, None if format == "auto" else format, detect, parse, on_bad_record, result.skipped)
    for line, conv in reader:
        conv.source, conv.line = path, line
        conv.meta.setdefault("format", reader.format)
        yield conv
    result.format = result.format or (reader.format or "")


# --------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------

def to_alpaca(conv: Conversation) -> dict:
    if any(t.role == "tool" for t in conv.turns):
        raise DataError(f"{conv.where}: (turns): the alpaca format cannot hold tool turns; "
                        "convert to sharegpt or openai instead")
    pairs = [(conv.turns[i].content, conv.turns[i + 1].content) for i in range(0, len(conv.turns) - 1, 2)]
    if any(conv.turns[i].role != "user" or conv.turns[i + 1].role != "assistant"
           for i in range(0, len(conv.turns) - 1, 2)) or len(conv.turns) % 2:
        raise DataError(f"{conv.where}: (turns): alpaca needs alternating user/assistant turns")
    *history, (query, answer) = pairs
    instruction, inp = query, ""
    meta = conv.meta or {}
    if meta.get("input") and _join(meta.get("instruction", ""), meta["input"]) == query:
        instruction, inp = meta["instruction"], meta["input"]
    out: dict[str, Any] = {"instruction": instruction, "input": inp, "output": answer}
    if conv.system:
        out["system"] = conv.system
    if history:
        out["history"] = [list(p) for p in history]
    return out


def to_sharegpt(conv: Conversation) -> dict:
    items = [{"from": "system", "value": conv.system}] if conv.system else []
    for i, t in enumerate(conv.turns):
        if t.role == "user":
            items.append({"from": "human", "value": t.content})
        elif t.role == "tool":
            items.append({"from": "observation", "value": t.content})
        else:
            calls = i + 1 < len(conv.turns) and conv.turns[i + 1].role == "tool"
            items.append({"from": "function_call" if calls else "gpt", "value": t.content})
    out: dict[str, Any] = {"conversations": items}
    if conv.tools:
        out["tools"] = conv.tools
    return out


def to_openai(conv: Conversation) -> dict:
    messages = conv.messages()
    for m, t in zip(messages[-len(conv.turns):], conv.turns):
        if t.name:
            m["name"] = t.name
    out: dict[str, Any] = {"messages": messages}
    if conv.tools:
        out["tools"] = conv.tools
    return out


WRITER_FUNCS: dict[str, Callable[[Conversation], dict]] = {
    "alpaca": to_alpaca, "sharegpt": to_sharegpt, "openai": to_openai}


def write_conversations(convs: Iterable[Conversation], path: str | Path, format: str,
                        skipped: list | None = None) -> int:
    """Write conversations as JSONL (``.jsonl``) or a JSON array (``.json``); returns the number written.

    Conversations are written as they come (a stream stays a stream). A conversation the format cannot hold
    (tool turns in alpaca) raises DataError, or, when a ``skipped`` list is given, is appended to it as
    (file, line, field, reason) and left out.
    """
    if format not in WRITER_FUNCS:
        raise DataError(f"cannot write format {format!r}; choose from: {', '.join(WRITERS)}")
    path = Path(path)
    array = path.suffix == ".json"
    n = 0
    with atomic_file(path) as f:  # a full disk or a kill leaves the previous file, never a fragment
        for c in convs:
            try:
                record = WRITER_FUNCS[format](c)
            except DataError as e:
                if skipped is None:
                    raise
                skipped.append((c.source or "<data>", c.line or 0, "(turns)", str(e).split(": ", 2)[-1]))
                continue
            if array:  # the layout json.dumps(records, indent=1) gives, one record at a time
                body = json.dumps(record, ensure_ascii=False, indent=1).replace("\n", "\n ")
                f.write(("[\n " if n == 0 else ",\n ") + body)
            else:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
        if array:
            f.write("\n]\n" if n else "[]\n")
    return n
