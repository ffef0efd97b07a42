"""``stage: pretrain``: continued pretraining on plain text, with a table of objectives.

Documents come from ``.txt`` files (one per line, or one per file with ``document_per: file``) or JSON
lines with a ``text`` field. The default objective is the causal language model: every token is a target,
each document ends with EOS, documents longer than ``cutoff_len`` are cut into consecutive chunks, and the
chunks are packed into ``cutoff_len`` rows with positions restarting per document (the data module's
``pack_examples``), so no compute is spent on padding and no document attends to another.

Objectives are looked up by name in :data:`OBJECTIVES` (``causal_lm``, and GLM's ``blank_infilling`` from
``finechat.data.blank_infilling``); :func:`register_objective` adds one. A builder takes
``(documents, tokenizer, cfg)`` and returns ``(examples, stats)`` where examples are
``{"input_ids", "labels"}`` (plus ``position_ids`` / ``attention_mask`` if it needs them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from finechat.data.blank_infilling import BlankInfillingCollator, blank_infilling_examples
from finechat.data.documents import read_documents
from finechat.data.tokenize import data_collator, pack_examples
from finechat.errors import ConfigError
from finechat.train.sft import trainer_with_collator
from finechat.train.train_config import TrainConfig
from finechat.train.trainer_setup import split_holdout

__all__ = ["OBJECTIVES", "Objective", "get_objective", "pretrain_trainer", "read_documents", "read_pretrain",
           "register_objective"]

Builder = Callable[[list[str], Any, TrainConfig], tuple[list[dict], dict]]


@dataclasses.dataclass
class Objective:
    """How ``objective: NAME`` builds rows from documents, and the collator its rows need (None: padding)."""

    build: Builder
    collator: Callable[[Any], Any] | None = None  # tokenizer -> collator


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, build: Builder, collator: Callable[[Any], Any] | None = None) -> None:
    """Make ``objective: name`` build its rows with ``build(documents, tokenizer, cfg)``."""
    OBJECTIVES[name] = Objective(build, collator)


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose from: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def causal_lm_examples(documents: list[str], tokenizer: Any, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Documents -> packed rows for the causal language-model objective."""
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


def _blank_infilling_collator(tokenizer: Any) -> Any:
    return BlankInfillingCollator(_pad_id(tokenizer))


register_objective("causal_lm", causal_lm_examples)
register_objective("blank_infilling", blank_infilling_examples, _blank_infilling_collator)


# -- the stage's parts (its record is in finechat.train.stage_table) -----------------------------------------
def read_pretrain(cfg: TrainConfig, tokenizer: Any, template: Any, cache_dir: str | None = None
                  ) -> tuple[list[dict], list[dict], dict]:
    """(train rows, eval rows, info) of plain-text documents, built by the objective."""
    build = get_objective(cfg.objective).build
    docs = read_documents(cfg.data, cfg.document_per)[: cfg.max_samples or None]
    val_docs = read_documents([cfg.val_file], cfg.document_per) if cfg.val_file else []
    if not val_docs:
        docs, val_docs = split_holdout(docs, cfg.val_size, cfg.seed)
    train, stats = build(docs, tokenizer, cfg)
    evals = build(val_docs, tokenizer, cfg)[0] if val_docs else []
    return train, evals, {"stage": "pretrain", "objective": cfg.objective, **stats}


def pretrain_trainer(cfg: TrainConfig, model: Any, tokenizer: Any, args: Any, train: list, evals: list | None,
                     callbacks: list, info: dict, licence: dict) -> Any:
    """transformers' Trainer with the objective's collator (GLM's rows carry 2D positions), else padding."""
    padding = data_collator(tokenizer)
    collator = (get_objective(cfg.objective).collator or (lambda _: padding))(tokenizer)
    return trainer_with_collator(cfg, model, tokenizer, args, train, evals, callbacks, info, licence, collator)
