"""A fast batch-1 decoder for Llama/Qwen2-family models: static KV cache, prefill + one-token decode steps.

transformers' ``generate`` spends much of each step outside the matmuls (logits processors, stopping
criteria, mask building, dynamic cache bookkeeping); at batch 1 on a CPU that is a large share of the
time per token. :class:`FastDecoder` runs the model's *own* modules (embedding, norms, projections --
plain, LoRA-wrapped or quantized -- MLP, rotary embedding, output head) in a short loop over a KV cache
allocated once, in the gpt-fast style: ``prefill`` for the prompt, ``decode_one_token`` per new token.

Greedy output is token-for-token identical to ``generate`` on the same model and dtype: attention is the
same ``scaled_dot_product_attention`` call that transformers' "sdpa" attention makes (no mask, causal in
prefill, grouped-query heads via ``enable_gqa``), over exactly the cached positions, and the logits are
taken in float32 from the last position only, as ``generate`` does. Sampling reproduces ``generate``'s
processors in its order -- repetition penalty, temperature, top-k, top-p -- on an explicit
``torch.Generator``, so a seed repeats an answer without touching the global RNG.

``compile=True`` wraps the one-token step in ``torch.compile``; it then attends over the whole static
cache with a mask so that shapes stay fixed (one graph for every position). Logits may then differ from
eager in the last bits, so greedy identity is only promised for the eager path.

Models outside the family (or with a peft prompt-learning adapter such as P-Tuning v2, whose virtual
tokens live in the cache) are reported by :func:`unsupported_reason`; the engine falls back to
``generate`` for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def base_causal_lm(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA layers stay in place and are used)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot run ``model`` (None when it can)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        for cfg in peft_config.values():
            if getattr(cfg, "is_prompt_learning", False):
                return f"peft {cfg.peft_type} adapter (virtual tokens) needs generate()"
    base = base_causal_lm(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not in the fast path's family {SUPPORTED_MODEL_TYPES}"
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(base, "lm_head"):
        return f"{type(base).__name__} does not have the Llama module layout"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
        return f"attention implementation {config._attn_implementation!r}"
    if getattr(config, "use_sliding_window", False) or any(
            t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "sliding-window attention"
    attn = layers[0].self_attn
    if hasattr(attn, "q_norm") or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return f"{type(attn).__name__} is not Llama-style attention"
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    return None


def is_supported(model: Any) -> bool:
    return unsupported_reason(model) is None


# --------------------------------------------------------------------------------------------------------
# sampling (transformers' logits processors, same order and formulas)
# --------------------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as ``RepetitionPenaltyLogitsProcessor``: divide positive, multiply negative scores."""
    score = torch.gather(logits, 1, seen)  # [batch, seen]
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering, as transformers' warpers do them."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k > 0:
        k = min(top_k, logits.shape[-1])
        threshold = torch.topk(logits, k)[0][..., -1, None]
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(1, sorted_index, remove), -float("inf"))
    return logits


def pick_next_token(logits: torch.Tensor, seen: torch.Tensor | None, do_sample: bool, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [batch, vocab] float32 -> next tokens [batch, 1]."""
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


# --------------------------------------------------------------------------------------------------------
# the decoder
# --------------------------------------------------------------------------------------------------------
class FastDecoder:
    """Prefill / decode-one-token over a preallocated KV cache, using ``model``'s own modules."""

    def __init__(self, model: Any, compile: bool = False):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the fast decoder does not support this model: {reason}")
        self.model = model
        self.causal_lm = base_causal_lm(model)
        self.decoder = self.causal_lm.model
        config = self.causal_lm.config
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.gqa = config.num_attention_heads != self.num_kv_heads
        self.layers = list(self.decoder.layers)
        self.compile = compile
        self.capacity = 0
        self.batch = 0
        self.key_cache: list[torch.Tensor] = []    # per layer [batch, kv_heads, capacity, head_dim]
        self.value_cache: list[torch.Tensor] = []
        self._compiled_step = None

    @property
    def device(self) -> torch.device:
        return self.decoder.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.norm.weight.dtype

    def setup_cache(self, batch: int, capacity: int) -> None:
        """Allocate (or keep, when large enough) the KV cache for ``capacity`` positions."""
        if batch == self.batch and capacity <= self.capacity:
            return
        capacity = max(capacity, self.capacity if batch == self.batch else 0)
        shape = (batch, self.num_kv_heads, capacity, self.head_dim)
        self.key_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.value_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.batch, self.capacity = batch, capacity
        self._compiled_step = None

    # -- the forward pass ----------------------------------------------------------------------------
    def _attend(self, layer_index: int, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start: int, mask: torch.Tensor | None) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        batch, length, _ = x.shape
        q = attn.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)  # [b, heads, len, d]
        k = attn.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)  # [b, kv_heads, len, d]
        v = attn.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        key_cache, value_cache = self.key_cache[layer_index], self.value_cache[layer_index]
        key_cache[:, :, start:start + length] = k
        value_cache[:, :, start:start + length] = v
        if mask is None:  # eager: attend over exactly the filled positions, as generate() does
            keys, values = key_cache[:, :, :start + length], value_cache[:, :, :start + length]
            out = F.scaled_dot_product_attention(q, keys, values, scale=attn.scaling, is_causal=length > 1,
                                                 enable_gqa=self.gqa)
        else:  # compiled: the whole static cache, masked, so that shapes never change
            out = F.scaled_dot_product_attention(q, key_cache, value_cache, attn_mask=mask, scale=attn.scaling,
                                                 enable_gqa=self.gqa)
        out = out.transpose(1, 2).reshape(batch, length, -1)  # [b, len, heads * d]
        return attn.o_proj(out)

    def _forward(self, input_ids: torch.Tensor, start: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, len] at positions start.. -> float32 logits of the last position [b, vocab]."""
        decoder = self.decoder
        hidden = decoder.embed_tokens(input_ids)  # [b, len, hidden]
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        cos, sin = decoder.rotary_emb(hidden, positions)
        for index, layer in enumerate(self.layers):
            residual = hidden
            hidden = residual + self._attend(index, layer.self_attn, layer.input_layernorm(hidden), cos, sin, start,
                                             mask)
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = decoder.norm(hidden[:, -1:])
        return self.causal_lm.lm_head(hidden)[:, -1].float()

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt [b, len] from position 0; returns the next-token logits [b, vocab] (float32)."""
        if input_ids.shape[1] > self.capacity or input_ids.shape[0] != self.batch:
            raise ValueError("call setup_cache(batch, capacity) with room for the prompt first")
        return self._forward(input_ids, 0)

    @torch.inference_mode()
    def decode_one_token(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Feed one token per row [b, 1] at ``position``; returns the next-token logits [b, vocab]."""
        if position >= self.capacity:
            raise ValueError(f"position {position} is past the KV cache ({self.capacity})")
        if not self.compile:
            return self._forward(token, position)
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._compiled_forward, dynamic=False)
        return self._compiled_step(token, torch.tensor(position, device=token.device))

    def _compiled_forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(self.capacity, device=token.device) <= position).view(1, 1, 1, -1)
        # index_put with a tensor position keeps the graph independent of the position's value
        return self._forward_at(token, position, mask)

    def _forward_at(self, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        decoder = self.decoder
        hidden = decoder.embed_tokens(token)  # [b, 1, hidden]
        cos, sin = decoder.rotary_emb(hidden, position.view(1, 1))
        batch = token.shape[0]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, 1, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, 1, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, 1, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.key_cache[index].index_copy_(2, position.view(1), k)
            self.value_cache[index].index_copy_(2, position.view(1), v)
            out = F.scaled_dot_product_attention(q, self.key_cache[index], self.value_cache[index], attn_mask=mask,
                                                 scale=attn.scaling, enable_gqa=self.gqa)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.causal_lm.lm_head(decoder.norm(hidden))[:, -1].float()

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, input_ids: list[int], max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                 stop_token_ids: Iterable[int] = (), generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield new token ids one at a time (a stop token is yielded, then generation ends).

        Closing the iterator stops decoding at once. ``generator`` drives sampling (seed it to repeat).
        """
        if not input_ids:
            raise ValueError("the prompt is empty")
        prompt_length = len(input_ids)
        total = prompt_length + max_new_tokens
        self.setup_cache(1, total)
        tokens = torch.tensor([input_ids], dtype=torch.long, device=self.device)  # [1, prompt]
        seen = torch.empty(1, total, dtype=torch.long, device=self.device)  # prompt + answer, for the penalty
        seen[:, :prompt_length] = tokens
        stops = set(stop_token_ids)
        logits = self.prefill(tokens)
        for step in range(max_new_tokens):
            length = prompt_length + step
            token = pick_next_token(logits, seen[:, :length], do_sample, temperature, top_k, top_p,
                                    repetition_penalty, generator)  # [1, 1]
            seen[:, length] = token[:, 0]
            token_id = int(token)
            yield token_id
            if token_id in stops or step == max_new_tokens - 1:
                return
            logits = self.decode_one_token(token, length)


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """An explicit random generator for sampling: seeded when asked, else from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def fast_decoder_for(chat_model: Any) -> FastDecoder | None:
    """The (cached) fast decoder of a ``ChatModel``, or None when its model needs ``generate``.

    Set ``chat_model.use_fast_decoder = False`` to always use ``generate``.
    """
    if not getattr(chat_model, "use_fast_decoder", True):
        return None
    model = chat_model.model
    cached = chat_model.__dict__.get("_fast_decoder")
    if cached is not None and cached[0] is model:
        return cached[1]
    decoder = FastDecoder(model) if is_supported(model) else None
    chat_model.__dict__["_fast_decoder"] = (model, decoder)
    return decoder
