"""ChatGLM-6B as a native transformers model (``PreTrainedModel`` + ``GenerationMixin``), exact to the reference.

The reference is THUDM/chatglm-6b's remote code, which no longer runs on current transformers. This file
reproduces its arithmetic (checked to 1e-4 in fp32 by tests/test_chatglm_model.py against a loop-based
implementation of the published formulas) with parameter names unchanged, so original checkpoints load:

- block: ``a = LN_in(x); h = α·a + Attn(a); m = LN_post(h); y = α·m + MLP(m)`` with α = √(2·28) whatever the
  depth (the reference never passes ``num_layers`` to its blocks); MLP = dense_h_to_4h → tanh-GeLU →
  dense_4h_to_h; final LayerNorm; ``lm_head`` tied to ``word_embeddings``.
- attention: ``query_key_value`` viewed per head as [q | k | v]; 2D rotary embedding (first half of each head
  rotated by ``position_ids``, second half by ``block_position_ids``, NeoX rotate_half in each half,
  inv_freq rounded to fp16); q scaled by 1/(√d·(layer+1)), masked scores set to -10000, then ×(layer+1) and
  a float32 softmax (the reference's fp16 overflow guard, kept so fp16 runs match too).
- GLM masks from the ids: with ``ctx`` the first ``<sop>`` (bos) of a row, tokens before it see each other
  both ways and tokens from it on are causal; positions after ``ctx`` stay at the [gMASK]/[MASK] index while
  block positions count 1, 2, 3, ... Left padding (a 2D attention_mask) gives pads position 0 and a fully
  masked row, as the reference tokenizer's ``_pad`` does.
- P-Tuning v2 (``pre_seq_len``): a prefix encoder gives one (key, value) prefix per layer, not rotated,
  always visible; the rest of the model is frozen.
- ``quantization_bit`` 4 / 8: ChatGLM's own weight-only format, run on a CPU through PyTorch's packed
  INT8 / INT4 kernels, the tied head through the INT8 one (see quantization.py).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel, TextIteratorStreamer
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from finechat.models.chatglm.configuration_chatglm import ChatGLMConfig
from finechat.models.chatglm.quantization import PackedHead, linear_layer, quantize_layers
from finechat.text import clean_chatglm_response

# The reference builds every block with its default num_layers=28, so the residual scale is √56 even for
# configurations with fewer layers; checkpoints were trained with that value.
RESIDUAL_ALPHA = math.sqrt(2 * 28)
MASKED_SCORE = -10000.0
PTUNING_PREFIX = "transformer.prefix_encoder."
NEXT_ROUND = "[Round"  # the model starting a new round of its own: the answer ends before it


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """The reference's guard: when scores hold NaN or Inf (fp16 overflow), force token 5 instead of crashing."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.isnan(scores).any() or torch.isinf(scores).any():
            scores.zero_()
            scores[..., 5] = 5e4
        return scores


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GeLU with the reference's constants."""
    return F.gelu(x, approximate="tanh")  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), one operation


def rotary_cos_sin(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [b, s] -> cos, sin [b, 1, s, dim] for a rotary half of ``dim`` channels.

    inv_freq is rounded to fp16 as the reference stores it; the angles are computed in float32.
    """
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))).half().float()
    angles = positions.float()[..., None] * inv_freq  # [b, s, dim / 2]
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # [b, 1, s, dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def glm_attention_inputs(
    input_ids: torch.Tensor, padding_mask: torch.Tensor | None, config: ChatGLMConfig,
    query_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM's attention mask and 2D positions for whole rows of ids (left padding allowed).

    input_ids [b, s]; padding_mask [b, s] (1 = token, 0 = pad) or None. Returns the mask for the query
    positions ``query_start..s-1``: bool [b, 1, s - query_start, s], True = may not attend; and position_ids
    [b, 2, s - query_start] (row 0 positions, row 1 block positions).
    """
    b, s = input_ids.shape
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask.bool()
    local = valid.long().cumsum(-1) - 1  # index of each token once pads are dropped  [b, s]
    big = torch.full_like(input_ids, s)
    index = torch.arange(s, device=device).expand(b, s)

    def first(token_id: int) -> torch.Tensor:  # first valid occurrence per row, s if none  [b]
        return torch.where(valid & (input_ids == token_id), index, big).min(-1).values

    ctx = first(config.bos_token_id)  # absolute index of <sop>; s (all bidirectional) when absent
    mask_at = first(config.gmask_token_id)
    mask_at = torch.where(mask_at < s, mask_at, first(config.mask_token_id))
    has_mask = mask_at < s
    mask_local = local.gather(1, mask_at.clamp(max=s - 1)[:, None])  # [b, 1]
    ctx_local = torch.where(ctx < s, local.gather(1, ctx.clamp(max=s - 1)[:, None]).squeeze(1), valid.sum(-1))
    after = index >= ctx[:, None]  # [b, s]
    positions = torch.where(after & has_mask[:, None], mask_local, local)
    block = torch.where(after, local - ctx_local[:, None] + 1, torch.zeros_like(local))
    positions = torch.where(valid, positions, 0)
    block = torch.where(valid, block, 0)
    position_ids = torch.stack((positions, block), dim=1)[..., query_start:]  # [b, 2, q]

    q_index = index[:, query_start:, None]  # [b, q, 1]
    k_index = index[:, None, :]  # [b, 1, s]
    visible = (k_index < ctx[:, None, None]) | (k_index <= q_index)
    visible = visible & valid[:, None, :] & valid[:, query_start:, None]
    return ~visible[:, None], position_ids


class PrefixEncoder(nn.Module):
    """P-Tuning v2's prefix: [b, pre_seq_len] ids -> [b, pre_seq_len, 2 * layers * hidden] keys and values."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = 2 * config.num_layers * config.hidden_size
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, width)
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        out = self.embedding(prefix)
        return self.trans(out) if self.prefix_projection else out


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        # with quantization_bit, the layers are built quantized and empty: no float weight for a quantized checkpoint
        self.query_key_value = linear_layer(config.hidden_size, 3 * config.hidden_size, config.quantization_bit)
        self.dense = linear_layer(config.hidden_size, config.hidden_size, config.quantization_bit)

    def forward(self, x: torch.Tensor, rotary: tuple, mask: torch.Tensor | None, cache: Any,
                prefix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, s, _ = x.shape
        mixed = self.query_key_value(x).view(b, s, self.num_heads, 3 * self.head_dim)
        # q and k rotated together (half the small operations of a decode step): [b, heads, s, 2, head_dim]
        qk = mixed[..., : 2 * self.head_dim].unflatten(-1, (2, self.head_dim)).transpose(1, 2)
        v = mixed[..., 2 * self.head_dim:].transpose(1, 2)  # [b, heads, s, head_dim]
        (cos_p, sin_p), (cos_b, sin_b) = ((c.unsqueeze(-2), t.unsqueeze(-2)) for c, t in rotary)
        qk1, qk2 = qk.chunk(2, dim=-1)  # position half, block-position half
        qk1 = qk1 * cos_p + rotate_half(qk1) * sin_p
        qk2 = qk2 * cos_b + rotate_half(qk2) * sin_b
        q, k = torch.cat((qk1, qk2), dim=-1).unbind(-2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_id)  # [b, heads, past + s, head_dim]
        if prefix is not None:
            k, v = torch.cat((prefix[0], k), dim=2), torch.cat((prefix[1], v), dim=2)

        coeff = float(self.layer_id + 1)
        q = q / (math.sqrt(self.head_dim) * coeff)
        if s == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
            # one query row on a CPU (a decode step): ATen's bf16 / fp16 product against the transposed cache is
            # ~3x slower than the float32 one, conversions included; the scores are then float32, as softmax takes them
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
        else:
            scores = torch.matmul(q, k.transpose(-1, -2))  # [b, heads, s, keys]
        if mask is not None and mask.any():
            scores = scores.masked_fill(mask, MASKED_SCORE)
        probs = F.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)  # [b, s, hidden]
        return self.dense(out)


class GLU(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = linear_layer(config.hidden_size, config.inner_hidden_size, config.quantization_bit)
        self.dense_4h_to_h = linear_layer(config.inner_hidden_size, config.hidden_size, config.quantization_bit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)

    def forward(self, x: torch.Tensor, rotary: tuple, mask: torch.Tensor | None, cache: Any = None,
                prefix: tuple | None = None) -> torch.Tensor:
        a = self.input_layernorm(x)
        h = torch.add(self.attention(a, rotary, mask, cache, prefix), a, alpha=RESIDUAL_ALPHA)
        m = self.post_attention_layernorm(h)
        return torch.add(self.mlp(m), m, alpha=RESIDUAL_ALPHA)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]
    supports_gradient_checkpointing = True
    # The original checkpoints store each layer's rotary inv_freq buffer; it is recomputed, never loaded.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    _keys_to_ignore_on_load_missing = [r"prefix_encoder\."]


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The GLM transformer: embeddings, blocks, final LayerNorm (and the P-Tuning v2 prefix encoder)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.prefix_encoder = None
        if config.pre_seq_len is not None:
            self._add_prefix_encoder()
        self.post_init()

    def _add_prefix_encoder(self) -> None:
        for p in self.parameters():  # P-Tuning v2 trains the prefix only
            p.requires_grad = False
        self.prefix_encoder = PrefixEncoder(self.config)
        self.dropout = nn.Dropout(0.1)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def get_prompt(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[tuple]:
        """The prefix's (key, value) per layer, each [b, heads, pre_seq_len, head_dim]."""
        cfg = self.config
        tokens = torch.arange(cfg.pre_seq_len, device=device).expand(batch_size, -1)
        # The reference casts the prefix to fp16 before use; keep that rounding so fp32 runs match it.
        kv = self.prefix_encoder(tokens).half().to(dtype)
        kv = kv.view(batch_size, cfg.pre_seq_len, 2 * cfg.num_layers, cfg.num_attention_heads,
                     cfg.hidden_size // cfg.num_attention_heads)
        kv = self.dropout(kv).permute(2, 0, 3, 1, 4)  # [2 * layers, b, heads, pre_seq_len, head_dim]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(cfg.num_layers)]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """input_ids [b, s]; attention_mask: 2D padding mask [b, past + s] (1 = token), or the reference's
        bool [b, 1, s, past + s] (True = masked); position_ids [b, 2, s] (computed from the ids if absent)."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        b, s = inputs_embeds.shape[:2]
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0

        mask = attention_mask
        if mask is not None and mask.dim() == 4:  # the reference's form, as its tokenizer returns it
            if position_ids is None:
                raise ValueError("a 4D attention_mask needs position_ids [b, 2, s] too")
            mask = mask.bool()
        else:
            if input_ids is None or past:
                raise ValueError(
                    "GLM masks and positions are computed from the whole row of input_ids; with a cache or "
                    "inputs_embeds pass position_ids [b, 2, s] and a 4D mask (generate() does this)"
                )
            mask, glm_positions = glm_attention_inputs(input_ids, mask, self.config)  # mask [b, 1, s, s]
            position_ids = glm_positions if position_ids is None else position_ids

        prefix = None
        if self.prefix_encoder is not None:
            prefix = self.get_prompt(b, inputs_embeds.device, inputs_embeds.dtype)
            visible = torch.zeros(b, 1, mask.shape[2], self.config.pre_seq_len, dtype=torch.bool, device=mask.device)
            mask = torch.cat((visible, mask), dim=3)

        rot_dim = self.config.hidden_size // self.config.num_attention_heads // 2
        position_ids = position_ids.to(inputs_embeds.device)
        rotary = (rotary_cos_sin(position_ids[:, 0], rot_dim, inputs_embeds.dtype),
                  rotary_cos_sin(position_ids[:, 1], rot_dim, inputs_embeds.dtype))
        hidden = inputs_embeds  # [b, s, hidden]
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden)
            hidden = layer(hidden, rotary, mask, cache, prefix[i] if prefix is not None else None)
        hidden = self.final_layernorm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, cache=cache, hidden_states=tuple(all_hidden) if all_hidden else None
        )


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM-6B with its language-model head: forward with labels, ``generate``, ``chat``, quantize, P-Tuning."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        head = PackedHead if config.quantization_bit else nn.Linear  # quantized models: an INT8 head on CPU
        self.lm_head = head(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.transformer(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if logits_to_keep and labels is None:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # [b, s, vocab]
        loss = None
        if labels is not None:
            # Tokens < n predict n, in float32, as the reference computes its loss.
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            # the Trainer's num_items_in_batch: the labelled tokens of the whole global batch (every rank, every
            # accumulated micro-batch). It multiplies a model's loss by the number of processes whenever the
            # forward takes **kwargs, so the loss must be a sum over that count, as transformers' own models
            # compute it; a per-rank mean was counted twice on 2 ranks (2x losses and gradients under DDP / FSDP2)
            items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100, reduction="mean" if items is None else "sum")
            if items is not None:
                loss = loss / (items.to(loss.device) if torch.is_tensor(items) else items)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    # -- generation ------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: Any = None,
                                      attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                                      **kwargs: Any) -> dict:
        """Masks and 2D positions from the whole sequence so far; only the tokens not yet cached go in."""
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            attention_mask = None  # a reference-style 4D mask cannot be extended; rebuild it from the ids
        mask, position_ids = glm_attention_inputs(input_ids, attention_mask, self.config, query_start=past)
        return {
            "input_ids": input_ids[:, past:],
            "position_ids": position_ids,
            "attention_mask": mask,
            "cache": cache,
            "use_cache": kwargs.get("use_cache", True),
        }

    def generate(self, *args: Any, logits_processor: LogitsProcessorList | None = None, **kwargs: Any):
        """transformers' generate, plus the reference's NaN/Inf guard (see InvalidScoreLogitsProcessor)."""
        processors = LogitsProcessorList(logits_processor or [])
        if not any(isinstance(p, InvalidScoreLogitsProcessor) for p in processors):
            processors.append(InvalidScoreLogitsProcessor())
        return super().generate(*args, logits_processor=processors, **kwargs)

    # -- ChatGLM-6B's chat API ------------------------------------------------------------------------
    def _chat_inputs(self, tokenizer: Any, query: str, history: list, max_length: int, num_beams: int,
                     do_sample: bool, top_p: float, temperature: float, logits_processor: Any,
                     kwargs: dict) -> dict:
        """``generate``'s keyword arguments for the next answer, with the reference's defaults."""
        processors = LogitsProcessorList(logits_processor or [])
        gen = {"num_beams": num_beams, "do_sample": do_sample, "logits_processor": processors, **kwargs}
        if do_sample:
            gen.update(top_p=top_p, temperature=temperature)
        if "max_new_tokens" not in kwargs:  # transformers warns when both limits are given
            gen["max_length"] = max_length
        inputs = tokenizer([chat_prompt(query, history)], return_tensors="pt").to(self.device)
        return {**inputs, **gen}

    @torch.inference_mode()
    def chat(self, tokenizer: Any, query: str, history: list | None = None, max_length: int = 2048,
             num_beams: int = 1, do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95,
             logits_processor: Any = None, **kwargs: Any) -> tuple[str, list]:
        """ChatGLM-6B's ``model.chat(tokenizer, query, history)`` -> ``(response, history + [(query, response)])``.

        Extra keyword arguments go to ``generate`` (``max_new_tokens``, ...).
        """
        history = list(history or [])
        inputs = self._chat_inputs(tokenizer, query, history, max_length, num_beams, do_sample, top_p, temperature,
                                   logits_processor, kwargs)
        prompt_length = inputs["input_ids"].shape[1]
        output = self.generate(**inputs)[0, prompt_length:].tolist()
        response = _answer(tokenizer.decode(output, skip_special_tokens=True))
        return response, history + [(query, response)]

    def stream_chat(self, tokenizer: Any, query: str, history: list | None = None, max_length: int = 2048,
                    do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95,
                    logits_processor: Any = None, **kwargs: Any) -> Iterator[tuple[str, list]]:
        """ChatGLM-6B's ``model.stream_chat``: yields ``(partial_response, history + [(query, partial)])``.

        ``generate`` runs in a worker thread feeding transformers' ``TextIteratorStreamer``; leaving the loop
        early stops it at the next token.
        """
        history = list(history or [])
        inputs = self._chat_inputs(tokenizer, query, history, max_length, 1, do_sample, top_p, temperature,
                                   logits_processor, kwargs)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        inputs["stopping_criteria"] = StoppingCriteriaList([*inputs.get("stopping_criteria", []), _StopWhen(stop)])
        failed: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.generate(**inputs, streamer=streamer)
            except BaseException as e:  # noqa: BLE001  raised again in the consumer's thread
                failed.append(e)
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        text, shown = "", None
        try:
            for piece in streamer:
                text += piece
                response = _answer(text)
                if response != shown:
                    shown = response
                    yield response, history + [(query, response)]
                if NEXT_ROUND in text:
                    break
        finally:
            stop.set()
            worker.join()
        if failed:
            raise failed[0]
        if shown is None:
            yield "", history + [(query, "")]

    # -- quantization and P-Tuning v2 ------------------------------------------------------------------
    def quantize(self, bits: int) -> ChatGLMForConditionalGeneration:
        """Weight-only INT8 / INT4 in ChatGLM's format (in place); ``save_pretrained`` then writes that format."""
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if self.config.quantization_bit and self.config.quantization_bit != bits:
            raise ValueError(f"the model is already quantized to {self.config.quantization_bit} bits")
        with torch.no_grad():
            quantize_layers(self.transformer.layers, bits)
        if type(self.lm_head) is nn.Linear:
            self.lm_head.__class__ = PackedHead  # same parameters (still tied): only inference on CPU changes
        self.config.quantization_bit = bits
        return self

    # True once enable_prefix_tuning() ran: checkpoints then hold the prefix only, as ChatGLM-6B ptuning's do.
    prefix_only_checkpoints = False

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        if self.prefix_only_checkpoints and self.transformer.prefix_encoder is not None:
            if kwargs.get("is_main_process", True):
                self.save_prefix(save_directory)
            return
        super().save_pretrained(save_directory, *args, **kwargs)

    def enable_prefix_tuning(self, pre_seq_len: int, prefix_projection: bool = False) -> None:
        """Add P-Tuning v2's prefix encoder to a loaded model and freeze everything else."""
        self.prefix_only_checkpoints = True
        if self.transformer.prefix_encoder is not None:
            if self.config.pre_seq_len != pre_seq_len or self.config.prefix_projection != prefix_projection:
                raise ValueError(f"the model already has a prefix of length {self.config.pre_seq_len}")
            return
        self.config.pre_seq_len, self.config.prefix_projection = pre_seq_len, prefix_projection
        self.transformer._add_prefix_encoder()
        for p in self.parameters():
            p.requires_grad = False
        self.transformer.prefix_encoder.to(self.lm_head.weight.device)
        self.transformer.prefix_encoder.train(self.training)  # new modules start in training mode
        self.transformer.dropout.train(self.training)
        for p in self.transformer.prefix_encoder.parameters():
            p.requires_grad = True

    def prefix_state_dict(self) -> dict[str, torch.Tensor]:
        """The prefix encoder's weights under ChatGLM-6B ptuning's names (``transformer.prefix_encoder.*``)."""
        if self.transformer.prefix_encoder is None:
            raise ValueError("the model has no prefix encoder (pre_seq_len is not set)")
        return {PTUNING_PREFIX + k: v.detach().cpu().contiguous()
                for k, v in self.transformer.prefix_encoder.state_dict().items()}

    def save_prefix(self, output_dir: str | Path) -> Path:
        """Save a P-Tuning v2 checkpoint the way ChatGLM-6B's ``ptuning/main.py`` does.

        ``pytorch_model.bin`` holds only ``transformer.prefix_encoder.*`` and ``config.json`` the model's config
        with ``pre_seq_len``, so ptuning's own loader and :meth:`load_prefix` both read it.
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.prefix_state_dict(), out / "pytorch_model.bin")
        self.config.save_pretrained(out)
        return out

    def load_prefix(self, checkpoint: str | Path) -> None:
        """Load a P-Tuning v2 checkpoint (ours or ChatGLM-6B ptuning's) into this model."""
        path = Path(checkpoint)
        weights = path / "pytorch_model.bin" if path.is_dir() else path
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no pytorch_model.bin with a P-Tuning v2 prefix")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        prefix = {k[len(PTUNING_PREFIX):]: v for k, v in state.items() if k.startswith(PTUNING_PREFIX)}
        if not prefix:
            raise ValueError(f"{weights}: no transformer.prefix_encoder.* weights (keys: {list(state)[:3]})")
        projection = "trans.0.weight" in prefix
        if projection:
            pre_seq_len = prefix["embedding.weight"].shape[0]
        else:
            pre_seq_len, width = prefix["embedding.weight"].shape
            if width != 2 * self.config.num_layers * self.config.hidden_size:
                raise ValueError(f"{weights}: prefix width {width} does not fit this model "
                                 f"(2 x {self.config.num_layers} layers x {self.config.hidden_size} hidden)")
        self.enable_prefix_tuning(pre_seq_len, projection)
        self.transformer.prefix_encoder.load_state_dict(prefix)


def chat_prompt(query: str, history: list) -> str:
    """ChatGLM-6B's prompt: ``[Round i]\n问：...\n答：...`` per earlier turn, then the new question."""
    earlier = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return f"{earlier}[Round {len(history)}]\n问：{query}\n答："


def _answer(text: str) -> str:
    """The decoded answer up to a new round the model starts itself, cleaned as the reference does; a character
    cut in half by the token budget is dropped (U+FFFD), as finechat's engine does."""
    return clean_chatglm_response(text.split(NEXT_ROUND, 1)[0].rstrip("\ufffd"))


class _StopWhen(StoppingCriteria):
    """Stops ``generate`` once ``event`` is set (the consumer of a stream went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def is_ptuning_checkpoint(path: str | Path) -> bool:
    """A folder holding a ChatGLM-6B P-Tuning v2 checkpoint (pytorch_model.bin + config.json with pre_seq_len)."""
    import json

    folder = Path(path)
    config = folder / "config.json"
    if not (folder / "pytorch_model.bin").is_file() or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("pre_seq_len") is not None
    except (OSError, ValueError):
        return False


# Aliases under the class names the published config.json's auto_map refers to.
ChatGLMForConditionalGenerationWithImage = ChatGLMForConditionalGeneration
