"""What ``finechat train --estimate`` reads from the data: the shape of the largest forward pass a run makes.

A batch is padded to its longest row, not to ``cutoff_len``, so the peak comes from the longest rows: on short
data (arithmetic answers of ~60 tokens against a cutoff of 512) an estimate at ``cutoff_len`` is several times
the real peak. The rows are tokenized exactly as the run will (the stage's own reader, the tokenized cache),
with the tokenizer alone: no weights are read.
"""

from __future__ import annotations

from typing import Any

from finechat.data.templates import get_template
from finechat.models.resolve import resolve_model_path
from finechat.train.distributed import model_type_of
from finechat.train.estimate import ForwardShape
from finechat.train.stage_table import forward_shape as stage_shape
from finechat.train.stage_table import get_stage
from finechat.train.train_config import TrainConfig


def forward_shape(cfg: TrainConfig, tokenizer: Any = None) -> ForwardShape:
    """The largest forward pass of the run ``cfg`` describes (falls back to ``cutoff_len`` without data)."""
    from transformers import AutoTokenizer

    stage = get_stage(cfg.stage)
    if not cfg.data:
        return stage_shape(stage, cfg, [])
    if tokenizer is None:
        folder, gguf_file = resolve_model_path(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code,
                                                  **({"gguf_file": gguf_file} if gguf_file else {}))
    template = get_template(cfg.template, tokenizer, model_type_of(cfg.model))
    rows = stage.rows(stage.read(cfg, tokenizer, template, None)[0])  # as the run reads them (tokenized cache)
    return stage_shape(stage, cfg, rows)
