"""Preference data (pairs for DPO / reward models, labelled answers for KTO): read, check, tokenize, write.

Formats, detected from the first record's keys or given as ``format=NAME``:

==================  =========================================================================================
``pref-alpaca``     ``{instruction, input, chosen, rejected}`` (+ optional ``system``, ``history``); MedicalGPT's
                    ``{question, response_chosen, response_rejected}`` (+ ``system``, ``history``) too
``pref-sharegpt``   ``{conversations: [{from, value}], chosen: {from, value}, rejected: {from, value}}``
                    (the answers may also be plain strings)
``pref-prompt``     ``{prompt, chosen, rejected}`` (+ optional ``system``) with strings or message lists
                    (UltraFeedback-binarized: ``chosen``/``rejected`` repeat the prompt's messages), or only
                    ``{chosen, rejected}``
                    holding whole dialogues (HH-RLHF: ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``), whose
                    shared beginning is the prompt
``kto``             ``{messages, label}`` (the last assistant message is the answer) or
                    ``{prompt, completion, label}``; ``label`` is ``true`` (desirable) or ``false``
==================  =========================================================================================

Every pair becomes a :class:`PreferencePair`: the prompt as a :class:`~finechat.data.formats.Conversation`
whose turns end on a user turn, and the two answers. Bad records (a missing side, an empty side, chosen
equal to rejected, a label that is not a boolean) raise ``file:line: field: reason`` or, with
``on_bad_record="skip"``, are listed in :attr:`PreferenceReadResult.skipped`; nothing is dropped silently.

Tokenization goes through the SFT path (:func:`finechat.data.tokenize.encode_conversation`) on the
conversation *prompt + answer*, so the template, special tokens and masking are exactly SFT's: the prompt
ids are the untrained head of that row, the answer ids its trained span.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from finechat.data.conversation import Conversation, Turn
from finechat.data.formats import (
    SHAREGPT_ROLES,
    _history,
    _join,
    _text,
    _turns_from_list,
    detect_format,
    expand_paths,
)
from finechat.data.records import RecordError, RecordReader, first_record
from finechat.data.tokenize import IGNORE_INDEX, TokenizeSettings, encode_conversation, special_token_layout
from finechat.errors import DataError
from finechat.files import atomic_file, write_jsonl_atomic

PAIR_FORMATS = ["pref-alpaca", "pref-sharegpt", "pref-prompt"]
PREFERENCE_FORMATS = [*PAIR_FORMATS, "kto"]
MESSAGE_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "system": "system", "developer": "system", "tool": "tool"}
# HH-RLHF writes dialogues as "\n\nHuman: ...\n\nAssistant: ..." (Anthropic's own prompt format).
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclasses.dataclass
class Prompted:
    """Something answered to a prompt (turns ending on a user turn); ``where`` is the record's file:line."""

    prompt: Conversation

    @property
    def where(self) -> str:
        return self.prompt.where


@dataclasses.dataclass
class PreferencePair(Prompted):
    """A prompt with a preferred and a dispreferred answer."""

    chosen: str = ""
    rejected: str = ""


@dataclasses.dataclass
class LabelledAnswer(Prompted):
    """A prompt with one answer marked desirable (``label`` true) or undesirable: KTO's unpaired data."""

    completion: str = ""
    label: bool = True


@dataclasses.dataclass
class PreferenceReadResult:
    """Pairs or labelled answers read from files, and every bad record skipped as (file, line, field, reason)."""

    records: list
    skipped: list[tuple[str, int, str, str]] = dataclasses.field(default_factory=list)
    format: str = ""

    def skipped_table(self) -> str:
        rows = [f"  {f}:{ln}  {field}: {reason}" for f, ln, field, reason in self.skipped]
        return "\n".join([f"skipped {len(self.skipped)} bad record(s):"] + rows) if rows else ""


# --------------------------------------------------------------------------------------------------------
# Record parsers
# --------------------------------------------------------------------------------------------------------

def _answer(value: Any, field: str) -> str:
    """An answer given as text, as one message object, or as a list of messages ending on the answer."""
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    elif isinstance(value, list):
        if not value or not isinstance(value[-1], dict):
            raise RecordError(field, "expected a message list ending on the answer")
        last = value[-1]
        role = str(last.get("role", last.get("from", ""))).lower()
        if MESSAGE_ROLES.get(role) != "assistant":
            raise RecordError(field, f"the last message must be the assistant's answer, not {role or '?'}")
        value = last.get("content", last.get("value"))
    if value is None:
        raise RecordError(field, "missing field")
    if not isinstance(value, str):
        raise RecordError(field, f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(field, "empty answer")
    return value


def _check_pair(prompt: Conversation, chosen: str, rejected: str) -> PreferencePair:
    if not prompt.turns or prompt.turns[-1].role != "user":
        raise RecordError("prompt", "the prompt must end with a user turn")
    if not prompt.turns[-1].content.strip():
        raise RecordError("prompt", "empty prompt")
    if chosen.strip() == rejected.strip():
        raise RecordError("rejected", "same text as chosen (a pair must differ)")
    return PreferencePair(prompt, chosen, rejected)


def _messages_prompt(value: Any, field: str) -> Conversation:
    """A prompt given as text or as a message list (OpenAI roles or ShareGPT's from/value)."""
    if isinstance(value, str):
        return Conversation([Turn("user", value)])
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        system, turns = _turns_from_list(value, field, "from", "value", SHAREGPT_ROLES)
    else:
        system, turns = _turns_from_list(value, field, "role", "content", MESSAGE_ROLES)
    return Conversation(turns, system=system)


# MedicalGPT's reward and DPO files (its medical reward set, DPO-En-Zh-20k-Preference) name alpaca's fields so.
MEDICALGPT_FIELDS = {"instruction": "question", "chosen": "response_chosen", "rejected": "response_rejected"}


def parse_pref_alpaca(rec: dict) -> PreferencePair:
    key = {ours: theirs if ours not in rec and theirs in rec else ours for ours, theirs in MEDICALGPT_FIELDS.items()}
    instruction = _text(rec, key["instruction"])
    query = _join(instruction, _text(rec, "input", required=False))
    turns = _history(rec, "history") + [Turn("user", query)]
    system = _text(rec, "system", required=False) or None
    return _check_pair(Conversation(turns, system=system), _answer(rec.get(key["chosen"]), key["chosen"]),
                       _answer(rec.get(key["rejected"]), key["rejected"]))


def parse_pref_sharegpt(rec: dict) -> PreferencePair:
    system, turns = _turns_from_list(rec.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    system = _text(rec, "system", required=False) or system
    return _check_pair(Conversation(turns, system=system), _answer(rec.get("chosen"), "chosen"),
                       _answer(rec.get("rejected"), "rejected"))


def _hh_dialogue(text: str, field: str) -> list[dict]:
    """HH-RLHF's ``\\n\\nHuman: ...\\n\\nAssistant: ...`` text as messages."""
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3 or parts[0].strip():
        raise RecordError(field, "expected a dialogue of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
    return [{"role": "user" if who == "Human" else "assistant", "content": said}
            for who, said in zip(parts[1::2], parts[2::2])]


def _split_dialogues(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(shared prompt messages, chosen answer messages, rejected answer messages) of two whole dialogues."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1].get("role") != "user":  # the prompt ends where the user last spoke
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def parse_pref_prompt(rec: dict) -> PreferencePair:
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if "prompt" not in rec:  # whole dialogues: HH-RLHF text, or message lists
        if isinstance(chosen, str) and isinstance(rejected, str):
            chosen, rejected = _hh_dialogue(chosen, "chosen"), _hh_dialogue(rejected, "rejected")
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            raise RecordError("prompt", "missing field (and chosen / rejected are not whole dialogues)")
        head, chosen, rejected = _split_dialogues(chosen, rejected)
        if not head:
            raise RecordError("chosen", "chosen and rejected share no prompt (no user turn before they differ)")
        prompt = _messages_prompt(head, "chosen")
    else:
        prompt = _messages_prompt(rec["prompt"], "prompt")
        n = len(prompt.messages())
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            # UltraFeedback-binarized repeats the prompt messages at the start of each side
            if isinstance(side, list) and len(side) > n and _messages_prompt(side[:n], key).messages() == \
                    prompt.messages():
                if key == "chosen":
                    chosen = side[n:]
                else:
                    rejected = side[n:]
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(side, list) and len(side) > 1:
            raise RecordError(key, f"expected one answer after the prompt, got {len(side)} messages")
    system = _text(rec, "system", required=False)
    if system.strip():  # a system column beside the prompt (e.g. Chinese-dpo-pairs)
        if prompt.system and prompt.system != system:
            raise RecordError("system", "differs from the system message inside the prompt")
        prompt.system = system
    return _check_pair(prompt, _answer(chosen, "chosen"), _answer(rejected, "rejected"))


def parse_kto(rec: dict) -> LabelledAnswer:
    label = rec.get("label")
    if "label" not in rec:
        raise RecordError("label", "missing field")
    if not isinstance(label, bool):
        raise RecordError("label", f"expected true or false, got {json.dumps(label, ensure_ascii=False)}")
    if "messages" in rec:
        messages = rec["messages"]
        if not isinstance(messages, list) or not messages:
            raise RecordError("messages", "expected a non-empty message list")
        prompt = _messages_prompt(messages[:-1], "messages")
        completion = _answer(messages, "messages")
    else:
        prompt = _messages_prompt(rec.get("prompt"), "prompt") if "prompt" in rec else None
        if prompt is None:
            raise RecordError("prompt", "missing field")
        completion = _answer(rec.get("completion"), "completion")
    if not prompt.turns or prompt.turns[-1].role != "user":
        raise RecordError("messages" if "messages" in rec else "prompt", "the prompt must end with a user turn")
    return LabelledAnswer(prompt, completion, label)


PARSERS = {"pref-alpaca": parse_pref_alpaca, "pref-sharegpt": parse_pref_sharegpt,
           "pref-prompt": parse_pref_prompt, "kto": parse_kto}


def detect_preference_format(rec: Any) -> str | None:
    """Guess a preference format from one record's keys (None when it is not preference data)."""
    if not isinstance(rec, dict):
        return None
    keys = set(rec)
    if "label" in keys and ("messages" in keys or "completion" in keys):
        return "kto"
    if "response_chosen" in keys or "response_rejected" in keys:
        return "pref-alpaca"
    if "chosen" in keys or "rejected" in keys:
        if "conversations" in keys:
            return "pref-sharegpt"
        if "instruction" in keys:
            return "pref-alpaca"
        return "pref-prompt"
    return None


def is_preference_file(path: str | Path, format: str = "auto") -> bool:
    """Whether a data file (its first record) is preference data."""
    if format != "auto":
        return format in PREFERENCE_FORMATS
    for f in expand_paths([path])[:1]:
        return detect_preference_format(first_record(f)) is not None
    return False


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------

def read_preferences(path: str | Path | Iterable[str | Path], format: str = "auto", on_bad_record: str = "error",
                     kind: str = "pairs") -> PreferenceReadResult:
    """Read preference pairs (``kind="pairs"``) or KTO's labelled answers (``kind="labelled"``).

    Pairs given to ``kind="labelled"`` become two labelled answers each (chosen: true, rejected: false), as
    KTO's authors use paired data.
    """
    result = PreferenceReadResult([])
    result.records.extend(iter_preferences(path, result, format, on_bad_record, kind))
    return result


def iter_preferences(path: str | Path | Iterable[str | Path], result: PreferenceReadResult, format: str = "auto",
                     on_bad_record: str = "error", kind: str = "pairs") -> Iterator[PreferencePair | LabelledAnswer]:
    """:func:`read_preferences` one record at a time (skipped records and the format go to ``result``)."""
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"on_bad_record must be 'error' or 'skip', not {on_bad_record!r}")
    format = (format or "auto").strip().lower()
    if format != "auto" and format not in PREFERENCE_FORMATS:
        raise DataError(f"unknown preference format {format!r}; choose from: auto, {', '.join(PREFERENCE_FORMATS)}")
    for p in expand_paths([path] if isinstance(path, (str, Path)) else list(path)):
        yield from _read_one(str(p), format, on_bad_record, kind, result)


def _not_preference(path: str, line: int, rec: dict, kind: str) -> DataError:
    sft = detect_format(rec)
    fields = "label" if kind == "labelled" else "chosen, rejected"
    need = "label plus messages (or prompt, completion)" if kind == "labelled" else "chosen and rejected answers"
    looks = f"this looks like SFT data ({sft}); " if sft else ""
    return DataError(f"{path}:{line}: {fields}: missing: {looks}preference stages need records with {need} "
                     f"(keys here: {', '.join(map(str, rec))}); see data/samples/preference_*.json*")


def _read_one(path: str, format: str, on_bad_record: str, kind: str, result: PreferenceReadResult
              ) -> Iterator[PreferencePair | LabelledAnswer]:
    def detect(path: str, line: int, rec: dict) -> str:
        fmt = detect_preference_format(rec)
        if fmt is None:
            raise _not_preference(path, line, rec, kind)
        return fmt

    def parse(fmt: str, rec: dict) -> PreferencePair | LabelledAnswer:
        item = PARSERS[fmt](rec)
        if kind == "pairs" and isinstance(item, LabelledAnswer):
            raise DataError(f"{path}: KTO data (one answer with a label) has no pairs; use stage kto")
        return item

    reader = RecordReader(path, None if format == "auto" else format, detect, parse, on_bad_record, result.skipped)
    for line, item in reader:
        item.prompt.source, item.prompt.line = path, line
        if kind == "labelled" and isinstance(item, PreferencePair):
            yield LabelledAnswer(item.prompt, item.chosen, True)
            yield LabelledAnswer(item.prompt, item.rejected, False)
        else:
            yield item
    result.format = result.format or (reader.format or "")


# --------------------------------------------------------------------------------------------------------
# Tokenizing (through the SFT path)
# --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PreferenceStats:
    """What tokenizing preference data did; every record left out is counted."""

    records: int = 0
    rows: int = 0
    truncated: int = 0
    no_room: list = dataclasses.field(default_factory=list)  # [where, prompt tokens] of prompts that fill cutoff_len
    skipped_records: int = 0
    prompt_tokens: list = dataclasses.field(default_factory=list)
    chosen_tokens: list = dataclasses.field(default_factory=list)
    rejected_tokens: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.rows} rows from {self.records} records"]
        if self.truncated:
            parts.append(f"{self.truncated} answers cut at cutoff_len")
        if self.no_room:
            parts.append(f"{len(self.no_room)} left out: the prompt leaves no room for an answer under cutoff_len "
                         f"({', '.join(w for w, _ in self.no_room[:5])}{' ...' if len(self.no_room) > 5 else ''})")
        if self.skipped_records:
            parts.append(f"{self.skipped_records} bad records skipped")
        return ", ".join(parts)


def split_answer(prompt: Conversation, answer: str, tokenizer: Any, template: Any, layout: tuple) -> tuple[
        list[int], list[int]]:
    """(prompt ids, answer ids) of ``prompt + answer`` rendered and masked exactly as SFT renders it."""
    conv = Conversation(prompt.turns + [Turn("assistant", answer)], system=prompt.system, tools=prompt.tools)
    settings = TokenizeSettings(cutoff_len=10 ** 9, last_turn_only=True)
    example, _ = encode_conversation(conv, tokenizer, template, settings, layout)[-1]
    if example is None:
        raise DataError(f"{prompt.where}: the answer renders to no trained tokens under this template")
    trained = [i for i, x in enumerate(example["labels"]) if x != IGNORE_INDEX]
    ids = example["input_ids"]
    return ids[: trained[0]], ids[trained[0]: trained[-1] + 1]


def tokenize_preferences(records: list, tokenizer: Any, template: Any, cutoff_len: int,
                         stats: PreferenceStats | None = None) -> tuple[list[dict], PreferenceStats]:
    """Rows for TRL: ``{prompt_ids, chosen_ids, rejected_ids}`` per pair, ``{prompt_ids, completion_ids, label}``
    per labelled answer. Answers are cut to fit ``cutoff_len`` (counted); a prompt that leaves no room for an
    answer is left out and listed in ``stats.no_room``."""
    stats = stats or PreferenceStats()
    layout = special_token_layout(tokenizer, template)
    rows = []
    for rec in records:
        stats.records += 1
        sides = ("chosen", "rejected") if isinstance(rec, PreferencePair) else ("completion",)
        encoded = [split_answer(rec.prompt, getattr(rec, s), tokenizer, template, layout) for s in sides]
        prompt_ids = encoded[0][0]
        stats.prompt_tokens.append(len(prompt_ids))
        for side, (_, answer_ids) in zip(sides, encoded):
            (stats.rejected_tokens if side == "rejected" else stats.chosen_tokens).append(len(answer_ids))
        room = cutoff_len - len(prompt_ids)
        if room < 1:
            stats.no_room.append((rec.where, len(prompt_ids)))
            continue
        row: dict[str, Any] = {"prompt_ids": prompt_ids}
        for side, (_, answer_ids) in zip(sides, encoded):
            if len(answer_ids) > room:
                stats.truncated += 1
            row[f"{side}_ids"] = answer_ids[:room]
        if isinstance(rec, LabelledAnswer):
            row["label"] = rec.label
        rows.append(row)
    stats.rows = len(rows)
    return rows, stats


# --------------------------------------------------------------------------------------------------------
# Writing and previewing
# --------------------------------------------------------------------------------------------------------

def to_record(item: PreferencePair | LabelledAnswer, format: str) -> dict:
    """One record of ``format`` (pref-prompt with message lists, pref-alpaca, or kto)."""
    prompt = item.prompt.messages()
    if format == "kto":
        if isinstance(item, PreferencePair):
            raise DataError(f"{item.where}: a pair is two kto records; read it with kind='labelled'")
        return {"messages": prompt + [{"role": "assistant", "content": item.completion}], "label": item.label}
    if not isinstance(item, PreferencePair):
        raise DataError(f"{item.where}: a labelled answer is not a pair; convert KTO data to kto")
    if format == "pref-prompt":
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": item.chosen}],
                "rejected": [{"role": "assistant", "content": item.rejected}]}
    if format == "pref-alpaca":
        turns = item.prompt.turns
        if any(t.role == "tool" for t in turns):
            raise DataError(f"{item.where}: pref-alpaca cannot hold tool turns; convert to pref-prompt")
        history = [[turns[i].content, turns[i + 1].content] for i in range(0, len(turns) - 1, 2)]
        out: dict[str, Any] = {"instruction": turns[-1].content, "input": "", "chosen": item.chosen,
                               "rejected": item.rejected}
        if item.prompt.system:
            out["system"] = item.prompt.system
        if history:
            out["history"] = history
        return out
    raise DataError(f"cannot write preference format {format!r}; choose from: pref-prompt, pref-alpaca, kto")


def write_preferences(items: Iterable, path: str | Path, format: str) -> int:
    """Write pairs / labelled answers as JSONL (``.jsonl``) or a JSON array (``.json``)."""
    records = [to_record(i, format) for i in items]
    path = Path(path)
    if path.suffix != ".json":
        return write_jsonl_atomic(path, records)
    with atomic_file(path) as fh:  # a crash or a full disk never leaves half a file
        fh.write(json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    return len(records)


def preview_pair(item: PreferencePair | LabelledAnswer, tokenizer: Any, template: Any, width: int = 48) -> str:
    """Prompt, then chosen and rejected side by side (or the labelled answer), with token counts."""
    import textwrap

    layout = special_token_layout(tokenizer, template)
    if isinstance(item, PreferencePair):
        prompt_ids, chosen_ids = split_answer(item.prompt, item.chosen, tokenizer, template, layout)
        _, rejected_ids = split_answer(item.prompt, item.rejected, tokenizer, template, layout)
        sides = [(f"chosen ({len(chosen_ids)} tokens)", tokenizer.decode(chosen_ids)),
                 (f"rejected ({len(rejected_ids)} tokens)", tokenizer.decode(rejected_ids))]
    else:
        prompt_ids, ids = split_answer(item.prompt, item.completion, tokenizer, template, layout)
        sides = [(f"{'desirable' if item.label else 'undesirable'} ({len(ids)} tokens)", tokenizer.decode(ids))]
    lines = [f"=== {item.where} ===", f"--- prompt ({len(prompt_ids)} tokens, not trained) ---",
             tokenizer.decode(prompt_ids)]
    columns = [[title, "-" * min(width, len(title))] + [w for para in text.splitlines() or [""]
                                                       for w in textwrap.wrap(para, width) or [""]]
               for title, text in sides]
    for i in range(max(len(c) for c in columns)):
        lines.append(" | ".join((c[i] if i < len(c) else "").ljust(width) for c in columns).rstrip())
    return "\n".join(lines)
