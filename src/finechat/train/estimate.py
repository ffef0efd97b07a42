"""Estimate a training run's peak memory before it starts, so a run that will not fit fails in seconds.

The estimate adds, in bytes:
- weights: frozen base weights in their storage dtype (4/8-bit linear layers with ``quantization_bit``),
  trainable weights in float32;
- gradients (float32) and optimizer state of the trainable parameters (AdamW: two float32 moments);
- activations kept for the backward pass, from Korthikanti et al. 2022 ("Reducing Activation Recomputation
  in Large Transformer Models", eq. 2): per layer ``s*b*h*(34 + 5*a*s/h)`` bytes at 16-bit, doubled in
  float32, without the ``5*a*s/h`` attention-score term when the model runs SDPA / flash attention on CUDA
  (the scores are not kept there; on a CPU they are); with gradient checkpointing only each layer's input (``2*s*b*h`` at 16-bit) plus one
  layer;
- logits: ``b*s*vocab`` float32 values about three times (logits, log-softmax, their gradient); for
  preference stages on a CPU only the answer positions (finechat's compact LM head), plus the reference
  model's forward.
P-Tuning v2 lengthens every layer's keys and values by ``pre_seq_len``. ``b`` and ``s`` are the sequences one
forward pass takes (a preference pair is two; GRPO's batch counts completions) and the longest of them.

On several processes the terms are per rank, as ``distributed.strategy`` splits them: DDP holds everything
plus a second copy of the gradients in its all-reduce buckets; ZeRO-2 splits the optimizer state and keeps a
float32 partition of the trainable weights; ZeRO-3 and FSDP2 split weights, gradients and optimizer state and
gather one decoder layer's weights at a time; on CPU ranks ZeRO-3 is counted as measured instead (the whole
model each rank loads before DeepSpeed partitions it, plus its partition and prefetch bucket).

"estimated peak" is the training's own memory; on a CPU "peak per process" adds the interpreter and its
libraries (torch, transformers, TRL: ``RUNTIME_BYTES``, measured) and is what a process's peak resident set
is compared with (benchmarks and docs/distributed.md: within 30% for sft, dpo and grpo at 1 and 2 processes).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from finechat.models.device import pick_device
from finechat.models.resolve import resolve_model_path
from finechat.train.methods import count_parameters, prepare_model
from finechat.train.train_config import TrainConfig

GiB = 1024**3
# Resident memory of a training process before any model loads (Python, torch, transformers, peft, TRL, the
# tokenizer): measured at 0.50-0.55 GiB with `resource.getrusage` after the imports `finechat train` makes.
RUNTIME_BYTES = 0.55 * GiB
SHARDED = ("fsdp2", "zero2", "zero3")
# TRL's fused log-prob head (the stages whose record says fused_head; DPO has finechat's compact one instead): off
# Triton devices its torch fallback projects every position and holds ~9 float32 copies of a [positions, 32768]
# vocabulary tile in the backward (finechat.train.compact_head's docstring); measured on GRPO.
FUSED_TILE, FUSED_COPIES = 32768, 9
ZERO3_PREFETCH = 5e7  # DeepSpeed's stage3_prefetch_bucket_size default (elements)
OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "adafactor": 4, "sgd": 0, "lion": 4}


@dataclasses.dataclass
class MemoryEstimate:
    """Parameter counts and an estimate of peak training memory, in bytes."""

    parameters: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    available: float | None = None
    device: str = "cpu"
    processes: int = 1
    strategy: str = "ddp"
    runtime: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def per_process(self) -> float:
        return self.total + self.runtime

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def table(self) -> str:
        rows = [
            ("parameters", f"{self.parameters / 1e6:,.1f} M"),
            ("trainable parameters", f"{self.trainable / 1e6:,.3f} M ({100 * self.trainable / max(self.parameters, 1):.2f}%)"),
            ("weights", _gib(self.weights)),
            ("gradients", _gib(self.gradients)),
            ("optimizer state", _gib(self.optimizer)),
            ("activations", _gib(self.activations)),
            ("logits", _gib(self.logits)),
            ("estimated peak", _gib(self.total)),
        ]
        if self.processes > 1:
            rows.insert(2, ("per rank of", f"{self.processes} processes, {self.strategy}"))
        if self.runtime:
            rows.append(("peak per process (+ runtime)", _gib(self.per_process)))
        if self.available is not None:
            verdict = "fits" if self.fits else "WILL NOT FIT"
            rows.append((f"available ({self.device})", f"{_gib(self.available)}  -> {verdict}"))
        width = max(len(k) for k, _ in rows)
        lines = [f"| {'memory estimate'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.01 * GiB else f"{n / 1024**2:.1f} MiB"


def available_memory(device: str) -> float | None:
    """Free accelerator memory, or total RAM on CPU."""
    try:
        if device == "cuda":
            import torch

            return float(torch.cuda.mem_get_info()[0])
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def _linear_parameters(model: Any) -> int:
    """Parameters in the linear layers bitsandbytes would quantize (all but the output head)."""
    import torch

    n = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name and "lora_" not in name:
            n += module.weight.numel()
    return n


@dataclasses.dataclass
class ForwardShape:
    """Sequences in one forward pass, the longest of them, the share of positions the LM head projects, and
    whether a reference model runs a forward pass too."""

    sequences: int
    seq_len: int
    answer_fraction: float = 1.0
    reference: bool = False
    source: str = "data"
    fused_head: bool = False  # TRL's fused log-prob head: on a CPU it projects every position


def estimate_memory(model: Any, cfg: TrainConfig, seq_len: int | None = None, device: str = "cpu",
                    linear_params: int | None = None, processes: int | None = None,
                    answer_fraction: float = 1.0, reference: bool = False, fused_head: bool = False
                    ) -> MemoryEstimate:
    """Estimate peak memory per process for training ``model`` (already prepared for ``cfg.method``).

    ``processes``: how many ranks share the run (default: WORLD_SIZE); ``answer_fraction``: the share of
    positions the LM head projects (preference stages on a CPU); ``reference``: a reference forward pass too;
    ``fused_head``: TRL's fused log-prob head (see FUSED_HEAD_STAGES).
    """

    total, trainable = count_parameters(model)
    config = model.config
    h = getattr(config, "hidden_size", 0) or 0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    heads = getattr(config, "num_attention_heads", 1) or 1
    vocab = getattr(config, "vocab_size", 0) or 0
    b = cfg.per_device_train_batch_size
    s = seq_len or cfg.cutoff_len
    half = cfg.fp16 or cfg.bf16
    frozen = total - trainable
    if cfg.quantization_bit:
        linear = linear_params if linear_params is not None else _linear_parameters(model)
        weights = linear * cfg.quantization_bit / 8 + (frozen - linear) * 4 + trainable * 4
    else:
        base_bytes = 2 if (half and device == "cuda" and cfg.adapter_method in ("lora", "ptuning")) else 4
        weights = frozen * base_bytes + trainable * 4
    opt = next((v for k, v in OPTIMIZER_BYTES.items() if cfg.optim.startswith(k)), 8)
    kv_len = s + (cfg.pre_seq_len if cfg.adapter_method == "ptuning" else 0)
    scale = 1 if half else 2  # the formula counts 16-bit activations
    # SDPA / flash attention on CUDA keep no scores; on a CPU they are kept (measured: packed 2 x 512-token rows
    # of the default model peak at 3.6 GiB a rank, as with the score term, against 2.5 GiB without it)
    scores = device != "cuda" or getattr(config, "_attn_implementation", None) not in (
        "sdpa", "flash_attention_2", "flex_attention")
    per_layer = s * b * h * (34 + (5 * heads * kv_len / max(h, 1) if scores else 0)) * scale
    if cfg.gradient_checkpointing:
        activations = layers * 2 * s * b * h * scale + per_layer
    else:
        activations = layers * per_layer
    if fused_head and device != "cuda":
        logits = FUSED_COPIES * b * s * min(vocab, FUSED_TILE) * 4
    else:
        logits = 3 * b * s * vocab * 4 * answer_fraction * (4 / 3 if reference else 1)
    gradients, optimizer = trainable * 4.0, trainable * float(opt)
    n = processes or int(os.environ.get("WORLD_SIZE", "1"))
    strategy = cfg.distributed.strategy if n > 1 else "ddp"
    whole = weights
    if strategy in ("fsdp2", "zero3"):  # 1/n of everything, plus one decoder layer gathered at a time
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        in_layers = total - (embeddings.weight.numel() if embeddings is not None else 0)
        weights = weights / n + weights * in_layers / max(total, 1) / max(layers, 1)
        gradients /= n
    if strategy == "zero3" and device != "cuda":
        # measured on CPU ranks: each rank loads the whole model before DeepSpeed partitions it, and ZeRO-3's
        # partitions and prefetch bucket come on top of what the process already holds (its peak RSS is above
        # ZeRO-2's, docs/results/distributed.md)
        weights = whole + whole / n + min(ZERO3_PREFETCH, total) * 4.0
    if strategy in SHARDED:
        optimizer /= n
    if strategy in ("zero2", "zero3"):
        optimizer += trainable * 4.0 / n  # ZeRO's float32 partition of the trainable weights
    if strategy == "ddp" and n > 1:
        gradients *= 2  # DDP's all-reduce buckets hold a second copy
    return MemoryEstimate(
        parameters=total, trainable=trainable, weights=weights, gradients=gradients,
        optimizer=optimizer, activations=float(activations), logits=float(logits),
        available=available_memory(device), device=device, processes=n, strategy=strategy,
        runtime=RUNTIME_BYTES if device == "cpu" else 0.0,
    )


def estimate_without_weights(cfg: TrainConfig, seq_len: int | None = None, processes: int = 1,
                             answer_fraction: float = 1.0, reference: bool = False, fused_head: bool = False
                    ) -> MemoryEstimate:
    """``finechat train --estimate``: build the model on the meta device (no weights read) and estimate."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, gguf_file = resolve_model_path(cfg.model)
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(folder, **kw)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code,
                                                 dtype=torch.float32)
    # tie_weights() does not tie on the meta device: share the tensor by hand, as the loaded model does
    out_emb = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and out_emb is not None:
        out_emb.weight = model.get_input_embeddings().weight
    linear = _linear_parameters(model)
    # quantized layers cannot be built on the meta device: prepare the unquantized model, count bytes by bits
    plain = dataclasses.replace(cfg, quantization_bit=None, method=cfg.adapter_method, adapter=None)
    with init_empty_weights(include_buffers=False):
        model = prepare_model(model, plain)
    return estimate_memory(model, cfg, seq_len=seq_len, device=pick_device("auto"), linear_params=linear,
                           processes=processes, answer_fraction=answer_fraction, reference=reference,
                           fused_head=fused_head)
