"""A reward model: the same base with a one-score head (transformers' ``*ForSequenceClassification``).

Built from an already loaded causal LM rather than with ``from_pretrained`` so that every way finechat loads a
base (``default``, a folder, a GGUF file, a merged stage) gives its reward model too: the decoder weights
move over as they are, and the score head starts from transformers' own initialisation.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from finechat.errors import ConfigError


def _classifier(causal_lm: Any, config: Any) -> Any:
    """transformers' sequence classifier for ``config`` (on the current default device), or a ConfigError."""
    from transformers import AutoModelForSequenceClassification

    try:
        # Under DeepSpeed ZeRO-3 (the Trainer's arguments made it the process's setting) from_config would build the
        # classifier inside zero.Init, with every weight already partitioned to an empty tensor, and the base's
        # decoder could not be copied in ("size mismatch ... torch.Size([0])"). The base was loaded whole, so the
        # classifier is too: DeepSpeed partitions the model at deepspeed.initialize. transformers' own marker
        # "a zero.Init is already running" skips the nested one.
        with _no_zero3_init():
            return AutoModelForSequenceClassification.from_config(config, dtype=causal_lm.dtype)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"stage rm: transformers has no sequence-classification class for model_type "
                          f"{config.model_type!r} ({type(causal_lm).__name__}), so no reward model can be built on "
                          "it; train the reward model on another base (e.g. default)") from e


def _no_zero3_init() -> Any:
    try:
        from transformers.modeling_utils import set_zero3_state
    except ImportError:  # a transformers without it builds no zero.Init here
        return contextlib.nullcontext()
    return set_zero3_state()


@contextlib.contextmanager
def zero3_off() -> Iterator[None]:
    """Load whole weights while the Trainer's arguments have made DeepSpeed ZeRO-3 the process's setting.

    transformers keeps that setting in one module global (a weak reference to the Trainer's ``HfDeepSpeedConfig``)
    and, while it is set, ``from_pretrained`` builds every model inside ``zero.Init`` (each weight partitioned to an
    empty tensor). A model that is only called, never trained or wrapped by DeepSpeed (GRPO's reward model, scored
    on every rank), must be whole: the setting is lifted for the load and put back after it.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # a transformers without it builds no zero.Init
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def reward_model_from(causal_lm: Any, pad_token_id: int | None) -> Any:
    """A ``num_labels=1`` sequence classifier sharing ``causal_lm``'s decoder weights (copied by reference)."""
    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id  # the score is read at the last token that is not padding
    if getattr(causal_lm, "hf_quantizer", None) is not None:
        return _quantized_reward_model(causal_lm, config)
    model = _classifier(causal_lm, config)
    body = getattr(model, model.base_model_prefix)
    source = getattr(causal_lm, causal_lm.base_model_prefix, None)
    if source is None:
        raise ConfigError(f"stage rm: cannot find the decoder of {type(causal_lm).__name__}")
    missing, unexpected = body.load_state_dict(source.state_dict(), strict=False)
    if missing or unexpected:
        raise ConfigError(f"stage rm: the decoder of {type(causal_lm).__name__} does not fit "
                          f"{type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(next(causal_lm.parameters()).device)


def _quantized_reward_model(causal_lm: Any, config: Any) -> Any:
    """The classifier over a bitsandbytes-quantized base (QLoRA): its decoder module itself, not a copy.

    Packed 4/8-bit weights do not load into a float decoder, and building one first would hold the full-precision
    weights QLoRA exists to avoid: the classifier is built on the meta device, takes the quantized decoder and the
    base's quantization marks (so peft and the Trainer treat it as quantized), and only the new head is created.
    """
    import torch

    with torch.device("meta"):
        model = _classifier(causal_lm, config)
    setattr(model, model.base_model_prefix, getattr(causal_lm, causal_lm.base_model_prefix))
    device = next(causal_lm.parameters()).device
    for module in model.modules():  # the head: still on the meta device, initialised as transformers does
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
    for mark in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(causal_lm, mark):
            setattr(model, mark, getattr(causal_lm, mark))
    return model
