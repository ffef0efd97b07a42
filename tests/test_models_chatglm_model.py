"""The native ChatGLM-6B against an independent, loop-based implementation of the reference's formulas.

The reference below works on the raw state dict, one row and one head at a time, following the published
modeling_chatglm.py step by step (masks and positions as its tokenizer's ``_pad`` builds them for left
padding). The model under test must agree to 1e-4 in fp32.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finechat.models.chatglm.configuration_chatglm import ChatGLMConfig
from finechat.models.chatglm.modeling_chatglm import (
    ChatGLMForConditionalGeneration,
    InvalidScoreLogitsProcessor,
)
from finechat.models.chatglm.quantization import dequantize_weight, pack_int4, quantize_weight, unpack_int4

BOS, EOS, MASK, GMASK, PAD = 290, 291, 292, 293, 3


def make_model(seed: int = 0, **extra) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(seed)
    sizes = {"hidden_size": 32, "inner_hidden_size": 64, **extra}
    cfg = ChatGLMConfig(vocab_size=300, num_layers=2, num_attention_heads=4, bos_token_id=BOS, eos_token_id=EOS,
                        mask_token_id=MASK, gmask_token_id=GMASK, pad_token_id=PAD, **sizes)
    model = ChatGLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values so that mistakes show
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


# ------------------------------------------------------------------------------------------------------
# the reference, written out
def ref_mask_and_positions(seq: list[int], padded_len: int):
    """The reference tokenizer's _pad: mask [L, L] (True = masked) and positions [2, L] for one row."""
    n = len(seq)
    ctx = seq.index(BOS) if BOS in seq else n
    mask = np.ones((n, n))
    mask = np.tril(mask)
    mask[:, :ctx] = 1
    mask = mask < 0.5
    pos = np.arange(n)
    mask_token = GMASK if GMASK in seq else MASK
    if mask_token in seq:
        pos[ctx:] = seq.index(mask_token)
    block = np.concatenate([np.zeros(ctx, dtype=np.int64), np.arange(1, n - ctx + 1)])
    pad = padded_len - n
    mask = np.pad(mask, [(pad, 0), (pad, 0)], constant_values=True)
    positions = np.pad(np.stack([pos, block]), [(0, 0), (pad, 0)])
    return torch.tensor(mask), torch.tensor(positions)


def ref_rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [L, d]: channels c and c + d/2 rotate together by position * inv_freq[c] (NeoX layout)."""
    d = x.shape[-1]
    out = torch.empty_like(x)
    inv_freq = [float(np.float16(1.0 / 10000 ** (2 * j / d))) for j in range(d // 2)]
    for t in range(x.shape[0]):
        for c in range(d // 2):
            theta = float(positions[t]) * np.float32(inv_freq[c])
            cos, sin = math.cos(theta), math.sin(theta)
            a, b = x[t, c], x[t, c + d // 2]
            out[t, c] = a * cos - b * sin
            out[t, c + d // 2] = b * cos + a * sin
    return out


def ref_logits(model, rows: list[list[int]], prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [b, L, vocab] for left-padded rows, from the state dict and the published formulas."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    cfg = model.config
    heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    alpha = math.sqrt(2 * 28)
    length = max(len(r) for r in rows)
    out = []
    for seq in rows:
        mask, positions = ref_mask_and_positions(seq, length)
        ids = [PAD] * (length - len(seq)) + seq
        x = sd["transformer.word_embeddings.weight"][ids]
        for i in range(cfg.num_layers):
            p = f"transformer.layers.{i}."

            def ln(t, name, p=p):
                return torch.nn.functional.layer_norm(t, (t.shape[-1],), sd[p + name + ".weight"],
                                                      sd[p + name + ".bias"], cfg.layernorm_epsilon)

            a = ln(x, "input_layernorm")
            qkv = a @ sd[p + "attention.query_key_value.weight"].T + sd[p + "attention.query_key_value.bias"]
            context = []
            for h in range(heads):
                chunk = qkv[:, h * 3 * hd:(h + 1) * 3 * hd]
                q, k, v = chunk[:, :hd], chunk[:, hd:2 * hd], chunk[:, 2 * hd:]
                q = torch.cat([ref_rotate(q[:, :hd // 2], positions[0]), ref_rotate(q[:, hd // 2:], positions[1])], 1)
                k = torch.cat([ref_rotate(k[:, :hd // 2], positions[0]), ref_rotate(k[:, hd // 2:], positions[1])], 1)
                m = mask
                if prefix is not None:  # [pre, 2 * layers, heads, hd]; keys 2i, values 2i + 1; not rotated
                    k = torch.cat([prefix[:, 2 * i, h].double(), k])
                    v = torch.cat([prefix[:, 2 * i + 1, h].double(), v])
                    m = torch.cat([torch.zeros(length, prefix.shape[0], dtype=torch.bool), mask], 1)
                scores = (q @ k.T) / math.sqrt(hd)
                scores = scores.masked_fill(m, -10000.0)
                context.append(torch.softmax(scores, -1) @ v)
            attn = torch.cat(context, 1) @ sd[p + "attention.dense.weight"].T + sd[p + "attention.dense.bias"]
            hidden = a * alpha + attn
            mm = ln(hidden, "post_attention_layernorm")
            inner = mm @ sd[p + "mlp.dense_h_to_4h.weight"].T + sd[p + "mlp.dense_h_to_4h.bias"]
            inner = 0.5 * inner * (1 + torch.tanh(0.7978845608028654 * inner * (1 + 0.044715 * inner * inner)))
            x = mm * alpha + inner @ sd[p + "mlp.dense_4h_to_h.weight"].T + sd[p + "mlp.dense_4h_to_h.bias"]
        x = torch.nn.functional.layer_norm(x, (x.shape[-1],), sd["transformer.final_layernorm.weight"],
                                           sd["transformer.final_layernorm.bias"], cfg.layernorm_epsilon)
        out.append(x @ sd["transformer.word_embeddings.weight"].T)
    return torch.stack(out).float()


PROMPT = [11, 12, 13, 14, 15, GMASK, BOS, 40, 41]


# ------------------------------------------------------------------------------------------------------
def test_plain_forward_matches_reference():
    model = make_model()
    ids = torch.tensor([PROMPT])
    ours = model(ids).logits
    assert torch.allclose(ours, ref_logits(model, [PROMPT]), atol=1e-4), (ours - ref_logits(model, [PROMPT])).abs().max()


def test_mask_token_and_no_bos_rows_match_reference():
    model = make_model(1)
    for row in ([20, 21, MASK, 22, BOS, 50, 51], [20, 21, 22, 23]):
        ours = model(torch.tensor([row])).logits
        assert torch.allclose(ours, ref_logits(model, [row]), atol=1e-4)


def test_alpha_is_sqrt_56_even_for_two_layers():
    """The reference scales residuals by sqrt(2*28) regardless of depth; sqrt(2*2) must give other logits."""
    import finechat.models.chatglm.modeling_chatglm as mod

    model = make_model()
    ids = torch.tensor([PROMPT])
    good = model(ids).logits
    saved = mod.RESIDUAL_ALPHA
    try:
        mod.RESIDUAL_ALPHA = math.sqrt(4)
        assert not torch.allclose(model(ids).logits, good, atol=1e-3)
    finally:
        mod.RESIDUAL_ALPHA = saved


def test_cached_decode_matches_reference_step_by_step():
    model = make_model(2)
    full = PROMPT + [42, 43, 44, 45]
    ref = ref_logits(model, [full])
    ids = torch.tensor([PROMPT])
    attention = torch.ones_like(ids)
    cache = None
    for step in range(5):
        inputs = model.prepare_inputs_for_generation(ids, cache=cache, attention_mask=attention)
        out = model(**inputs)
        cache = out.cache
        pos = ids.shape[1] - 1
        assert torch.allclose(out.logits[0, -1], ref[0, pos], atol=1e-4), f"step {step}"
        if step < 4:
            ids = torch.cat([ids, torch.tensor([[full[pos + 1]]])], 1)
            attention = torch.ones_like(ids)


def test_left_padded_batch_matches_reference_and_generate_matches_single_rows():
    model = make_model(3)
    rows = [PROMPT, [30, 31, GMASK, BOS], [MASK, 5, 6, 7, 8, 9, BOS]]
    length = max(map(len, rows))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    ours = model(ids, attention_mask=attention).logits
    ref = ref_logits(model, rows)
    for i, r in enumerate(rows):  # pad rows are fully masked in both; compare the real tokens
        assert torch.allclose(ours[i, length - len(r):], ref[i, length - len(r):], atol=1e-4)
    batch = model.generate(ids, attention_mask=attention, max_new_tokens=4, do_sample=False)
    for i, r in enumerate(rows):
        single = model.generate(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                max_new_tokens=4, do_sample=False)
        assert batch[i, length:].tolist() == single[0, len(r):].tolist()


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_prefix_matches_reference(projection):
    model = make_model(4, pre_seq_len=3, prefix_projection=projection)
    with torch.no_grad():
        for p in model.transformer.prefix_encoder.parameters():
            p.normal_(0, 0.5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    cfg = model.config
    prefix = model.transformer.prefix_encoder(torch.arange(3)[None])[0].half().float()
    prefix = prefix.view(3, 2 * cfg.num_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)
    rows = [PROMPT, [30, 31, GMASK, BOS, 50]]
    length = max(map(len, rows))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    ours = model(ids, attention_mask=attention).logits
    ref = ref_logits(model, rows, prefix=prefix.detach())
    for i, r in enumerate(rows):
        assert torch.allclose(ours[i, length - len(r):], ref[i, length - len(r):], atol=1e-4)
    # cached decoding with the prefix agrees with one full forward
    seq = torch.tensor([PROMPT])
    out = model(**model.prepare_inputs_for_generation(seq[:, :-1], attention_mask=torch.ones_like(seq[:, :-1])))
    step = model(**model.prepare_inputs_for_generation(seq, cache=out.cache, attention_mask=torch.ones_like(seq)))
    assert torch.allclose(step.logits[0, -1], ref[0, -1], atol=1e-4)


def test_ptuning_checkpoint_round_trip(tmp_path):
    import torch as t

    model = make_model(5)
    model.enable_prefix_tuning(4)
    with t.no_grad():
        model.transformer.prefix_encoder.embedding.weight.normal_()
    folder = model.save_prefix(tmp_path / "checkpoint-10")
    state = t.load(folder / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    # ChatGLM-6B ptuning's loader: strip the prefix, load into model.transformer.prefix_encoder
    fresh = make_model(5)
    fresh.load_prefix(folder)
    ids = t.tensor([PROMPT])
    assert t.equal(fresh(ids).logits, model(ids).logits)


def test_invalid_score_guard_forces_token_5():
    scores = torch.tensor([[0.0, float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    out = InvalidScoreLogitsProcessor()(torch.zeros(1, 1, dtype=torch.long), scores)
    assert out.argmax(-1).item() == 5 and out[0, 5] == 5e4
    fine = torch.tensor([[0.0, 3.0, 1.0]])
    assert torch.equal(InvalidScoreLogitsProcessor()(torch.zeros(1, 1, dtype=torch.long), fine.clone()), fine)


# ------------------------------------------------------------------------------------------------------
# INT8 / INT4 in ChatGLM's format
def ref_pack_and_dequantize(weight: np.ndarray, bits: int):
    """The reference formulas in numpy: fp16 scale, int8 round, nibble packing, fp16 dequantization."""
    w = weight.astype(np.float16)
    scale = (np.abs(w).max(axis=-1).astype(np.float32) / np.float32(2 ** (bits - 1) - 1)).astype(np.float16)
    q = np.round((w / scale[:, None]).astype(np.float16)).astype(np.int8)
    if bits == 4:
        u = q.astype(np.uint8)
        packed = ((u[:, 0::2] & 0x0F) << 4 | (u[:, 1::2] & 0x0F)).astype(np.uint8).view(np.int8)
        high = packed >> 4
        low = (packed.astype(np.uint8) << 4).view(np.int8) >> 4
        q_back = np.stack([high, low], -1).reshape(q.shape)
    else:
        packed, q_back = q, q
    deq = q_back.astype(np.float16) * scale[:, None]
    return packed, scale, deq


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_formulas_bit_exact(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 24).half()
    packed, scale = quantize_weight(w, bits)
    ref_packed, ref_scale, ref_deq = ref_pack_and_dequantize(w.numpy(), bits)
    assert packed.dtype == torch.int8 and packed.shape == (16, 24 * bits // 8)
    assert np.array_equal(packed.numpy(), ref_packed)
    assert np.array_equal(scale.numpy().view(np.uint16), ref_scale.view(np.uint16))
    deq = dequantize_weight(packed, scale, bits)
    assert deq.dtype == torch.float16
    assert np.array_equal(deq.numpy().view(np.uint16), ref_deq.view(np.uint16))


def test_int4_nibble_layout():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.view(torch.uint8).tolist() == [[0x1E, 0x78]]
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_saves_and_loads_in_chatglm_format(tmp_path, bits):
    from transformers import AutoModel

    import finechat.models  # noqa: F401  registers chatglm

    model = make_model(6, hidden_size=64, inner_hidden_size=128)
    ids = torch.tensor([PROMPT])
    fp32 = model(ids).logits
    model.quantize(bits)
    quantized = model(ids).logits
    corr = torch.corrcoef(torch.stack([fp32.flatten(), quantized.flatten()]))[0, 1]
    assert corr > (0.99 if bits == 8 else 0.9)
    sd = model.state_dict()
    qkv = "transformer.layers.0.attention.query_key_value."
    assert sd[qkv + "weight"].dtype == torch.int8 and sd[qkv + "weight"].shape == (192, 64 * bits // 8)
    assert sd[qkv + "weight_scale"].dtype == torch.float16 and sd[qkv + "weight_scale"].shape == (192,)
    model.save_pretrained(tmp_path / "q")
    loaded = AutoModel.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert loaded.config.quantization_bit == bits
    assert torch.equal(loaded(ids).logits, quantized)
