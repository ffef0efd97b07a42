"""Weight-only INT8/INT4: accuracy of the layers, quantize -> save -> load round trips, CLI and bench."""

import json

import pytest
import torch
from tiny import make_tiny_llama, make_tokenizer

from finechat.cli import main
from finechat.models.weight_only import (
    Int4Linear,
    Int8Linear,
    load_quantized,
    quantize_int4_groups,
    quantize_model,
    save_quantized,
    weight_bytes,
)


def test_int8_and_int4_layers_are_close_to_float():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    x = torch.randn(5, 256)
    exact = linear(x)
    int8, int4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 32)
    rel8 = (int8(x) - exact).norm() / exact.norm()
    rel4 = (int4(x) - exact).norm() / exact.norm()
    assert rel8 < 0.01 and rel4 < 0.1 and rel8 < rel4
    # the CPU kernel computes what the canonical weights say
    ref = torch.nn.functional.linear(x, int4.dequantized_weight(torch.float32)) + linear.bias
    assert torch.allclose(int4(x), ref, atol=0.05, rtol=0.02)
    q, _ = quantize_int4_groups(linear.weight, 32)
    assert torch.equal(int4.canonical_weight(), q[:, 0::2] | (q[:, 1::2] << 4))


@pytest.mark.parametrize("bits,embedding", [(8, False), (8, True), (4, False), (4, True)])
def test_quantize_save_load_round_trip(tmp_path, bits, embedding):
    tokenizer = make_tokenizer()
    reference = make_tiny_llama(vocab_size=len(tokenizer))
    model = quantize_model(make_tiny_llama(vocab_size=len(tokenizer)), bits, group_size=32, include_embedding=embedding)
    ids = torch.tensor([tokenizer("The capital of France is Paris. 中国的首都是北京。")["input_ids"]])
    with torch.no_grad():
        exact, logits = reference(ids).logits, model(ids).logits
    assert (logits.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9
    save_quantized(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    record = config["finechat_quantization"]
    assert record["bits"] == bits and record["include_embedding"] == embedding
    assert {s["bits"] for s in record["modules"].values()} == {bits}
    assert not list(tmp_path.glob("*.bin")), "weights must be safetensors, not pickles"
    from transformers import AutoConfig

    loaded = load_quantized(tmp_path, AutoConfig.from_pretrained(tmp_path), torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    assert weight_bytes(loaded) == weight_bytes(model)
    if embedding:  # the tied head still shares the embedding's INT8 tensors
        assert loaded.lm_head.weight_int8 is loaded.model.embed_tokens.weight_int8


def test_bytes_per_parameter():
    sizes = {}
    for bits in (8, 4):
        model = quantize_model(make_tiny_llama(hidden=128, vocab_size=600), bits, group_size=64, include_embedding=True)
        total, params = weight_bytes(model)
        sizes[bits] = total / params
    assert sizes[8] <= 1.1 and sizes[4] <= 0.75 and sizes[4] < sizes[8]


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="bits"):
        quantize_model(make_tiny_llama(), 3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(make_tiny_llama(), 4, group_size=48)
    model = quantize_model(make_tiny_llama(), 8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, 4)


def test_cli_quantize_then_chat(tiny_model_dir, tmp_path, capsys):
    import finechat

    out = tmp_path / "int4"
    assert main(["quantize", "--model", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "INT4 (group 32)" in printed and "bytes/param" in printed
    bot = finechat.load(str(out))
    assert isinstance(bot.model.model.layers[0].mlp.up_proj, Int4Linear)
    answer, history = bot.chat("What is the capital of France?", greedy=True, max_new_tokens=8)
    assert history == [("What is the capital of France?", answer)]
    # the same answer as quantizing at load time
    at_load = finechat.load(str(tiny_model_dir), quantization_bit=4)
    assert isinstance(at_load.model.model.layers[0].mlp.up_proj, Int4Linear)
    # a non-empty output folder is refused without --force
    assert main(["quantize", "--model", str(tiny_model_dir), "--bits", "8", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_bench_prints_one_row_per_precision(tiny_model_dir, capsys):
    assert main(["bench", "--model", str(tiny_model_dir), "--new-tokens", "6", "--prompt-tokens", "12",
                 "--group-size", "32", "--ppl-tokens", "300"]) == 0
    table = capsys.readouterr().out
    for name in ("fp32", "bf16", "int8", "int4"):
        assert any(line.startswith(name + " ") for line in table.splitlines()), table
    fp32 = next(line for line in table.splitlines() if line.startswith("fp32 ")).split()
    assert fp32[-1] == "yes" and fp32[-2] == "1.000"  # greedy = HF, agreement with itself
    assert main(["bench", "--model", str(tiny_model_dir), "--precisions", "fp64"]) == 2


def test_bench_on_a_chatglm_folder_runs_the_fast_path_with_generate_s_tokens(tmp_path, capsys):
    from chatglm_tiny import write_fake_chatglm

    folder = write_fake_chatglm(tmp_path / "glm")
    assert main(["bench", "--model", str(folder), "--precisions", "fp32,int8", "--new-tokens", "8",
                 "--prompt-tokens", "16", "--ppl-tokens", "64", "--rounds", "1", "--group-size", "32"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("fp32 ", "int8 "))]
    assert len(rows) == 2 and all(row[-1] == "yes" for row in rows), rows  # greedy = HF on every row


@pytest.mark.parametrize("in_features", [24, 40, 64])
def test_int8_linear_is_right_for_widths_the_kernel_refuses(in_features):
    """torch's INT8 kernel returns garbage for input widths that are not a multiple of 16: those layers take the
    dequantized product instead."""
    from finechat.models.weight_only import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 32)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(3, in_features)
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(torch.float32), linear.bias)
    torch.testing.assert_close(layer(x), expected, atol=0.05, rtol=0.05)
