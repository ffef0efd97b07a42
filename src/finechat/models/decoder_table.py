"""Which model types have a fast decoder: ``FAST_DECODERS``, the table the generation engine asks.

A new architecture with its own fast decoder adds one entry here (its decoder lives beside the
architecture); ``finechat.generate.fast`` decides per model and drives the decoding.
"""

from __future__ import annotations

from typing import Any

from finechat.models.chatglm.fast_chatglm import ChatGLMFastDecoder
from finechat.models.fast_decoder import (
    FastDecoder,
    StaticCacheDecoder,
    base_causal_lm,
    prompt_learning_reason,
)

FAST_DECODERS: dict[str, type[StaticCacheDecoder]] = {
    "llama": FastDecoder,
    "qwen2": FastDecoder,
    "chatglm": ChatGLMFastDecoder,
}


def _model_type(model: Any) -> str | None:
    return getattr(getattr(base_causal_lm(model), "config", None), "model_type", None)


def unsupported_reason(model: Any) -> str | None:
    """Why no fast decoder can run ``model`` (None when one can); the engine then uses ``generate``."""
    reason = prompt_learning_reason(model)
    if reason:
        return reason
    model_type = _model_type(model)
    decoder = FAST_DECODERS.get(model_type)
    if decoder is None:
        return f"model type {model_type!r} is not in the fast path's families {tuple(FAST_DECODERS)}"
    return decoder.unsupported_reason(model)


def is_supported(model: Any) -> bool:
    return unsupported_reason(model) is None


def fast_decoder(model: Any, compile: bool = False, split_rows: bool = True) -> StaticCacheDecoder:
    """The fast decoder for ``model``'s family (raises ValueError, naming why, for unsupported models)."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"the fast decoder does not support this model: {reason}")
    return FAST_DECODERS[_model_type(model)](model, compile=compile, split_rows=split_rows)
