"""The Data tab: what ``finechat data stats``, ``data preview`` and ``data licences`` say about one file.

Everything comes from the library functions behind those commands (:func:`read_conversations` with bad records
listed, :func:`length_stats`, :func:`encode_conversation` + :func:`marked_spans`, :func:`licence_summary`);
this module only arranges their answers as JSON for the page (a histogram as bins, spans as text + flag).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from finechat.data.catalog import all_entries, licence_summary
from finechat.data.formats import FORMATS, read_conversations
from finechat.data.inspection import length_stats, load_tokenizer_and_template, marked_spans
from finechat.data.pairs import PREFERENCE_FORMATS, is_preference_file, read_preferences
from finechat.data.tokenize import IGNORE_INDEX, TokenizeSettings, encode_conversation
from finechat.errors import FinechatError
from finechat.serve.schemas import ApiError

LENGTHS = [128, 256, 512, 1024, 2048]
BINS = 20


class Tokenizers:
    """Tokenizers (and templates) by model, loaded once per board: the default model's takes seconds."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._view_lock = threading.Lock()

    def get(self, model: str, template: str) -> tuple[Any, Any]:
        with self._view_lock:
            key = (model, template)
            if key not in self._cache:
                try:
                    self._cache[key] = load_tokenizer_and_template(model, template)
                except FinechatError as e:
                    raise ApiError(422, f"model: {e}", param="model", code="invalid_value") from None
                except Exception as e:  # noqa: BLE001  a folder that is no model: the input's fault, not a 500
                    raise ApiError(422, f"model: {model}: cannot load its tokenizer: {type(e).__name__}: {e}",
                                   param="model", code="invalid_value") from None
            return self._cache[key]


def dataset_names() -> list[str]:
    """The registry's data set names, for the licence picker."""
    return [e.name for e in all_entries() if e.kind == "dataset"]


def analyse(path: Path, shown: str, model_path: str, model_name: str, template: str, fmt: str, dataset: str | None,
            tokenizers: Tokenizers, cutoff_len: int = 1024, preview: int = 3) -> dict:
    """Format, counts, bad records (file, line, field, reason), length histogram, marked examples, licence."""
    if fmt not in ("auto", *FORMATS, *PREFERENCE_FORMATS):
        raise ApiError(422, f"format: {fmt!r} is not one of auto, {', '.join(FORMATS + PREFERENCE_FORMATS)}",
                       param="format", code="invalid_value")
    if dataset and dataset not in dataset_names():
        raise ApiError(422, f"dataset: {dataset!r} is not in the registry ({', '.join(dataset_names())})",
                       param="dataset", code="invalid_value")
    licence = licence_summary(model_name, [dataset] if dataset else [])
    try:
        if is_preference_file(path, fmt):
            result = read_preferences(path, fmt, on_bad_record="skip")
            return {"path": shown, "format": result.format, "kind": "preference",
                    "counts": {"records": len(result.records), "bad_records": len(result.skipped)},
                    "bad_records": _bad(result.skipped, path, shown), "licence": licence}
        result = read_conversations(path, format=fmt, on_bad_record="skip")
    except FinechatError as e:
        raise ApiError(422, f"path: {_shown(str(e), path, shown)}", param="path", code="unknown_format") from None
    except UnicodeDecodeError:
        raise ApiError(422, f"path: {shown} is not UTF-8 text", param="path", code="unknown_format") from None
    if not result.conversations and result.skipped:
        fmt_note = f" (read as {result.format})" if result.format else ""
        first = result.skipped[0]
        raise ApiError(422, f"path: no usable record in {shown}{fmt_note}; line {first[1]}: {first[2]}: {first[3]}",
                       param="path", code="unknown_format")
    tokenizer, tmpl = tokenizers.get(model_path, template)
    stats = length_stats(result.conversations, tokenizer, tmpl, LENGTHS)
    sizes = stats.pop("_sizes")
    examples = []
    settings = TokenizeSettings(cutoff_len=cutoff_len)
    for conv in result.conversations[:preview]:
        for example, status in encode_conversation(conv, tokenizer, tmpl, settings):
            if example is None:
                examples.append({"where": _shown(conv.where, path, shown), "status": status, "spans": []})
                continue
            examples.append({"where": _shown(conv.where, path, shown), "status": status,
                             "tokens": len(example["input_ids"]),
                             "trained": sum(1 for x in example["labels"] if x != IGNORE_INDEX),
                             "spans": [{"text": t, "trained": tr} for t, tr in
                                       marked_spans(tokenizer, example["input_ids"], example["labels"])]})
    return {"path": shown, "format": result.format, "kind": "sft", "template": getattr(tmpl, "name", "?"),
            "counts": {"conversations": stats["conversations"], "examples": stats["examples"],
                       "turns": stats["turns"], "multi_turn": stats["multi_turn"], "tool_turns": stats["tool_turns"],
                       "bad_records": len(result.skipped)},
            "tokens": stats["tokens"], "trained_tokens": stats["trained_tokens"], "over": stats["over"],
            "histogram": histogram(sizes), "bad_records": _bad(result.skipped, path, shown), "examples": examples,
            "licence": licence}


def histogram(sizes: list[int], bins: int = BINS) -> list[dict]:
    """Token lengths in ``bins`` equal-width bins: [{lo, hi, count}]."""
    if not sizes:
        return []
    lo, hi = min(sizes), max(sizes)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for s in sizes:
        counts[min(bins - 1, (s - lo) // width)] += 1
    return [{"lo": lo + i * width, "hi": lo + (i + 1) * width - 1, "count": c} for i, c in enumerate(counts)
            if lo + i * width <= hi]


def _bad(skipped: list, path: Path, shown: str) -> list[dict]:
    return [{"file": _shown(str(f), path, shown), "line": line, "field": field, "reason": reason}
            for f, line, field, reason in skipped[:200]]


def _shown(text: str, path: Path, shown: str) -> str:
    """A message with the file's absolute path replaced by its workspace path."""
    return text.replace(str(path), shown)
