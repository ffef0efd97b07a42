"""The fast batch-1 decoder for native ChatGLM-6B: its own blocks over a static KV cache.

Why: ``generate`` rebuilds GLM's mask and 2D positions over the whole sequence at every step and grows its
cache; here the prompt is prefilled once with GLM's mask (bidirectional up to ``<sop>``) and each new token
gets the 2D position (the [gMASK] index, block position counted from ``<sop>``) that ``generate`` would
compute. The blocks are called as ``generate`` calls them, so greedy tokens are the same. The sampling
loop is ``finechat.generate.fast``'s (``finechat.models.fast_decoder`` has the shared base).

A prefill that may be cancelled (:meth:`ChatGLMFastDecoder.prefill_until`) asks between layers, not between
chunks of positions as the Llama decoder does: the prompt up to ``<sop>`` attends both ways, so an early chunk's
keys depend on later tokens and a chunked prefill would not be the model's arithmetic. ChatGLM-6B has 28
layers: a 7,000-token prompt gets 28 chances to stop, as many as 250-position chunks would give.
"""

from __future__ import annotations

from typing import Any

import torch

from finechat.models.chatglm.modeling_chatglm import (
    InvalidScoreLogitsProcessor,
    glm_attention_inputs,
    rotary_cos_sin,
)
from finechat.models.fast_decoder import StaticCacheDecoder


class _GLMStaticCache:
    """The ``cache.update(k, v, layer)`` interface ChatGLM's attention calls, over the decoder's static cache."""

    def __init__(self, decoder: ChatGLMFastDecoder):
        self.decoder = decoder
        self.start = 0
        self.position: torch.Tensor | None = None  # compiled one-token steps: write here, return the whole cache

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.decoder.key_cache[layer_index], self.decoder.value_cache[layer_index]
        if self.position is not None:
            keys.index_copy_(2, self.position.view(1), key)
            values.index_copy_(2, self.position.view(1), value)
            return keys, values
        end = self.start + key.shape[2]
        keys[:, :, self.start:end] = key
        values[:, :, self.start:end] = value
        return keys[:, :, :end], values[:, :, :end]


class ChatGLMFastDecoder(StaticCacheDecoder):
    """The fast path for native ChatGLM-6B (``finechat.models.chatglm``): its own blocks, a static cache.

    Same arithmetic as ``generate`` on the model; what goes is the per-step rebuilding of GLM's mask and
    positions over the whole sequence and the growing cache. Decoding needs no mask: a new token sees every
    earlier one.
    """

    @classmethod
    def layout_reason(cls, causal_lm: Any) -> str | None:
        transformer = getattr(causal_lm, "transformer", None)
        if transformer is None or not hasattr(transformer, "layers") or not hasattr(causal_lm, "lm_head"):
            return f"{type(causal_lm).__name__} does not have native ChatGLM's module layout"
        if getattr(transformer, "prefix_encoder", None) is not None:
            return "ChatGLM P-Tuning v2 prefix (virtual keys and values) needs generate()"
        return None

    def _setup(self) -> None:
        self.transformer = self.causal_lm.transformer
        config = self.causal_lm.config
        self.config = config
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.layers = list(self.transformer.layers)
        self._cache = _GLMStaticCache(self)
        self._context = None  # index of <sop> in the sequence (None: not seen yet)
        self._mask_position = None  # the [gMASK]/[MASK] index when the prompt has one
        self.final_norm = self.transformer.final_layernorm

    def _run(self, input_ids: torch.Tensor, start: int, mask: torch.Tensor | None,
             position_ids: torch.Tensor, stop: Any = None) -> torch.Tensor | None:
        """input_ids [b, len] at ``start``; position_ids [b, 2, len] -> float32 logits of the last position (None
        when ``stop()``, asked before each layer, said stop)."""
        hidden = self.transformer.word_embeddings(input_ids)
        rot_dim = self.head_dim // 2
        rotary = (rotary_cos_sin(position_ids[:, 0], rot_dim, hidden.dtype),
                  rotary_cos_sin(position_ids[:, 1], rot_dim, hidden.dtype))
        self._cache.start = start
        for layer in self.layers:
            if stop is not None and stop():
                return None
            hidden = layer(hidden, rotary, mask, self._cache, None)
        hidden = self.final_norm(hidden[:, -1:])
        logits = self.causal_lm.lm_head(hidden)[:, -1].float()
        return InvalidScoreLogitsProcessor()(input_ids, logits)  # the reference's fp16 overflow guard, as generate

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.prefill_until(input_ids, None)

    @torch.inference_mode()
    def prefill_until(self, input_ids: torch.Tensor, stop: Any, chunk: int = 0) -> torch.Tensor | None:
        """:meth:`prefill`, asking ``stop()`` (when given) before each layer: None when it said stop. ``chunk`` is
        not used: the prompt runs whole, as its two-way attention needs (see the module's docstring)."""
        self._check_prompt(input_ids)
        if input_ids.shape[0] != 1:
            raise ValueError("the ChatGLM fast path decodes one sequence at a time")
        mask, position_ids = glm_attention_inputs(input_ids, None, self.config)
        ids = input_ids[0].tolist()
        self._context = ids.index(self.config.bos_token_id) if self.config.bos_token_id in ids else None
        self._mask_position = None
        for token_id in (self.config.gmask_token_id, self.config.mask_token_id):
            if token_id in ids:
                self._mask_position = ids.index(token_id)
                break
        return self._run(input_ids, 0, mask if mask.any() else None, position_ids, stop)

    @torch.inference_mode()
    def decode_one_token(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self._check_position(position)
        if self._context is None and int(token[0, 0]) == self.config.bos_token_id:
            self._context = position  # a generated <sop> starts the block, as generate() would see it
        if self._context is not None and position >= self._context:
            first = self._mask_position if self._mask_position is not None else position
            pair = (first, position - self._context + 1)
        else:
            pair = (position, 0)
        position_ids = torch.tensor([[[pair[0]], [pair[1]]]], device=token.device)  # [1, 2, 1]
        if not self.compile:
            return self._run(token, position, None, position_ids)
        if self._compiled_step is None:
            self._compiled_step = self._compile(self._static_step)
        return self._after_compiled(self._compiled_step(token, torch.tensor(position, device=token.device),
                                                        position_ids))

    def _static_step(self, token: torch.Tensor, position: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One token over the whole static cache, later positions masked: fixed shapes, one compiled graph.

        Masked scores are -10000 as in the reference; their softmax weight is 0, but the extra zero terms can
        move the last bits of the sums, so greedy identity with ``generate`` is promised for eager only.
        """
        mask = (torch.arange(self.capacity, device=token.device) > position).view(1, 1, 1, -1)
        self._cache.position = position
        try:
            return self._run(token, 0, mask, position_ids)
        finally:
            self._cache.position = None
