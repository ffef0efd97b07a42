"""Turn a loaded base model into the model a method trains: LoRA, P-Tuning v2, full, freeze, or QLoRA.

Everything adapter-shaped goes through peft (LoRA, DoRA, rsLoRA, PrefixTuning = P-Tuning v2) so that the
checkpoints are plain peft folders other tools load. Dtype rules, chosen so that none of the "expected
scalar type Half but found Float" errors reported against quantized ChatGLM bases can happen:

- a quantized base goes through peft's ``prepare_model_for_kbit_training`` (norms and embeddings in
  float32, input gradients on for checkpointing);
- every trainable parameter is float32 (mixed precision then only changes the compute dtype under autocast,
  and the optimizer never sees half-precision master weights);
- full and freeze training load the base in float32 for the same reason.

P-Tuning v2 on a model that implements it natively (ChatGLM-6B's own ``prefix_encoder``, whose checkpoints
ChatGLM-6B's ptuning scripts read) goes through the model's ``enable_prefix_tuning``; every other model gets
peft's ``PrefixTuningConfig``.
"""

from __future__ import annotations

import warnings
from typing import Any

from finechat.console import log
from finechat.errors import ConfigError
from finechat.models.peft_compat import fix_prefix_generation
from finechat.models.resolve import load_adapter
from finechat.train.distributed import world
from finechat.train.train_config import TrainConfig


def base_dtype(cfg: TrainConfig, device: str):
    """The dtype to load the base weights in (frozen weights may be half; trained ones never are)."""
    import torch

    if device == "cuda" and cfg.adapter_method in ("lora", "ptuning"):
        if cfg.bf16:
            return torch.bfloat16
        if cfg.fp16:
            return torch.float16
    return torch.float32


def quantization_config(cfg: TrainConfig, compute_dtype: Any) -> Any:
    """A bitsandbytes config for ``quantization_bit`` (NF4 with double quantization, as in QLoRA)."""
    if not cfg.quantization_bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError("quantization_bit needs bitsandbytes: pip install 'finechat[train]'") from e
    from transformers import BitsAndBytesConfig

    if cfg.quantization_bit == 4:
        # FSDP2 shards a 4-bit weight only when its packed bytes are stored in a float dtype (peft's FSDP + QLoRA
        # recipe: bnb_4bit_quant_storage = the model's dtype); accelerate keeps uint8-stored ones whole on every rank.
        # ZeRO-3 partitions either (measured on CPU ranks); it gets peft's DeepSpeed ZeRO-3 + QLoRA recipe all the same
        sharded = cfg.distributed.strategy in ("fsdp2", "zero3") and world()[2] > 1
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, **({"bnb_4bit_quant_storage": compute_dtype} if sharded else {}),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def default_lora_targets(model: Any) -> list[str] | str:
    """LoRA target modules for the architecture: peft's table, else every linear layer but the head."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(model.config, "model_type", ""))
    return list(targets) if targets else "all-linear"


def decoder_layers(model: Any) -> tuple[str, Any]:
    """(qualified name, ModuleList) of the model's stack of decoder layers."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "num_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            best = best or (name, module)
    if best is None:
        raise ConfigError(
            f"freeze: cannot find the {n} decoder layers of {type(model).__name__}; "
            "name the modules to train with freeze_trainable_modules"
        )
    return best


def apply_freeze(model: Any, cfg: TrainConfig) -> Any:
    """Train only the last ``num_layer_trainable`` layers, or the parameters named in freeze_trainable_modules."""
    if cfg.freeze_trainable_modules:
        keys = cfg.freeze_trainable_modules
        which = f"modules matching {', '.join(keys)}"
    else:
        prefix, layers = decoder_layers(model)
        if cfg.num_layer_trainable > len(layers):
            raise ConfigError(f"num_layer_trainable {cfg.num_layer_trainable} > the model's {len(layers)} layers")
        first = len(layers) - cfg.num_layer_trainable
        keys = [f"{prefix}.{i}." for i in range(first, len(layers))]
        which = f"layers {first}..{len(layers) - 1} of {len(layers)}"
    matched = 0
    for name, param in model.named_parameters():
        param.requires_grad = any(k in name for k in keys)
        matched += param.requires_grad
    if not matched:
        raise ConfigError(f"freeze: no parameter name contains any of {keys}")
    log(f"freeze: training {which}")
    return model


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target or default_lora_targets(model)
    if targets in (["all-linear"], "all-linear"):  # peft's own keyword: every Linear layer but the output head
        targets = "all-linear"
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=targets, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ConfigError(f"lora_target {targets}: {str(e).splitlines()[0]}") from e


def apply_ptuning(model: Any, cfg: TrainConfig) -> Any:
    if hasattr(model, "enable_prefix_tuning"):  # the model's own prefix encoder, the rest frozen
        model.enable_prefix_tuning(cfg.pre_seq_len, bool(cfg.prefix_projection))
        return model
    from peft import PrefixTuningConfig, get_peft_model

    prefix = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.pre_seq_len, prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=model.config.hidden_size,
    )
    peft_model = fix_prefix_generation(get_peft_model(model, prefix))  # do_predict generates with this model
    # FSDP2 shards per class named in _no_split_modules (accelerate's transformer wrap policy reads it from the
    # model it prepares); peft calls the prefix encoder from PeftModel.forward, outside the decoder layers, so it
    # gets a unit of its own whose pre-forward hook gathers its embedding (in the root unit it met plain tensors:
    # "aten.embedding.default got mixed torch.Tensor and DTensor")
    peft_model._no_split_modules = [*(getattr(model, "_no_split_modules", None) or []), "PrefixEncoder"]
    return peft_model


def prepare_model(model: Any, cfg: TrainConfig) -> Any:
    """Apply ``cfg.method`` to a loaded base model; returns the model to hand to the Trainer."""
    if cfg.quantization_bit:
        from peft import prepare_model_for_kbit_training

        # bitsandbytes' 8-bit matmul casts float32 inputs to float16 and warns on every call.
        warnings.filterwarnings("ignore", message=".*inputs will be cast from")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing and cfg.adapter_method in ("lora", "ptuning"):
        # Checkpointed blocks need an input that requires grad, or a frozen base gets no gradient at all.
        model.enable_input_require_grads()
    if cfg.adapter:  # continue from an earlier stage's checkpoint
        if cfg.adapter_method in ("lora", "ptuning"):
            model = load_adapter(model, cfg.adapter, is_trainable=True)
        else:  # full / freeze: start from its weights (a LoRA adapter is merged in first)
            model = load_adapter(model, cfg.adapter)
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
    continuing = bool(cfg.adapter) and cfg.adapter_method in ("lora", "ptuning")  # that adapter is trained on
    if cfg.adapter_method == "lora" and not continuing:
        model = apply_lora(model, cfg)
    elif cfg.adapter_method == "ptuning" and not continuing:
        model = apply_ptuning(model, cfg)
    elif cfg.adapter_method == "freeze":
        model = apply_freeze(model, cfg)
    elif cfg.adapter_method == "full":
        for p in model.parameters():
            p.requires_grad = True
    trainable_to_float32(model)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache while training (and it conflicts with checkpointing)
    return model


def trainable_to_float32(model: Any) -> Any:
    """Every trainable parameter in float32 (the dtype rule above); frozen and quantized weights stay as they are."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(all parameters, trainable parameters); 4-bit weights count as their unpacked size."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable
