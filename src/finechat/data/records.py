"""Records from data files with the line each starts on: JSON arrays, JSONL, one JSON object, CSV/TSV.

We parse JSON ourselves (``json.JSONDecoder.raw_decode`` over the file) rather than with ``datasets`` because
every record must keep its file and line, so that a bad record is reported as ``file:line: field: reason``.
:func:`iter_json_records` lets the caller skip a bad JSONL line; :func:`json_lines` refuses the file instead.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from finechat.errors import DataError

MAX_DEPTH = 64  # lists / objects inside each other; a conversation needs about 5


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests lists / objects more than MAX_DEPTH deep (walked without recursion)."""
    level = [value]
    for _ in range(MAX_DEPTH + 1):
        level = [child for item in level if isinstance(item, (list, dict))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return False
    return True


def loads(text: str) -> Any:
    """``json.loads`` whose deeply nested input is a ``JSONDecodeError`` like any other bad JSON (Python's decoder
    raises RecursionError near 1,000 levels; records deeper than MAX_DEPTH are refused before anything recurses
    into them)."""
    try:
        value = json.loads(text)
        deep = _too_deep(value)
    except RecursionError:
        deep = True
    if deep:
        raise json.JSONDecodeError(f"lists or objects nested more than {MAX_DEPTH} deep", text, 0)
    return value


def _decode_text(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: (encoding): not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "re-save the file as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line, record, error)`` for a JSON array, a single JSON object, JSONL or CSV/TSV file.

    ``error`` is set (and ``record`` None) for a JSONL line that is not valid JSON or not UTF-8, so that the
    caller can skip it; an unreadable JSON array raises DataError since nothing after the error can be found.
    """
    path = str(path)
    if Path(path).suffix.lower() in (".csv", ".tsv"):
        yield from _iter_csv(path)
        return
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    head = data.lstrip()[:1]
    if head == b"[":
        text = _decode_text(data, path)
        yield from _iter_json_array(text, path)
        return
    lines = data.split(b"\n")
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is None:
        return
    try:
        loads(lines[first].decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        # Not JSONL: maybe one pretty-printed object (MOSS ships one conversation per file).
        text = _decode_text(data, path)
        try:
            yield first + 1, loads(text), None
            return
        except json.JSONDecodeError:
            pass  # report the first line's problem below, as JSONL
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            yield i + 1, loads(raw.decode("utf-8-sig" if i == 0 else "utf-8")), None
        except UnicodeDecodeError as e:
            yield i + 1, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
        except json.JSONDecodeError as e:
            yield i + 1, None, f"malformed JSON: {e.msg} (column {e.colno})"


def json_lines(text: str, path: str | Path,
               on_bad_line: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of JSON Lines ``text``.

    A line that is not JSON raises :class:`DataError` naming ``path:line`` (held-out questions, predictions,
    pretraining text and knowledge graphs refuse a bad file); with ``on_bad_line``, it is called with the
    line number and the JSON error instead and the line is skipped (search documents count what they skip).
    """
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = loads(line)
        except json.JSONDecodeError as e:
            if on_bad_line is None:
                raise DataError(f"{path}:{number}: invalid JSON: {e.msg}") from None
            on_bad_line(number, e.msg)
            continue
        yield number, value


def _iter_csv(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """CSV/TSV with a header row: each row is a record of text columns (a JSON list column is decoded)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    text = _decode_text(data, path)
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if path.lower().endswith(".tsv") else ",")
    start = 2
    for row in reader:
        line, start = start, reader.line_num + 1
        if None in row:
            yield line, None, f"{len(row[None])} more value(s) than header columns"
            continue
        rec = {}
        for k, v in row.items():
            if isinstance(v, str) and v.lstrip().startswith("[") and v.rstrip().endswith("]"):
                try:
                    v = loads(v)
                except json.JSONDecodeError:
                    pass
            rec[k] = v
        yield line, rec, None


def _iter_json_array(text: str, path: str) -> Iterator[tuple[int, Any, str | None]]:
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 1).end()
    line, last = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, last
        line += text.count("\n", last, p)
        last = p
        return line

    if text[pos:pos + 1] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
            if _too_deep(obj):
                raise json.JSONDecodeError(f"lists or objects nested more than {MAX_DEPTH} deep", text, pos)
        except RecursionError:
            raise DataError(f"{path}:{line_at(pos)}: (json): malformed JSON: lists or objects nested more than "
                            f"{MAX_DEPTH} deep") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: (json): malformed JSON: {e.msg} (column {e.colno})") from None
        yield line_at(pos), obj, None
        pos = ws.match(text, end).end()
        ch = text[pos:pos + 1]
        if ch == ",":
            pos = ws.match(text, pos + 1).end()
        elif ch == "]":
            return
        else:
            ln = line_at(pos)
            raise DataError(f"{path}:{ln}: (json): malformed JSON: expected ',' or ']' between records")
