"""Several models / adapters on the same data: one metrics table and example answers side by side.

An entry is ``base`` (the ``--model`` alone), an adapter folder (put on ``--model``), a model folder /
``.gguf`` / ``default``, or an existing predictions file (``.jsonl``/``.json``/``.txt``, scored without a
model). This is the "before / after" view of ChatGLM-6B's and ChatDoctor's write-ups.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

from finechat.errors import FinechatError
from finechat.eval.metrics import compute_metrics, format_table
from finechat.eval.predict import predict, read_predictions, write_outputs
from finechat.files import atomic_file, write_json_atomic
from finechat.generate.chat_loader import load as load_chat_model


@dataclasses.dataclass
class Entry:
    """One column of a comparison."""

    name: str
    model: str | None = None
    adapter: str | None = None
    predictions: str | None = None  # a file to re-score instead of generating


def resolve_entries(specs: list[str], base_model: str = "default") -> list[Entry]:
    """Turn command-line words into entries, with short unique names."""
    entries = []
    for spec in specs:
        path = Path(spec).expanduser()
        if spec == "base":
            entries.append(Entry("base", model=base_model))
        elif path.is_file() and path.suffix in (".jsonl", ".json", ".txt"):
            entries.append(Entry(path.parent.name or path.stem, predictions=str(path)))
        elif path.is_dir() and (path / "adapter_config.json").is_file():
            entries.append(Entry(path.name, model=base_model, adapter=str(path)))
        elif spec == "default" or path.exists():
            entries.append(Entry(path.name if spec != "default" else "default", model=spec))
        else:
            raise FinechatError(f"--compare {spec}: not 'base', an adapter folder, a model or a predictions file")
    names = [e.name for e in entries]
    for e, spec in zip(entries, specs):
        if names.count(e.name) > 1:
            e.name = spec
    if len({e.name for e in entries}) < len(entries):
        raise FinechatError(f"--compare names the same entry twice: {' '.join(specs)}")
    return entries


def run_entry(entry: Entry, examples: list | None, output_dir: Path | None, load_options: dict, settings: Any,
              batch_size: int, with_loss: bool) -> tuple[dict, list[dict]]:
    """Metrics and prediction records for one entry (generating them, or reading its file)."""

    if entry.predictions:
        records = read_predictions(entry.predictions)
        if examples is not None and len(records) != len(examples):
            raise FinechatError(f"{entry.predictions} has {len(records)} predictions but the data has "
                                f"{len(examples)} examples")
        metrics = compute_metrics([r["predict"] for r in records], [r["label"] for r in records])
        if output_dir is not None:
            write_outputs(output_dir, records, metrics)
        return metrics, records
    if examples is None:
        raise FinechatError(f"{entry.name}: --data is needed to run a model")
    bot = load_chat_model(entry.model, adapter=entry.adapter, **load_options)
    info = {"model": entry.model, "adapter": entry.adapter}
    metrics, records = predict(bot, examples, output_dir, settings, batch_size, with_loss, info=info)
    del bot
    return metrics, records


def side_by_side(records_by_name: dict[str, list[dict]], count: int = 2, width: int = 100) -> str:
    """The first ``count`` examples: prompt, reference and every entry's answer, one block per example."""
    names = list(records_by_name)
    if not names or count <= 0:
        return ""
    first = records_by_name[names[0]]
    label_width = max(len(n) for n in [*names, "reference"]) + 2
    blocks = []
    for i in range(min(count, len(first))):
        lines = [f"── example {i + 1} " + "─" * 40]
        prompt = first[i].get("prompt") or ""
        lines += _wrap("prompt", prompt, label_width, width)
        lines += _wrap("reference", first[i]["label"], label_width, width)
        for name in names:
            answer = records_by_name[name][i]["predict"] if i < len(records_by_name[name]) else ""
            lines += _wrap(name, answer or "(empty)", label_width, width)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _wrap(label: str, text: str, label_width: int, width: int) -> list[str]:
    # CJK characters are two columns wide in a terminal: wrap on half the width for them.
    wide = sum(1 for c in text if ord(c) > 0x2E80) > len(text) / 3
    body = textwrap.wrap(text.replace("\n", " ⏎ "), max(20, (width - label_width) // (2 if wide else 1))) or [""]
    return [f"{label + ':':<{label_width}}{body[0]}"] + [" " * label_width + line for line in body[1:]]


def compare(entries: list[Entry], examples: list | None, output_dir: str | Path | None, load_options: dict,
            settings: Any, batch_size: int = 8, with_loss: bool = True, show_examples: int = 2) -> dict:
    """Run every entry; write per-entry files and ``compare.json`` / ``compare.md``; return the report."""
    out = Path(output_dir) if output_dir else None
    metrics_by_name: dict[str, dict] = {}
    records_by_name: dict[str, list[dict]] = {}
    for entry in entries:
        metrics, records = run_entry(entry, examples, out / _safe(entry.name) if out else None, load_options,
                                     settings, batch_size, with_loss)
        metrics_by_name[entry.name] = metrics
        records_by_name[entry.name] = records
    table = format_table(metrics_by_name)
    examples_text = side_by_side(records_by_name, show_examples)
    report = {"table": table, "examples": examples_text, "metrics": metrics_by_name,
              "entries": [dataclasses.asdict(e) for e in entries]}
    if out:
        write_json_atomic(out / "compare.json", {k: v for k, v in report.items() if k != "table"})
        with atomic_file(out / "compare.md") as fh:
            fh.write(table + "\n\n```\n" + examples_text + "\n```\n")
    return report


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "entry"
