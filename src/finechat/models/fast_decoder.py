"""Fast batch-1 decoders over a static KV cache: the shared base, and the one for Llama/Qwen2-family models.

Why our own: transformers' ``generate`` spends much of each step outside the matmuls (logits processors,
stopping criteria, mask building, dynamic cache bookkeeping), a large share of the time per token at batch 1
on a CPU. A decoder here runs the model's *own* modules (plain, LoRA-wrapped or quantized) in a short loop
over a KV cache allocated once, in the gpt-fast style: :meth:`prefill` for the prompt,
:meth:`decode_one_token` per new token. Greedy tokens equal ``generate``'s on the same model and dtype (the
same ``scaled_dot_product_attention`` call over exactly the cached positions, float32 logits of the last
position). The loop that samples and stops is ``finechat.generate.fast``'s; each architecture's decoder
lives beside it (``finechat.models.chatglm.fast_chatglm`` for ChatGLM-6B) and ``FAST_DECODERS`` in
``finechat.models.decoder_table`` says which model types have one. Measurements: docs/results/decode.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from finechat.models.row_split import RowSplitLinear, plain_module, split_linear, split_linear_layers


def base_causal_lm(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA layers stay in place and are used)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def prompt_learning_reason(model: Any) -> str | None:
    """A peft prompt-learning adapter (P-Tuning v2, prefix tuning) keeps virtual tokens in the cache."""
    for cfg in (getattr(model, "peft_config", None) or {}).values():
        if getattr(cfg, "is_prompt_learning", False):
            return f"peft {cfg.peft_type} adapter (virtual tokens) needs generate()"
    return None


class StaticCacheDecoder:
    """What every fast decoder shares: the static KV cache, its room checks and ``torch.compile`` of a step.

    A subclass sets up its family in :meth:`_setup` (``layers``, ``num_kv_heads``, ``head_dim``,
    ``final_norm``), says what it cannot run in :meth:`layout_reason`, and implements :meth:`prefill` and
    :meth:`decode_one_token` (both return float32 next-token logits [batch, vocab]).
    """

    num_kv_heads: int
    head_dim: int
    layers: list
    final_norm: Any

    def __init__(self, model: Any, compile: bool = False, split_rows: bool = True):
        reason = self.unsupported_reason(model)
        if reason:
            raise ValueError(f"the fast decoder does not support this model: {reason}")
        self.model = model
        self.causal_lm = base_causal_lm(model)
        self.compile = compile
        self.capacity = 0
        self.batch = 0
        self.key_cache: list[torch.Tensor] = []    # per layer [batch, kv_heads, capacity, head_dim]
        self.value_cache: list[torch.Tensor] = []
        self._compiled_step = None
        self.split_rows = split_rows
        self._setup()
        if split_rows and self.device.type == "cpu":
            split_linear_layers(self.causal_lm)

    @classmethod
    def unsupported_reason(cls, model: Any) -> str | None:
        """Why this decoder cannot run ``model`` (None when it can)."""
        return prompt_learning_reason(model) or cls.layout_reason(base_causal_lm(model))

    @classmethod
    def layout_reason(cls, causal_lm: Any) -> str | None:
        raise NotImplementedError

    def _setup(self) -> None:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.weight.dtype

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

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_one_token(self, token: torch.Tensor, position: int) -> torch.Tensor:
        raise NotImplementedError

    def prefill_until(self, input_ids: torch.Tensor, stop: Any, chunk: int = 0) -> torch.Tensor | None:
        """:meth:`prefill`, unless ``stop()`` says so first (a decoder that cannot prefill in chunks asks once)."""
        return None if stop() else self.prefill(input_ids)

    def _check_prompt(self, input_ids: torch.Tensor) -> None:
        if input_ids.shape[1] > self.capacity or input_ids.shape[0] != self.batch:
            raise ValueError("call setup_cache(batch, capacity) with room for the prompt first")

    def _check_position(self, position: int) -> None:
        if position >= self.capacity:
            raise ValueError(f"position {position} is past the KV cache ({self.capacity})")

    def _compile(self, step: Any) -> Any:
        """``torch.compile`` for the one-token step. On CUDA, "reduce-overhead" replays it as a CUDA graph:
        at batch 1 launching ~10 kernels per layer costs more than reading the weights (as in gpt-fast).

        The compiled step attends over the whole static cache with a mask so that shapes stay fixed; its
        logits may differ from eager in the last bits, so greedy identity is only promised for eager."""
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        return torch.compile(step, dynamic=False, mode=mode)

    def _after_compiled(self, logits: torch.Tensor) -> torch.Tensor:
        # A CUDA graph writes every replay's output into the same buffer: keep this step's logits.
        return logits.clone() if self.device.type == "cuda" else logits


# At batch 1 a decode step calls ~330 small modules; nn.Module.__call__ costs a few microseconds each. The
# plain ones (nn.Linear, the Llama/Qwen2 RMSNorm and MLP) are run here with the very operations their
# forward() performs, in the same order, so the numbers are the same; any other module (LoRA-wrapped,
# quantized, hooked) is called as usual.
# positions per forward pass when a prefill may be stopped between passes (a 7,000-token prompt: ~14 chances)
PREFILL_CHUNK = 512
_PLAIN_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm")
_PLAIN_MLPS = ("LlamaMLP", "Qwen2MLP")


def _linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    if type(module) is RowSplitLinear and plain_module(module):
        return split_linear(module, x)
    if type(module) is torch.nn.Linear and plain_module(module):
        return F.linear(x, module.weight, module.bias)
    return module(x)


def _rms_norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    if type(module).__name__ not in _PLAIN_NORMS or not plain_module(module):
        return module(x)
    dtype = x.dtype  # LlamaRMSNorm.forward
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return module.weight * h.to(dtype)


def _mlp(module: Any, x: torch.Tensor) -> torch.Tensor:
    if type(module).__name__ not in _PLAIN_MLPS or not plain_module(module):
        return module(x)
    return _linear(module.down_proj, module.act_fn(_linear(module.gate_proj, x)) * _linear(module.up_proj, x))


class FastDecoder(StaticCacheDecoder):
    """Prefill / decode-one-token over a preallocated KV cache, using a Llama/Qwen2 model's own modules."""

    @classmethod
    def layout_reason(cls, causal_lm: Any) -> str | None:
        config = getattr(causal_lm, "config", None)
        inner = getattr(causal_lm, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(causal_lm, "lm_head"):
            return f"{type(causal_lm).__name__} does not have the Llama module layout"
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

    def _setup(self) -> None:
        self.decoder = self.causal_lm.model
        config = self.causal_lm.config
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.gqa = config.num_attention_heads != self.num_kv_heads
        self.layers = list(self.decoder.layers)
        self.final_norm = self.decoder.norm

    # -- the forward pass ----------------------------------------------------------------------------
    def _attend(self, layer_index: int, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start: int, mask: torch.Tensor | None) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        batch, length, _ = x.shape
        q = _linear(attn.q_proj, x).view(batch, length, -1, self.head_dim).transpose(1, 2)  # [b, heads, len, d]
        k = _linear(attn.k_proj, x).view(batch, length, -1, self.head_dim).transpose(1, 2)  # [b, kv, len, d]
        v = _linear(attn.v_proj, x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        key_cache, value_cache = self.key_cache[layer_index], self.value_cache[layer_index]
        key_cache[:, :, start:start + length] = k
        value_cache[:, :, start:start + length] = v
        if mask is None:  # eager: attend over exactly the filled positions, as generate() does
            keys, values = key_cache[:, :, :start + length], value_cache[:, :, :start + length]
            if length > 1 and start > 0:  # a later chunk of a prompt: causal from its own positions on
                causal = (torch.arange(start + length, device=x.device)[None, :]
                          <= torch.arange(start, start + length, device=x.device)[:, None])  # [len, start + len]
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, scale=attn.scaling,
                                                     enable_gqa=self.gqa)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, scale=attn.scaling, is_causal=length > 1,
                                                     enable_gqa=self.gqa)
        else:  # compiled: the whole static cache, masked, so that shapes never change
            out = F.scaled_dot_product_attention(q, key_cache, value_cache, attn_mask=mask, scale=attn.scaling,
                                                 enable_gqa=self.gqa)
        out = out.transpose(1, 2).reshape(batch, length, -1)  # [b, len, heads * d]
        return _linear(attn.o_proj, out)

    def _forward(self, input_ids: torch.Tensor, start: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, len] at positions start.. -> float32 logits of the last position [b, vocab]."""
        decoder = self.decoder
        hidden = decoder.embed_tokens(input_ids)  # [b, len, hidden]
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        cos, sin = decoder.rotary_emb(hidden, positions)
        for index, layer in enumerate(self.layers):
            hidden = hidden + self._attend(index, layer.self_attn, _rms_norm(layer.input_layernorm, hidden), cos, sin,
                                           start, mask)
            hidden = hidden + _mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, hidden))
        hidden = _rms_norm(decoder.norm, hidden[:, -1:])
        return _linear(self.causal_lm.lm_head, hidden)[:, -1].float()

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt [b, len] from position 0; returns the next-token logits [b, vocab] (float32)."""
        self._check_prompt(input_ids)
        return self._forward(input_ids, 0)

    @torch.inference_mode()
    def prefill_until(self, input_ids: torch.Tensor, stop: Any, chunk: int = 0) -> torch.Tensor | None:
        """:meth:`prefill` in chunks of ``chunk`` positions (default :data:`PREFILL_CHUNK`), asking ``stop()``
        before each: None when it said stop (a server's client left during a long prompt)."""
        self._check_prompt(input_ids)
        chunk = chunk or PREFILL_CHUNK
        logits = None
        for start in range(0, input_ids.shape[1], chunk):
            if stop():
                return None
            logits = self._forward(input_ids[:, start:start + chunk], start)
        return logits

    @torch.inference_mode()
    def decode_one_token(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Feed one token per row [b, 1] at ``position``; returns the next-token logits [b, vocab]."""
        self._check_position(position)
        if not self.compile:
            return self._forward(token, position)
        if self._compiled_step is None:
            self._compiled_step = self._compile(self._compiled_forward)
        return self._after_compiled(self._compiled_step(token, torch.tensor(position, device=token.device)))

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
