"""DPO's per-token log-probabilities on a CPU, projected through the LM head only where an answer token is.

TRL (1.16) gives the model its preference trainers train a fused, chunked log-probability head
(``trl.trainer.utils.add_fused_lm_head``): no ``[batch, seq, vocab]`` logits. With Triton (CUDA, XPU) that head
projects only the positions whose label counts; on every other device it projects *every* position of the
batch, prompt and padding included (on compiled devices a changing row count would recompile), and its torch
fallback holds about nine float32 copies of a ``[positions, 32768]`` vocabulary tile at once in the backward.
A DPO batch holds chosen and rejected, twice SFT's sequences: on the default model and the arithmetic pairs on
a CPU that head added ~520 MiB to the backward's peak and ~280 MiB to the forward's (8 x 64 positions, under
100 of them answer tokens), most of the gap to LoRA SFT (benchmarks/dpo_memory.py). A CPU compiles nothing, so
here the head projects only the answer positions, through TRL's own kernel (the same math and output fields),
in vocabulary tiles narrowed to the number of rows. Heads TRL scales (logit soft-capping, logit multipliers)
and MoE models keep TRL's own head.
"""

from __future__ import annotations

import functools
from typing import Any

# config fields that make TRL scale the head's logits (then its own head is kept)
SCALED_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                      "logits_scaling")
# every per-token field TRL's trainers read from the head (cheap on answer positions only)
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
COMPILED_DEVICES = ("cuda", "xpu")  # where TRL's head already projects answer positions only
# Vocabulary columns a tile holds: TRL's 32,768 halved (down to 4,096) until a tile holds at most TILE_VALUES
# float32 values, since the fallback keeps ~9 copies of it. Measured on the default model's head, 95 answer rows:
# peak 130 MiB at 32,768 and 27 MiB at 8,192, the same time on one thread (0.25-0.3 s); on two threads of a busy
# machine each tile's ops wait for the second thread (0.8 s at 32,768, 1.8 s at 8,192).
MAX_VOCAB_TILE, MIN_VOCAB_TILE = 32768, 4096
TILE_VALUES = 2 ** 20  # 4 MiB a copy


def vocab_tile(rows: int) -> int:
    """Vocabulary columns of one tile for ``rows`` projected positions (see TILE_VALUES)."""
    width = MAX_VOCAB_TILE
    while width > MIN_VOCAB_TILE and rows * width > TILE_VALUES:
        width //= 2
    return width


def compact_log_prob_head(model: Any) -> bool:
    """Make ``model`` (already given TRL's fused head) project only labelled positions on non-Triton devices.

    Returns False, leaving TRL's head as it is, for heads TRL scales and for MoE models.
    """
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(config, name, None) is not None for name in SCALED_HEAD_FIELDS) \
            or getattr(config, "output_router_logits", False):
        return False
    trl_forward = model.forward

    @functools.wraps(trl_forward)
    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                **kwargs: Any) -> Any:
        if not fused_lm_head or labels is None or shift_labels is not None \
                or labels.device.type in COMPILED_DEVICES:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]  # [batch, seq - 1, hidden]
        targets = labels[:, 1:].to(hidden.device)
        mask = targets != -100  # answer positions: the only ones any DPO loss reads
        head = model.get_output_embeddings()
        rows = hidden[mask]  # [answer tokens, hidden]
        # The head's weight is read here, outside the head's own forward: under DeepSpeed ZeRO-3 such a read can
        # meet a partitioned, empty weight (numel 0: no vocabulary, every log-probability -inf), so it is gathered
        # for the read as TRL's own head does (the kernel's backward gathers again); a no-op where it is whole.
        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            per_token = ChunkedLogProbFunction.apply(rows, head.weight, head.bias, targets[mask], 1.0,
                                                     vocab_tile(len(rows)), None, 1.0, OUTPUTS)
        # back to [batch, seq - 1], zero where there is no label (what TRL's head returns)
        log_probs, entropy, log_sum_sq, mean_logits, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x)
                                                                for x in per_token)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items is None else num_items)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = forward
    return True
