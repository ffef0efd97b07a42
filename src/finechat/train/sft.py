"""``stage: sft``: supervised fine-tuning on conversations, labels on the answers, on transformers' Trainer.

The stage's parts for its record in :mod:`finechat.train.stage_table`: the data reader (tokenized with the
chat template by :mod:`finechat.data.tokenize`, held out, packed) and the trainer builder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from finechat.data.catalog import LICENCE_FILE
from finechat.data.mixing import MixSettings
from finechat.data.token_cache import build_dataset, pack_rows, stream_examples
from finechat.data.token_cache import longest_row as longest_cached_row
from finechat.data.tokenize import TokenizeSettings, data_collator
from finechat.errors import ConfigError
from finechat.train import checkpoints
from finechat.train.train_config import TrainConfig
from finechat.train.trainer_setup import split_holdout


def read_sft(cfg: TrainConfig, tokenizer: Any, template: Any, cache_dir: str | None = None
             ) -> tuple[list[dict], list[dict], dict]:
    """(train examples, eval examples, info) of SFT data: conversations tokenized with the template."""
    settings = TokenizeSettings(
        cutoff_len=cfg.cutoff_len, max_source_length=cfg.max_source_length, max_target_length=cfg.max_target_length,
        train_on_prompt=cfg.train_on_prompt, last_turn_only=cfg.last_turn_only,
        skip_overlength=cfg.skip_overlength, packing=False,  # packed after the validation split
    )
    columns = {k: getattr(cfg, k) for k in ("prompt_column", "response_column", "history_column") if getattr(cfg, k)}
    read = {"format": cfg.format, "on_bad_record": cfg.on_bad_record, **columns}
    mix = MixSettings(list(cfg.mix), cfg.mix_stop, cfg.seed) if cfg.mix else None
    evals = build_dataset([cfg.val_file], tokenizer, template, settings, cache_dir=cache_dir, **read)[0] \
        if cfg.val_file else []
    if cfg.streaming:
        return streamed_rows(cfg, tokenizer, template, settings, mix, read), evals, {
            "stage": "sft", "streaming": True, "summary": "streamed: tokenized as read, no cache",
            "sources": [{"source": s} for s in cfg.data]}
    train, stats = build_dataset(cfg.data, tokenizer, template, settings, cache_dir=cache_dir, mix=mix,
                                 num_proc=cfg.num_proc, **read)
    train = train[: cfg.max_samples or None]
    if not cfg.val_file:
        train, evals = split_holdout(train, cfg.val_size, cfg.seed)
    if not train:
        raise ConfigError(f"no training examples left from {', '.join(cfg.data)}: {stats.summary()}")
    if cfg.packing:
        train = pack_rows(train, cfg.cutoff_len)  # lazily over the memory-mapped cache
    info = {"stage": "sft", **dataclasses.asdict(stats), "summary": stats.summary(), "train_rows": len(train),
            "eval_rows": len(evals)}
    return train, evals, info


def streamed_rows(cfg: TrainConfig, tokenizer: Any, template: Any, settings: TokenizeSettings,
                  mix: MixSettings | None, read: dict) -> Any:
    """A torch IterableDataset over ``cfg.data`` tokenized as it is read; each epoch reads the data again."""
    import torch

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return stream_examples(cfg.data, tokenizer, template, settings, mix=mix, **read)

    return Stream()


def trainer_with_collator(cfg: TrainConfig, model: Any, tokenizer: Any, args: Any, train: list, evals: list | None,
                          callbacks: list, info: dict, licence: dict, collator: Any) -> Any:
    """transformers' Trainer saving atomic, self-describing checkpoints (finechat.train.checkpoints)."""
    return checkpoints.make_trainer_class()(
        model=model, args=args, train_dataset=train, eval_dataset=evals,
        data_collator=collator, processing_class=tokenizer,
        callbacks=callbacks, run_info=info, keep_checkpoints=cfg.save_total_limit,
        extra_files={LICENCE_FILE: licence},  # a checkpoint used as a base model still knows its licences
    )


def sft_trainer(cfg: TrainConfig, model: Any, tokenizer: Any, args: Any, train: list, evals: list | None,
                callbacks: list, info: dict, licence: dict) -> Any:
    """The SFT trainer: padding collator (labels padded with -100)."""
    return trainer_with_collator(cfg, model, tokenizer, args, train, evals, callbacks, info, licence,
                                 data_collator(tokenizer))


def longest_row(cfg: TrainConfig, rows: list[dict]) -> int:
    """The memory estimate's sequence length for tokenized rows: the longest one (cutoff_len when streamed)."""
    return cfg.cutoff_len if cfg.streaming else longest_cached_row(rows)


def all_positions(cfg: TrainConfig, rows: list[dict]) -> float:
    """The share of a sequence's positions the LM head projects in training: all of them."""
    return 1.0


def no_reference(cfg: TrainConfig) -> bool:
    """No reference model runs beside the policy."""
    return False


def one_sequence(cfg: TrainConfig) -> int:
    """Sequences an SFT / pretraining example puts through the model."""
    return 1
