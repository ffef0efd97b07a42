"""Records from data files with the line each starts on: JSON arrays, JSONL, one JSON object, CSV/TSV.

:class:`RecordReader` is the one record loop of every reader (SFT conversations, preference pairs): it
detects the format from the first good record, parses each record and reports a bad one as
``file:line: field: reason`` or skips and lists it, as ``on_bad_record`` says.

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

from finechat.data.sources import (
    COMPRESSED_SUFFIXES,
    compression_error,
    data_suffix,
    is_table_source,
    open_binary,
    table_records,
)
from finechat.errors import DataError, DataFileError

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
        # fewer brackets than levels allowed cannot nest too deep: most records skip the walk
        deep = text.count("[") + text.count("{") > MAX_DEPTH and _too_deep(value)
    except RecursionError:
        deep = True
    if deep:
        raise json.JSONDecodeError(f"lists or objects nested more than {MAX_DEPTH} deep", text, 0)
    return value


class RecordError(Exception):
    """A bad field inside one record; the reader adds file and line."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def object_records(path: str) -> Iterator[tuple[int, Any, RecordError | None]]:
    """``(line, record, error)`` of a data file: ``error`` says why a line holds no JSON object (the reader
    raises or skips it as ``on_bad_record`` says)."""
    if is_table_source(path):
        yield from table_records(path)
        return
    if not Path(path).is_file():
        raise DataFileError(f"{path}: no such data file")
    for line, rec, error in iter_json_records(path):
        if error:
            yield line, None, RecordError("(encoding)" if error.startswith("not UTF-8") else "(json)", error)
        elif not isinstance(rec, dict):
            yield line, None, RecordError("(record)", f"expected a JSON object, got {type(rec).__name__}")
        else:
            yield line, rec, None


def first_record(path: str) -> dict | None:
    """The first record of a data source (what format detection looks at); None when it is no JSON object."""
    for _, rec, _ in object_records(path):
        return rec
    return None


class RecordReader:
    """The record loop of one file: ``(line, item)`` for each good record, bad ones raised or listed.

    ``detect(path, line, record)`` names the format of the file from its first good record (raising
    :class:`DataError` when nothing fits) unless ``format`` is given; ``parse(format, record)`` makes the
    item or raises :class:`RecordError`. With ``on_bad_record="skip"`` a bad record is appended to
    ``skipped`` as ``(file, line, field, reason)``, never dropped silently. ``format`` holds the file's format
    once detected (also when every record was skipped).
    """

    def __init__(self, path: str, format: str | None, detect: Callable[[str, int, dict], str],
                 parse: Callable[[str, dict], Any], on_bad_record: str, skipped: list):
        self.path, self.format, self.detect, self.parse = path, format, detect, parse
        self.on_bad_record, self.skipped = on_bad_record, skipped
        self._columns: list[str] | None = None  # a Parquet file's column names, read when a field is missing

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        path = self.path
        for line, rec, error in object_records(path):
            try:
                if error:
                    raise error
                if self.format is None:
                    self.format = self.detect(path, line, rec)
                item = self.parse(self.format, rec)
            except RecordError as e:
                absent = self._absent_column(e)
                if absent:  # every row lacks it: the file has the wrong columns, not a bad record
                    raise DataFileError(absent) from None
                if self.on_bad_record == "error":
                    raise DataError(f"{path}:{line}: {e.field}: {e.reason}") from None
                self.skipped.append((path, line, e.field, e.reason))
                continue
            yield line, item


    def _absent_column(self, error: RecordError) -> str | None:
        """The one-line message when a Parquet file has no column for a missing field at all, else None."""
        if error.reason != "missing field" or data_suffix(self.path) != ".parquet":
            return None
        if self._columns is None:
            import pyarrow.parquet as pq

            self._columns = list(pq.read_schema(self.path).names)
        column = error.field.split(".")[0]
        if column in self._columns:
            return None
        return (f"{self.path}: (parquet): no column {column!r}, which format {self.format} needs (columns: "
                f"{', '.join(self._columns)}); pass the format that fits them, or prompt_column / response_column")


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
    JSONL is read line by line (also through ``.gz`` / ``.zst``), so memory stays flat in the file size; a
    JSON array or a single object is read whole.
    """
    path = str(path)
    if data_suffix(path) in (".csv", ".tsv"):
        yield from _iter_csv(path)
        return
    number = 0
    try:
        with open_binary(path) as fh:
            head: list[bytes] = []
            for raw in fh:
                number += 1
                head.append(raw)
                if raw.strip():
                    break
            else:
                return  # an empty file
            first = head[-1]
            if first.lstrip()[:1] == b"[":
                text = _decode_text(b"".join(head) + fh.read(), path)
                yield from _iter_json_array(text, path)
                return
            try:
                loads(first.decode("utf-8-sig"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                # Not JSONL: maybe one pretty-printed object (MOSS ships one conversation per file).
                data = b"".join(head) + fh.read()
                try:
                    yield number, loads(_decode_text(data, path)), None
                    return
                except json.JSONDecodeError:
                    pass  # report the first line's problem below, as JSONL
                yield from _jsonl_lines(enumerate(data.split(b"\n"), start=1))
                return
            yield from _jsonl_lines(enumerate(head, start=1))

            def rest() -> Iterator[tuple[int, bytes]]:
                nonlocal number
                for raw in fh:
                    number += 1
                    yield number, raw

            yield from _jsonl_lines(rest())
    except (EOFError, OSError) as e:
        if Path(path).suffix.lower() not in COMPRESSED_SUFFIXES or isinstance(e, FileNotFoundError):
            raise DataFileError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        raise compression_error(path, number + 1, e) from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":  # zstandard's own error class (an optional package)
            raise compression_error(path, number + 1, e) from None
        raise


def _jsonl_lines(numbered: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, Any, str | None]]:
    for number, raw in numbered:
        if not raw.strip():
            continue
        try:
            yield number, loads(raw.decode("utf-8-sig" if number == 1 else "utf-8")), None
        except UnicodeDecodeError as e:
            yield number, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
        except json.JSONDecodeError as e:
            yield number, None, f"malformed JSON: {e.msg} (column {e.colno})"


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
    with open_binary(path) as fh:
        data = fh.read()
    text = _decode_text(data, path)
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if data_suffix(path) == ".tsv" else ",")
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
