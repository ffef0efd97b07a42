"""``finechat data`` on preference data: convert, statistics of each side, and side-by-side previews."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from finechat.data.formats import expand_paths
from finechat.data.pairs import (
    PreferenceStats,
    detect_preference_format,
    preview_pair,
    read_preferences,
    tokenize_preferences,
    write_preferences,
)
from finechat.data.records import first_record
from finechat.errors import DataError


def _kind(format: str, path: str) -> str:
    """'labelled' for KTO data, else 'pairs'."""
    if format == "kto":
        return "labelled"
    if format == "auto":
        return "labelled" if detect_preference_format(first_record(expand_paths([path])[0])) == "kto" else "pairs"
    return "pairs"


def _read(paths: list[str], format: str, on_bad_record: str, kind: str | None = None) -> Any:
    result = read_preferences(paths, format, on_bad_record, kind=kind or _kind(format, paths[0]))
    if result.skipped:
        print(result.skipped_table(), file=sys.stderr)
    return result


def convert_preferences(args: argparse.Namespace) -> int:
    """``data convert`` of preference data to pref-prompt, pref-alpaca or kto (pairs become two kto records)."""
    if args.to not in ("pref-prompt", "pref-alpaca", "kto"):
        raise DataError(f"{args.input} is preference data: convert it --to pref-prompt, pref-alpaca or kto")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise DataError(f"{args.output}: the output would overwrite the input")
    result = _read([args.input], args.format, args.on_bad_record, "labelled" if args.to == "kto" else None)
    n = write_preferences(result.records, args.output, args.to)
    print(f"wrote {n} records as {args.to} to {args.output}; read {len(result.records)} as {result.format}, "
          f"skipped {len(result.skipped)} bad record(s)")
    return 0


def _percentiles(values: list[int]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    pick = [v[min(len(v) - 1, round(q / 100 * (len(v) - 1)))] for q in (50, 90, 99)]
    return f"p50 {pick[0]}, p90 {pick[1]}, p99 {pick[2]}, max {v[-1]}"


def preference_stats(paths: list[str], format: str, on_bad_record: str, tokenizer: Any, template: Any,
                     lengths: list[int], as_json: bool = False) -> str:
    """Pairs (or labelled answers), bad records, and token lengths of prompt / chosen / rejected."""
    result = _read(paths, format, on_bad_record)
    stats = PreferenceStats(skipped_records=len(result.skipped))
    cutoff = max(lengths) if lengths else 10 ** 9
    tokenize_preferences(result.records, tokenizer, template, cutoff, stats)
    answers = (stats.rejected_tokens or [0] * len(stats.chosen_tokens))
    longest = [p + max(c, r) for p, c, r in zip(stats.prompt_tokens, stats.chosen_tokens, answers)]
    labelled = bool(result.records) and not hasattr(result.records[0], "rejected")
    numbers = {
        "files": paths, "format": result.format, "template": getattr(template, "name", "?"),
        ("labelled answers" if labelled else "pairs"): len(result.records),
        "bad records skipped": len(result.skipped),
        "prompt tokens": _percentiles(stats.prompt_tokens),
        ("answer tokens" if labelled else "chosen tokens"): _percentiles(stats.chosen_tokens),
    }
    if labelled:
        numbers["desirable / undesirable"] = (f"{sum(r.label for r in result.records)} / "
                                              f"{sum(not r.label for r in result.records)}")
    else:
        numbers["rejected tokens"] = _percentiles(stats.rejected_tokens)
    for n in lengths:
        over = sum(1 for p in stats.prompt_tokens if p >= n)
        numbers[f"prompts with no room under {n}"] = over
        numbers[f"rows over {n} (prompt + longer answer)"] = sum(1 for t in longest if t > n)
    if as_json:
        return json.dumps(numbers, ensure_ascii=False, indent=2)
    width = max(len(k) for k in numbers)
    return "\n".join(f"{k.ljust(width)}  {', '.join(v) if isinstance(v, list) else v}" for k, v in numbers.items())


def preview_preferences(path: str, format: str, on_bad_record: str, tokenizer: Any, template: Any, start: int,
                        num: int) -> str:
    """The first ``num`` records from ``start``: prompt, then chosen and rejected side by side."""
    result = _read([path], format, on_bad_record)
    head = (f"# template: {getattr(template, 'name', '?')}; {len(result.records)} records in {path} "
            f"({result.format}); the prompt is never trained")
    return "\n\n".join([head] + [preview_pair(r, tokenizer, template) for r in result.records[start:start + num]])
