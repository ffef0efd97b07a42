"""ChatGLM's INT8 / INT4 through the packed CPU kernels (PyTorch's, and finechat's own INT4 kernel where it
builds): same logits as the dequantized reference, the stored format untouched, and quantized folders loaded
without any float copy of the block weights."""

from __future__ import annotations

import json

import pytest
import torch
from chatglm_tiny import write_fake_chatglm
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from finechat.generate.fast import generate_tokens
from finechat.generate.settings import GenerationSettings
from finechat.models import int4_kernel
from finechat.models.chatglm.configuration_chatglm import ChatGLMConfig
from finechat.models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
from finechat.models.chatglm.quantization import (
    PackedHead,
    QuantizedLinear,
    chatglm_to_nibbles,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from finechat.models.chatglm.quantized_checkpoint import load_quantized_chatglm
from finechat.models.decoder_table import fast_decoder
from finechat.models.weight_only import (
    _learn_cpu_int4_slots,
    from_cpu_int4pack,
    pack_nibbles,
    to_cpu_int4pack,
)

BOS, EOS, MASK, GMASK, PAD = 290, 291, 292, 293, 3
PROMPT = [11, 12, 13, 14, 15, GMASK, BOS]
# Stated tolerance of the packed path against the dequantized reference, on logits of std ~1: the kernels take
# bf16 activations and round their sums to bf16 (2^-9 relative) where the reference runs in the model's dtype.
LOGIT_TOLERANCE = 0.05


def tiny_glm(seed: int = 0, hidden: int = 64, **extra) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = ChatGLMConfig(vocab_size=300, hidden_size=hidden, inner_hidden_size=2 * hidden, num_layers=2,
                        num_attention_heads=4, bos_token_id=BOS, eos_token_id=EOS, mask_token_id=MASK,
                        gmask_token_id=GMASK, pad_token_id=PAD, **extra)
    model = ChatGLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases so that a wrong bias or scale shows
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def reference_logits(model, ids, monkeypatch) -> torch.Tensor:
    """The dequantize-then-F.linear path (the reference's arithmetic) on the same model."""
    with monkeypatch.context() as m:
        m.setattr(QuantizedLinear, "packed_kernels_apply", lambda self, x: False)
        m.setattr(PackedHead, "forward", lambda self, x: torch.nn.functional.linear(x, self.weight))
        with torch.no_grad():
            return model(ids).logits.float()


@pytest.fixture(params=["own", "torch"])
def int4_kernel_choice(request, monkeypatch) -> str:
    """Runs a test with finechat's INT4 kernel (skipped where it does not build) and with PyTorch's."""
    if request.param == "own" and not int4_kernel.available():
        pytest.skip("finechat's INT4 kernel does not build here")
    if request.param == "torch":
        monkeypatch.setenv(int4_kernel.ENV, "torch")
    return request.param


def int4_layout(kernel: str, in_features: int) -> str:
    return "int4_blocks" if kernel == "own" and in_features % int4_kernel.BLOCK == 0 else "cpu_int4pack"


def count_kernel_calls(monkeypatch) -> dict:
    calls = {"int8": 0, "int4": 0, "own int4": 0}
    int8, int4, own = torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu, int4_kernel.matmul

    def counted_int8(*args):
        calls["int8"] += 1
        return int8(*args)

    def counted_int4(*args):
        calls["int4"] += 1
        return int4(*args)

    def counted_own(*args):
        calls["own int4"] += 1
        return own(*args)

    monkeypatch.setattr(int4_kernel, "matmul", counted_own)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", counted_int8)
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", counted_int4)
    return calls


# ------------------------------------------------------------------------------------------------------
# layouts
def test_chatglm_nibbles_map_to_the_kernel_convention_and_back():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    nibbles = chatglm_to_nibbles(pack_int4(q))  # low nibble = even column, value q + 8
    assert nibbles.tolist() == [[(1 + 8) | ((-2 + 8) << 4), (7 + 8) | ((-8 + 8) << 4)]]
    assert torch.equal(unpack_int4(chatglm_to_nibbles(nibbles).view(torch.int8)), q)


@pytest.mark.parametrize("shape", [(48, 64), (256, 96)], ids=["untiled", "tiled"])
def test_cpu_int4pack_round_trip(shape, monkeypatch):
    import finechat.models.weight_only as quantize

    monkeypatch.setattr(quantize, "PACK_CHUNK_ROWS", 128)  # packed in two chunks where the tiles allow it
    torch.manual_seed(0)
    values = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = to_cpu_int4pack(pack_nibbles(values))
    assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1))
    assert torch.equal(from_cpu_int4pack(packed, *shape), values)


def test_tile_slot_map_equals_the_full_map():
    full = _learn_cpu_int4_slots(256, 64)
    values = torch.arange(256 * 64).reshape(256, 64) % 16
    packed = to_cpu_int4pack(pack_nibbles(values.to(torch.uint8)))
    flat = torch.stack([packed & 0xF, packed >> 4], -1).reshape(-1)
    assert torch.equal(flat.long(), values.reshape(-1)[full])  # the map the tiles are checked against


# ------------------------------------------------------------------------------------------------------
# the packed path against the dequantized reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_packed_path_logits_match_the_dequantized_reference(bits, dtype, int4_kernel_choice, monkeypatch):
    hidden = 128 if bits == 4 and int4_kernel_choice == "own" else 64  # every width a multiple of 128
    model = tiny_glm(1, hidden=hidden).quantize(bits).to(dtype)
    ids = torch.tensor([PROMPT])
    expected = reference_logits(model, ids, monkeypatch)
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        packed = model(ids).logits.float()
    kernel = "int8" if bits == 8 else "own int4" if int4_kernel_choice == "own" else "int4"
    assert calls[kernel] >= 8  # the 4 layers x 2 blocks went through the kernel
    assert calls["int8"] >= 1  # and the head
    error = (packed - expected).abs().max().item()
    assert error <= LOGIT_TOLERANCE * expected.abs().max().item(), error
    assert torch.equal(packed.argmax(-1), expected.argmax(-1))
    assert packed.dtype == torch.float32 and model.transformer.layers[0].mlp.dense_h_to_4h.weight_scale.dtype \
        == torch.float16  # .to(dtype) kept the format's fp16 scales


def test_one_layer_matches_the_reference_formula(int4_kernel_choice):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    x = torch.randn(3, 256)
    for bits in (8, 4):
        layer = QuantizedLinear.from_linear(linear, bits)
        reference = torch.nn.functional.linear(x, dequantize_weight(layer.weight, layer.weight_scale, bits).float(),
                                               layer.bias)
        with torch.no_grad():
            out = layer(x)
        assert layer.layout == (int4_layout(int4_kernel_choice, 256) if bits == 4 else "chatglm")
        assert (out - reference).abs().max() <= 0.01 * reference.abs().max()
        assert torch.equal(layer.stored_weight(), QuantizedLinear.from_linear(linear, bits).weight)


def test_int4_goes_back_to_the_stored_layout_for_gradients(int4_kernel_choice, monkeypatch):
    model = tiny_glm(2, hidden=128).quantize(4)
    ids = torch.tensor([PROMPT])
    expected = reference_logits(model, ids, monkeypatch)
    with torch.no_grad():
        model(ids)
    qkv = model.transformer.layers[0].attention.query_key_value
    assert qkv.layout == int4_layout(int4_kernel_choice, 128)
    assert model.transformer.word_embeddings.weight.requires_grad
    logits = model(ids).logits  # gradients on: the reference arithmetic
    logits.sum().backward()
    assert model.transformer.word_embeddings.weight.grad is not None
    assert model.transformer.layers[1].attention.query_key_value.layout == "chatglm"
    assert torch.equal(logits.detach().float(), expected)


# ------------------------------------------------------------------------------------------------------
# the stored format
@pytest.mark.parametrize("bits", [4, 8])
def test_save_pretrained_after_repacking_is_byte_identical(bits, int4_kernel_choice, tmp_path):
    model = tiny_glm(3).quantize(bits)
    model.save_pretrained(tmp_path / "before")
    with torch.no_grad():
        model(torch.tensor([PROMPT]))  # repacks INT4, makes the head's INT8 copy
    layers = model.transformer.layers[0]
    assert layers.mlp.dense_4h_to_h.layout == (int4_layout(int4_kernel_choice, 128) if bits == 4 else "chatglm")
    assert layers.mlp.dense_h_to_4h.layout == (int4_layout(int4_kernel_choice, 64) if bits == 4 else "chatglm")
    model.save_pretrained(tmp_path / "after")
    before = (tmp_path / "before" / "model.safetensors").read_bytes()
    assert (tmp_path / "after" / "model.safetensors").read_bytes() == before
    state = load_file(tmp_path / "after" / "model.safetensors")
    assert not any(k.startswith("lm_head") for k in state)  # the head is still the tied embedding
    qkv = "transformer.layers.1.attention.query_key_value."
    layer = model.transformer.layers[1].attention.query_key_value
    assert torch.equal(state[qkv + "weight"], layer.stored_weight())
    assert state[qkv + "weight"].dtype == torch.int8 and state[qkv + "weight_scale"].dtype == torch.float16


# ------------------------------------------------------------------------------------------------------
# loading without float weights
class FloatLayerWatch(TorchFunctionMode):
    """Records every float tensor (not on meta) shaped like a block's [out, in] weight that a torch call returns."""

    def __init__(self, shapes: set[tuple[int, int]]):
        super().__init__()
        self.shapes, self.seen = shapes, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.device.type != "meta" \
                and tuple(out.shape) in self.shapes:
            self.seen.append((getattr(func, "__name__", str(func)), tuple(out.shape)))
        return out


def layer_shapes(hidden: int) -> set[tuple[int, int]]:
    return {(3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden)}


def test_a_quantized_config_builds_no_float_layer_weights():
    config = tiny_glm(0).config
    config.quantization_bit = 4
    with FloatLayerWatch(layer_shapes(64) | {(128, 64), (64, 128)}) as watch:
        model = ChatGLMForConditionalGeneration(config)
    assert watch.seen == []
    assert isinstance(model.transformer.layers[0].mlp.dense_h_to_4h, QuantizedLinear)
    assert isinstance(model.lm_head, PackedHead)


@pytest.fixture(scope="module")
def glm_folders(tmp_path_factory):
    """The fake chatglm-6b folder (fp16 shards) and its INT4 version saved the published way."""
    root = tmp_path_factory.mktemp("glm")
    fp16 = write_fake_chatglm(root / "chatglm-6b", hidden=64)
    from transformers import AutoConfig, AutoTokenizer

    import finechat.models  # noqa: F401  registers chatglm

    model = load_quantized_chatglm(fp16, AutoConfig.from_pretrained(fp16), bits=4, dtype=torch.float16)
    model.save_pretrained(root / "chatglm-6b-int4")
    AutoTokenizer.from_pretrained(fp16).save_pretrained(root / "chatglm-6b-int4")
    return fp16, root / "chatglm-6b-int4"


def test_loading_an_int4_folder_allocates_no_float_layer_weight(glm_folders):
    from finechat.models.resolve import load_model_and_tokenizer

    _, int4 = glm_folders
    with FloatLayerWatch(layer_shapes(64)) as watch:
        model, _, _ = load_model_and_tokenizer(str(int4), device="cpu")
    assert watch.seen == []
    layer = model.transformer.layers[1].mlp.dense_4h_to_h
    assert isinstance(layer, QuantizedLinear) and layer.weight.dtype == torch.int8
    assert layer.weight_scale.dtype == torch.float16 and layer.bias.dtype == torch.bfloat16  # bf16 on a CPU
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    stored = load_file(int4 / "model.safetensors")
    for key, value in model.state_dict().items():
        if key in stored and (not value.is_floating_point() or key.endswith("weight_scale")):
            assert torch.equal(value, stored[key]), key


def test_quantizing_at_load_equals_quantizing_the_loaded_model(glm_folders):
    from transformers import AutoModel

    fp16, int4 = glm_folders
    full = AutoModel.from_pretrained(fp16, dtype=torch.float16).quantize(4)
    stored = load_file(int4 / "model.safetensors")  # written from the tensor-by-tensor load
    for key, value in full.state_dict().items():
        if key.endswith(("weight_scale", "query_key_value.weight", "dense.weight", "_4h.weight", "_to_h.weight")):
            assert torch.equal(stored[key], value), key
    assert json.loads((int4 / "config.json").read_text())["quantization_bit"] == 4


@pytest.mark.parametrize("bits", [4, 8])
def test_fast_path_greedy_tokens_equal_generate_on_the_packed_model(bits, int4_kernel_choice):
    if bits == 8 and int4_kernel_choice == "own":
        pytest.skip("INT8 has one kernel")
    hidden = 128 if bits == 4 else 64  # widths of 128: finechat's INT4 kernel takes every layer
    model = tiny_glm(0, hidden=hidden)
    with torch.no_grad():  # a wide initialisation, and a repetition penalty: a tiny random model repeats itself
        for p in model.parameters():
            p.normal_(0, {64: 0.5, 128: 0.2}[hidden])
    model = model.quantize(bits).to(torch.bfloat16)
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             pad_token_id=PAD, eos_token_id=None, repetition_penalty=1.5)
    expected = out[0, len(PROMPT):].tolist()
    assert len(set(expected)) > 3
    settings = GenerationSettings(greedy=True, max_new_tokens=10, repetition_penalty=1.5)
    assert list(generate_tokens(fast_decoder(model), PROMPT, settings)) == expected


def test_an_int4_folder_does_not_take_other_bits(glm_folders):
    from transformers import AutoConfig

    from finechat.errors import ModelLoadError

    _, int4 = glm_folders
    with pytest.raises(ModelLoadError, match="already quantized to 4 bits"):
        load_quantized_chatglm(int4, AutoConfig.from_pretrained(int4), bits=8)


def test_quantizing_in_row_chunks_gives_the_same_bits(monkeypatch):
    import finechat.models.chatglm.quantization as quantization

    torch.manual_seed(0)
    weight = torch.randn(100, 64).half()
    for bits in (4, 8):
        whole = quantize_weight(weight, bits)
        monkeypatch.setattr(quantization, "QUANTIZE_CHUNK_ROWS", 16)
        chunked = quantize_weight(weight, bits)
        monkeypatch.undo()
        assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
