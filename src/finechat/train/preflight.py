"""Checks of a training run's inputs that fail before the model loads (a minute on a CPU): the output folder (a
file, or a place that cannot be written), the data columns a recipe names, and every record of the data files.

A recipe written for one data set (``prompt_column: content`` for ADGEN) and run on another (``data=[alpaca.json]``)
used to fail at tokenization, after the model had loaded, with ``content: missing field``; here it fails at once,
naming the recipe key to change and the columns the file has.

The record pass (:func:`check_records`) parses each record of the local JSON / JSONL / CSV / TSV files (compressed
ones too) as the stage's reader will, one at a time (memory stays flat in the record count), without tokenizing:
a bad record on line 5,000 is the reader's one-line ``file:line: field: reason`` before the model loads, not after.
It costs about 1-1.5 s per 100,000 short records, 3-4 times a bare ``json.loads`` of each line, with flat memory
(docs/results/preflight.md). It is left out where a full pass is not cheap or not wanted: ``streaming: true`` (the
run reads the data once, as it trains), hub names, ``datasets`` folders and Parquet / Arrow tables (read through
pyarrow, checked as they stream), ``on_bad_record: skip`` (the run lists what it skips) and plain-text
pretraining documents.
"""

from __future__ import annotations

import os
from pathlib import Path

from finechat.data.formats import ReadResult, iter_conversations
from finechat.data.pairs import PreferenceReadResult, iter_preferences
from finechat.data.records import iter_json_records
from finechat.data.sources import data_suffix, is_hub_name, is_table_source
from finechat.errors import ConfigError
from finechat.train.train_config import TrainConfig

COLUMN_KEYS = ("prompt_column", "response_column", "history_column")
_RECORD_FILES = (".json", ".jsonl", ".csv", ".tsv")


def check_before_loading(cfg: TrainConfig, config: str | None = None) -> None:
    """Raise a one-line error for an output folder that cannot be written or holds checkpoints the run would train
    over, or a column setting the data lacks."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file; give a folder to write checkpoints into")
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out}: cannot write in {existing} (permission denied); choose another folder")
    check_resume(cfg, out)
    check_columns(cfg, config)


def check_resume(cfg: TrainConfig, output_dir: Path) -> None:
    """A ``resume_from_checkpoint`` path that is no complete checkpoint, or an ``output_dir`` that already holds
    checkpoints a new run would train over (neither resume nor ``overwrite_output_dir`` set): one line. Checked
    here, before a launch, and again by each run (``trainer_setup.resolve_resume``)."""
    from finechat.train import checkpoints

    if cfg.resume_from_checkpoint == "auto":
        return
    if cfg.resume_from_checkpoint:
        path = Path(cfg.resume_from_checkpoint)
        if not path.is_dir() or not checkpoints.is_complete(path):
            raise ConfigError(f"resume_from_checkpoint: {path} is not a complete finechat checkpoint")
        return
    existing = checkpoints.list_checkpoints(output_dir)
    if existing and not cfg.overwrite_output_dir:
        raise ConfigError(
            f"output_dir {output_dir} already has checkpoints ({existing[-1].name}); set "
            "resume_from_checkpoint=auto to continue, overwrite_output_dir=true to start over, or another output_dir"
        )


def check_columns(cfg: TrainConfig, config: str | None = None) -> None:
    """The columns a recipe names (``prompt_column``, ...) against the first record of each data file."""
    named = {key: getattr(cfg, key) for key in COLUMN_KEYS if getattr(cfg, key)}
    if cfg.stage != "sft" or not named:
        return
    where = f" (set in {config} or on the command line)" if config else ""
    for name in cfg.data:
        path = Path(name).expanduser()
        if not path.is_file() or path.suffix.lower() not in _RECORD_FILES:
            continue  # folders, hub names and other kinds are read (and checked) by the data readers
        line, record, _ = next(iter(iter_json_records(path)), (0, None, None))
        if not isinstance(record, dict):
            continue  # a bad first record is reported by the reader, with its line
        for key, column in named.items():
            if column not in record:
                columns = ", ".join(sorted(map(str, record)))
                raise ConfigError(
                    f"{path}:{line}: no column {column!r}, which {key}: {column} names{where}; this file's columns "
                    f"are {columns}: change {', '.join(named)} to fit them, or remove them to let finechat detect "
                    "the format")


def local_record_files(sources: list[str]) -> list[str]:
    """The sources that are local JSON / JSONL / CSV / TSV files (or folders of them): what a full pass reads."""
    out = []
    for source in sources:
        path = Path(source).expanduser()
        if is_hub_name(source) or is_table_source(path):
            continue
        if path.is_dir():
            out += [str(f) for f in sorted(path.rglob("*")) if f.is_file() and data_suffix(f) in _RECORD_FILES]
        elif path.is_file() and data_suffix(path) in _RECORD_FILES:
            out.append(str(path))
    return out


def check_records(cfg: TrainConfig, kind: str) -> None:
    """Parse every record of the run's local data files as its stage's reader will (``kind``: the stage record's
    ``records``; not tokenized, nothing kept): the first bad one raises the reader's ``file:line: field: reason``.
    Left out for ``streaming: true``, ``on_bad_record: skip``, plain-text documents, and sources that are not local
    record files (see the module's docstring)."""
    if cfg.streaming or cfg.on_bad_record != "error" or kind == "documents":
        return
    files = local_record_files([*cfg.data, *([cfg.val_file] if cfg.val_file else [])])
    if not files:
        return
    if kind == "conversations":
        columns = {key: getattr(cfg, key) for key in COLUMN_KEYS if getattr(cfg, key)}
        records = iter_conversations(files, ReadResult([]), cfg.format, "error", **columns)
    else:
        records = iter_preferences(files, PreferenceReadResult([]), cfg.format, "error", kind=kind)
    for _ in records:
        pass
