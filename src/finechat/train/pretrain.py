"""``stage: pretrain``: continued pretraining on plain text, with a table of objectives.

Documents come from ``.txt`` files (one per line, or one per file with ``document_per: file``) or JSON
lines with a ``text`` field. The default objective is the causal language model: every token is a target,
each document ends with EOS, documents longer than ``cutoff_len`` are cut into consecutive chunks, and the
chunks are packed into ``cutoff_len`` rows with positions restarting per document (the data module's
``pack_examples``), so no compute is spent on padding and no document attends to another.

Other objectives register a builder in :data:`OBJECTIVES` (GLM's blank infilling:
``register_objective("blank_infilling", fn)`` from ``finechat.data.blank_infilling``). A builder takes
``(documents, tokenizer, cfg)`` and returns ``(examples, stats)`` where examples are
``{"input_ids", "labels"}`` (plus ``position_ids`` / ``attention_mask`` if it needs them).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finechat.errors import ConfigError, DataError
from finechat.train.config import TrainConfig

OBJECTIVES: dict[str, Callable[[list[str], Any, TrainConfig], tuple[list[dict], dict]]] = {}
# objectives that live in other modules, imported on first use so that they can register themselves
OBJECTIVE_MODULES = {"blank_infilling": "finechat.data.blank_infilling"}


def register_objective(name: str, builder: Callable[[list[str], Any, TrainConfig], tuple[list[dict], dict]]) -> None:
    """Make ``objective: name`` build its examples with ``builder(documents, tokenizer, cfg)``."""
    OBJECTIVES[name] = builder


def get_objective(name: str) -> Callable:
    if name not in OBJECTIVES and name in OBJECTIVE_MODULES:
        try:
            importlib.import_module(OBJECTIVE_MODULES[name])
        except ImportError as e:
            raise ConfigError(f"objective {name!r} needs {OBJECTIVE_MODULES[name]}, which is not available: {e}") from e
    if name not in OBJECTIVES:
        known = sorted(set(OBJECTIVES) | set(OBJECTIVE_MODULES))
        raise ConfigError(f"unknown objective {name!r}; choose from: {', '.join(known)}")
    return OBJECTIVES[name]


def read_documents(paths: list[str], document_per: str = "line") -> list[str]:
    """Plain-text documents from .txt files (per line or per file) or .json/.jsonl records with ``text``."""
    docs: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"{p}: no such data file")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if path.suffix in (".jsonl", ".json"):
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{n}: (json): {e.msg}") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f"{p}:{n}: text: a pretraining record needs a 'text' string")
                docs.append(rec["text"])
        elif document_per == "file":
            if text.strip():
                docs.append(text)
        else:
            docs += [line for line in text.splitlines() if line.strip()]
    if not docs:
        raise DataError(f"no text in {', '.join(paths)}")
    return docs


def causal_lm_examples(documents: list[str], tokenizer: Any, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Documents -> packed rows for the causal language-model objective."""
    from finechat.data.tokenize import pack_examples

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    chunks: list[dict] = []
    tokens = 0
    for doc in documents:
        ids = bos + list(tokenizer(doc, add_special_tokens=False)["input_ids"]) + eos
        tokens += len(ids)
        for start in range(0, len(ids), cfg.cutoff_len):
            piece = ids[start:start + cfg.cutoff_len]
            if len(piece) > 1:
                chunks.append({"input_ids": piece, "labels": list(piece)})
    rows = pack_examples(chunks, cfg.cutoff_len)
    return rows, {"documents": len(documents), "chunks": len(chunks), "rows": len(rows), "tokens": tokens}


register_objective("causal_lm", causal_lm_examples)
