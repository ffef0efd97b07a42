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

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finechat.data.formats import json_lines
from finechat.errors import ConfigError, DataError
from finechat.train.config import TrainConfig

Builder = Callable[[list[str], Any, TrainConfig], tuple[list[dict], dict]]


@dataclasses.dataclass
class Objective:
    """How ``objective: NAME`` builds rows from documents, and the collator its rows need (None: padding)."""

    build: Builder
    collator: Callable[[Any], Any] | None = None  # tokenizer -> collator


OBJECTIVES: dict[str, Objective] = {}
# objectives living in other modules: "module:builder[:CollatorClass]" (the class takes the pad token id)
LAZY_OBJECTIVES = {"blank_infilling": "finechat.data.blank_infilling:blank_infilling_examples:BlankInfillingCollator"}


def register_objective(name: str, build: Builder, collator: Callable[[Any], Any] | None = None) -> None:
    """Make ``objective: name`` build its rows with ``build(documents, tokenizer, cfg)``."""
    OBJECTIVES[name] = Objective(build, collator)


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def get_objective(name: str) -> Objective:
    if name in LAZY_OBJECTIVES and (name not in OBJECTIVES or OBJECTIVES[name].collator is None):
        module_name, build_name, *collator_name = LAZY_OBJECTIVES[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"objective {name!r} needs {module_name}, which is not available: {e}") from e
        collator = None
        if collator_name:
            cls = getattr(module, collator_name[0])

            def collator(tokenizer: Any, cls: Any = cls) -> Any:
                return cls(_pad_id(tokenizer))
        # the module may have registered its builder on import (without a collator)
        build = OBJECTIVES[name].build if name in OBJECTIVES else getattr(module, build_name)
        register_objective(name, build, collator)
    if name not in OBJECTIVES:
        known = sorted(set(OBJECTIVES) | set(LAZY_OBJECTIVES))
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
            for n, rec in json_lines(text, p):
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
