"""Checks of a training run's inputs that fail before the model loads (a minute on a CPU): the output folder (a
file, or a place that cannot be written) and the data columns a recipe names.

A recipe written for one data set (``prompt_column: content`` for ADGEN) and run on another (``data=[alpaca.json]``)
used to fail at tokenization, after the model had loaded, with ``content: missing field``; here it fails at once,
naming the recipe key to change and the columns the file has.
"""

from __future__ import annotations

import os
from pathlib import Path

from finechat.data.records import iter_json_records
from finechat.errors import ConfigError
from finechat.train.train_config import TrainConfig

COLUMN_KEYS = ("prompt_column", "response_column", "history_column")
_RECORD_FILES = (".json", ".jsonl", ".csv", ".tsv")


def check_before_loading(cfg: TrainConfig, config: str | None = None) -> None:
    """Raise a one-line error for an output folder that cannot be written or a column setting the data lacks."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file; give a folder to write checkpoints into")
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out}: cannot write in {existing} (permission denied); choose another folder")
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
