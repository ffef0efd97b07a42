"""What ``finechat train --estimate`` reads from the data: the shape of the largest forward pass a run makes.

A batch is padded to its longest row, not to ``cutoff_len``, so the peak comes from the longest rows: on short
data (arithmetic answers of ~60 tokens against a cutoff of 512) an estimate at ``cutoff_len`` is several times
the real peak. The rows are tokenized exactly as the run will (the stage's own reader, the tokenized cache),
with the tokenizer alone: no weights are read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from finechat.data.templates import get_template
from finechat.models.resolve import resolve_model_path
from finechat.train.align import ALIGN_STAGES, PAIR_STAGES, load_preference_data, load_prompt_data
from finechat.train.distributed import model_type_of
from finechat.train.recipe import load_data
from finechat.train.train_config import TrainConfig


@dataclasses.dataclass
class ForwardShape:
    """Sequences in one forward pass, the longest of them, the share of positions the LM head projects, and
    whether a reference model runs a forward pass too."""

    sequences: int
    seq_len: int
    answer_fraction: float = 1.0
    reference: bool = False
    source: str = "data"


def _lengths(cfg: TrainConfig, rows: list[dict]) -> tuple[int, float]:
    """(longest sequence, answer share of the positions in the longest rows) for the stage's rows."""
    if cfg.stage == "grpo":  # prompt + sampled completion; the loss projects the completion positions only
        longest = max(len(r["prompt_ids"]) for r in rows) + cfg.max_completion_length
        return longest, (cfg.max_completion_length + 1) / longest
    if cfg.stage in ALIGN_STAGES:
        seqs = []
        for r in rows:
            prompt = len(r.get("prompt_ids") or r.get("prompt_input_ids") or [])
            for key in ("chosen_ids", "rejected_ids", "completion_ids", "chosen_input_ids", "rejected_input_ids"):
                if key in r:
                    whole = key.endswith("input_ids") or cfg.stage == "rm"
                    seqs.append((len(r[key]) + (0 if whole else prompt), len(r[key]) - (prompt if whole else 0)))
        longest = max(s for s, _ in seqs)
        answers = sorted(seqs, reverse=True)[: max(1, cfg.per_device_train_batch_size * 2)]
        return longest, sum(a for _, a in answers) / (len(answers) * longest)
    return max(len(r["input_ids"]) for r in rows), 1.0


def forward_shape(cfg: TrainConfig, tokenizer: Any = None) -> ForwardShape:
    """The largest forward pass of the run ``cfg`` describes (falls back to ``cutoff_len`` without data)."""
    from transformers import AutoTokenizer

    pairs = cfg.stage in PAIR_STAGES or cfg.stage == "kto"
    sequences = cfg.per_device_train_batch_size * (2 if pairs else 1)  # grpo's batch counts completions
    reference = cfg.beta > 0 if cfg.stage == "grpo" else cfg.stage in ("dpo", "kto")
    if not cfg.data:
        return ForwardShape(sequences, cfg.cutoff_len, reference=reference, source="cutoff_len")
    if tokenizer is None:
        folder, gguf_file = resolve_model_path(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code,
                                                  **({"gguf_file": gguf_file} if gguf_file else {}))
    template = get_template(cfg.template, tokenizer, model_type_of(cfg.model))
    if cfg.stage == "grpo":
        rows = load_prompt_data(cfg, tokenizer, template)[0]
    elif cfg.stage in ALIGN_STAGES:
        rows = load_preference_data(cfg, tokenizer, template)[0]
    else:
        rows = load_data(cfg, tokenizer, template)[0]
    seq_len, answers = _lengths(cfg, rows)
    # the compact LM head (preference stages on a CPU) and GRPO's loss project answer positions only
    fraction = answers if cfg.stage in ALIGN_STAGES and cfg.stage != "rm" else 1.0
    return ForwardShape(sequences, min(seq_len, cfg.cutoff_len + (cfg.max_completion_length
                                                                  if cfg.stage == "grpo" else 0)),
                        answer_fraction=fraction, reference=reference)
