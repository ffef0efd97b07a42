"""A fast batch-1 decoder for Llama/Qwen2-family models and native ChatGLM-6B: static KV cache, prefill +
one-token decode steps.

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

Native ChatGLM-6B (:class:`ChatGLMFastDecoder`) runs its own blocks over the same static cache: the
prompt is prefilled with GLM's mask (bidirectional up to ``<sop>``), and each new token gets the 2D
position (the [gMASK] index, block position counted from ``<sop>``) that ``generate`` would compute by
rebuilding the whole mask every step.

Linear layers on CPU: at batch 1 every step is one matrix-vector product per Linear layer, read from
memory once per token (30 layers x 7 matrices and a 49,152 x 576 head on the default model: 538 MB in
fp32, far beyond the caches). ``F.linear`` hands such a product to MKL's matrix-vector kernel, which runs
it on one core: measured on this 2-core VM with cold caches, 10-13 GB/s, while a plain sum over the same
bytes reads 31 GB/s on two threads. ``torch.bmm`` parallelises over its batch, so the same product written
as a batch of row chunks of the weight ([chunks, out/chunks, in] @ [chunks, in, rows], a view, no copy)
runs the chunks side by side: the default model's 211 products per token 41 ms -> 22 ms (23 GB/s); also
about 2x at 2-4 rows (the batch scheduler's steps) and 1.1-1.2x at 16-32. :func:`split_linear_layers`
therefore turns each fp32 CPU ``nn.Linear`` into a :class:`RowSplitLinear` in place (same parameters and
state dict, so saving and peft are unaffected; tied weights stay tied); it uses the chunks for up to
:data:`MAX_SPLIT_ROWS` rows and ``F.linear`` otherwise (longer prompts are compute-bound matrix products
that MKL already threads). Weights under 256 KB are left alone: from cache a lone product is fast and the
split adds ~8 us per call (3.6 -> 11.8 us at 64 x 64), while from memory it halves the time from 256 x 256
up. bf16 is left alone too: its CPU matmul is compute-bound here and splitting made it slower.
Only the order of the additions inside each dot product changes, so logits can differ from ``generate``'s
on plain ``nn.Linear`` in the last bits (about 1e-5): greedy tokens match except at near-ties closer than
that (the bench's "greedy = HF" column compares with ``generate`` on plain ``nn.Linear``).
``split_rows=False`` keeps the modules as they are. No library offers this: torchao, optimum-quanto and
bitsandbytes target quantized or GPU kernels, and oneDNN's fp32 linear (``torch._C._nn.mkldnn_linear``)
measured 7-14 GB/s on the layer shapes.

Models outside these families (or with a peft prompt-learning adapter such as P-Tuning v2, whose virtual
tokens live in the cache, or ChatGLM's own P-Tuning prefix) are reported by :func:`unsupported_reason`; the
engine falls back to ``generate`` for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers.generation.logits_process import LogitsProcessor

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "chatglm")
MAX_SPLIT_ROWS = 32  # up to this many rows (sequences x new tokens) a Linear layer runs as row chunks
MIN_SPLIT_WEIGHTS = 1 << 16  # smaller weights stay in cache, where splitting only adds ~8 us of overhead


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
    if model_type == "chatglm":
        transformer = getattr(base, "transformer", None)
        if transformer is None or not hasattr(transformer, "layers") or not hasattr(base, "lm_head"):
            return f"{type(base).__name__} does not have native ChatGLM's module layout"
        if getattr(transformer, "prefix_encoder", None) is not None:
            return "ChatGLM P-Tuning v2 prefix (virtual keys and values) needs generate()"
        return None
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


def apply_answer_penalties(logits: torch.Tensor, answer: torch.Tensor, presence: float,
                           frequency: float) -> torch.Tensor:
    """OpenAI's presence / frequency penalties over the tokens generated so far (``answer`` [batch, n]).

    score[j] -= frequency * count[j] + presence * (count[j] > 0); the prompt does not count.
    """
    if answer.shape[1] == 0 or not (presence or frequency):
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, answer, torch.ones_like(answer, dtype=logits.dtype))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


class AnswerPenalties(LogitsProcessor):
    """:func:`apply_answer_penalties` as a transformers logits processor (the answer starts at ``prompt_length``)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return apply_answer_penalties(scores, input_ids[:, self.prompt_length:], self.presence, self.frequency)


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
                    generator: torch.Generator | None = None, answer: torch.Tensor | None = None,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> torch.Tensor:
    """logits [batch, vocab] float32 -> next tokens [batch, 1]. ``seen``: prompt + answer; ``answer``: answer."""
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if answer is not None and (presence_penalty or frequency_penalty):
        logits = apply_answer_penalties(logits, answer, presence_penalty, frequency_penalty)
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


# --------------------------------------------------------------------------------------------------------
# weight layout
# --------------------------------------------------------------------------------------------------------
class RowSplitLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose products over a few rows run as ``row_chunks`` matrix-vector products at once.

    Installed in place by :func:`split_linear_layers` (the module docstring says why); same parameters,
    same state dict, same results up to the order of the additions inside each dot product.
    """

    row_chunks: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_linear(self, x)


def split_linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; up to :data:`MAX_SPLIT_ROWS` rows as one batched product over row chunks."""
    weight = module.weight
    in_features = weight.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    if not 0 < rows <= MAX_SPLIT_ROWS or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or weight.device.type != "cpu" or x.device.type != "cpu" or not weight.is_contiguous() \
            or torch.get_num_threads() < 2:
        return F.linear(x, weight, module.bias)
    chunks = module.row_chunks
    # [chunks, out/chunks, in] @ [chunks, in, rows]: at::bmm hands each chunk to its own thread
    out = torch.bmm(weight.view(chunks, -1, in_features), x.reshape(rows, in_features).t().expand(chunks, -1, -1))
    out = out.permute(2, 0, 1).reshape(*x.shape[:-1], weight.shape[0])
    return out if module.bias is None else out + module.bias


def _row_chunks(out_features: int) -> int:
    """The largest divisor of ``out_features`` up to the number of threads; 1 when none (or one thread)."""
    for chunks in range(torch.get_num_threads(), 1, -1):
        if out_features % chunks == 0:
            return chunks
    return 1


def split_linear_layers(model: Any) -> int:
    """Make every plain fp32 CPU ``nn.Linear`` of ``model`` a :class:`RowSplitLinear`, in place; returns how many.

    Weights are untouched (no copy, tied weights stay tied, saving is unchanged). peft's adapter matrices,
    hooked or accelerate-wrapped modules and weights under :data:`MIN_SPLIT_WEIGHTS` entries are left as they are.
    """
    changed = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(module) is not torch.nn.Linear or "lora_" in name or weight is None or not _plain(module):
            continue
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.numel() < MIN_SPLIT_WEIGHTS:
            continue
        chunks = _row_chunks(weight.shape[0])
        if chunks < 2:
            continue
        module.__class__ = RowSplitLinear
        module.row_chunks = chunks
        changed += 1
    return changed


def unsplit_linear_layers(model: Any) -> int:
    """Undo :func:`split_linear_layers`: every :class:`RowSplitLinear` is an ``nn.Linear`` again."""
    changed = 0
    for module in model.modules():
        if type(module) is RowSplitLinear:
            module.__class__ = torch.nn.Linear
            del module.row_chunks
            changed += 1
    return changed


# --------------------------------------------------------------------------------------------------------
# the decoders
# --------------------------------------------------------------------------------------------------------
class _StaticCacheDecoder:
    """What every fast decoder shares: the static KV cache and the sampling loop."""

    num_kv_heads: int
    head_dim: int
    layers: list

    def __init__(self, model: Any, compile: bool = False, split_rows: bool = True):
        reason = unsupported_reason(model)
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

    def _setup(self) -> None:
        """Family-specific attributes, including ``final_norm`` (its weight gives the device and dtype)."""
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

    def _check_prompt(self, input_ids: torch.Tensor) -> None:
        if input_ids.shape[1] > self.capacity or input_ids.shape[0] != self.batch:
            raise ValueError("call setup_cache(batch, capacity) with room for the prompt first")

    def _check_position(self, position: int) -> None:
        if position >= self.capacity:
            raise ValueError(f"position {position} is past the KV cache ({self.capacity})")

    def _compile(self, step: Any) -> Any:
        """``torch.compile`` for the one-token step. On CUDA, "reduce-overhead" replays it as a CUDA graph:
        at batch 1 launching ~10 kernels per layer costs more than reading the weights (as in gpt-fast)."""
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        return torch.compile(step, dynamic=False, mode=mode)

    def _after_compiled(self, logits: torch.Tensor) -> torch.Tensor:
        # A CUDA graph writes every replay's output into the same buffer: keep this step's logits.
        return logits.clone() if self.device.type == "cuda" else logits

    def decode_one_token(self, token: torch.Tensor, position: int) -> torch.Tensor:
        raise NotImplementedError

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, input_ids: list[int], max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                 stop_token_ids: Iterable[int] = (), generator: torch.Generator | None = None,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Iterator[int]:
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
                                    repetition_penalty, generator, seen[:, prompt_length:length],
                                    presence_penalty, frequency_penalty)  # [1, 1]
            seen[:, length] = token[:, 0]
            token_id = int(token)
            yield token_id
            if token_id in stops or step == max_new_tokens - 1:
                return
            logits = self.decode_one_token(token, length)


# At batch 1 a decode step calls ~330 small modules; nn.Module.__call__ costs a few microseconds each. The
# plain ones (nn.Linear, the Llama/Qwen2 RMSNorm and MLP) are run here with the very operations their
# forward() performs, in the same order, so the numbers are the same; any other module (LoRA-wrapped,
# quantized, hooked) is called as usual.
_PLAIN_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm")
_PLAIN_MLPS = ("LlamaMLP", "Qwen2MLP")


def _plain(module: Any) -> bool:
    """No hooks and no per-instance forward (accelerate's offloading wraps ``forward`` on the instance)."""
    return not module._forward_hooks and not module._forward_pre_hooks and "forward" not in module.__dict__


def _linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    if type(module) is RowSplitLinear and _plain(module):
        return split_linear(module, x)
    if type(module) is torch.nn.Linear and _plain(module):
        return F.linear(x, module.weight, module.bias)
    return module(x)


def _rms_norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    if type(module).__name__ not in _PLAIN_NORMS or not _plain(module):
        return module(x)
    dtype = x.dtype  # LlamaRMSNorm.forward
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return module.weight * h.to(dtype)


def _mlp(module: Any, x: torch.Tensor) -> torch.Tensor:
    if type(module).__name__ not in _PLAIN_MLPS or not _plain(module):
        return module(x)
    return _linear(module.down_proj, module.act_fn(_linear(module.gate_proj, x)) * _linear(module.up_proj, x))


class FastDecoder(_StaticCacheDecoder):
    """Prefill / decode-one-token over a preallocated KV cache, using a Llama/Qwen2 model's own modules."""

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


class ChatGLMFastDecoder(_StaticCacheDecoder):
    """The fast path for native ChatGLM-6B (``finechat.models.chatglm``): its own blocks, a static cache.

    Same arithmetic as ``generate`` on the model (the blocks are called as ``generate`` calls them); what
    goes is the per-step rebuilding of GLM's mask and positions over the whole sequence and the growing
    cache. Decoding needs no mask: a new token sees every earlier one.
    """

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
             position_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, len] at ``start``; position_ids [b, 2, len] -> float32 logits of the last position."""
        from finechat.models.chatglm.modeling_chatglm import InvalidScoreLogitsProcessor, rotary_cos_sin

        hidden = self.transformer.word_embeddings(input_ids)
        rot_dim = self.head_dim // 2
        rotary = (rotary_cos_sin(position_ids[:, 0], rot_dim, hidden.dtype),
                  rotary_cos_sin(position_ids[:, 1], rot_dim, hidden.dtype))
        self._cache.start = start
        for layer in self.layers:
            hidden = layer(hidden, rotary, mask, self._cache, None)
        hidden = self.final_norm(hidden[:, -1:])
        logits = self.causal_lm.lm_head(hidden)[:, -1].float()
        return InvalidScoreLogitsProcessor()(input_ids, logits)  # the reference's fp16 overflow guard, as generate

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        from finechat.models.chatglm.modeling_chatglm import glm_attention_inputs

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
        return self._run(input_ids, 0, mask if mask.any() else None, position_ids)

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


def fast_decoder(model: Any, compile: bool = False, split_rows: bool = True) -> _StaticCacheDecoder:
    """The fast decoder for ``model``'s family (raises ValueError, naming why, for unsupported models)."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"the fast decoder does not support this model: {reason}")
    model_type = getattr(base_causal_lm(model).config, "model_type", None)
    cls = ChatGLMFastDecoder if model_type == "chatglm" else FastDecoder
    return cls(model, compile=compile, split_rows=split_rows)


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """An explicit random generator for sampling: seeded when asked, else from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def fast_decoder_for(chat_model: Any) -> _StaticCacheDecoder | None:
    """The (cached) fast decoder of a ``ChatModel``, or None when its model needs ``generate``.

    Set ``chat_model.use_fast_decoder = False`` to always use ``generate``; ``chat_model.compile_decoder =
    True`` (``finechat.load(..., compile=True)``, ``--compile``) compiles its one-token step.
    """
    if not getattr(chat_model, "use_fast_decoder", True):
        return None
    model = chat_model.model
    cached = chat_model.__dict__.get("_fast_decoder")
    if cached is not None and cached[0] is model:
        return cached[1]
    decoder = fast_decoder(model, compile=getattr(chat_model, "compile_decoder", False)) if is_supported(model) \
        else None
    chat_model.__dict__["_fast_decoder"] = (model, decoder)
    return decoder
