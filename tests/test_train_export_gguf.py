"""finechat export --to gguf: the file loads back (transformers' GGUF reader) with the same logits and greedy
tokens as the model it came from, for Llama and Qwen2, with a LoRA merged; bad inputs are one clear error."""

import re

import gguf
import pytest
import torch
from eval_helpers import make_adapter
from tiny import make_tokenizer, save_tiny_model

from finechat.cli import main as cli

QUESTION = "What is the capital of France? 你好"


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny Llama whose greedy answers depend on the prompt (wide initialisation)."""
    return save_tiny_model(tmp_path_factory.mktemp("wide-llama"), initializer_range=0.3)


def save_tiny_qwen2(folder):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.3)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # q/k/v biases are what Qwen2 adds over Llama: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompt_ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy(model, ids, n=12):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def metadata(path):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
            or k.endswith(("_id", ".model", ".pre", "_token"))}, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_f16_round_trip_same_logits_and_greedy_tokens(kind, wide_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = wide_llama if kind == "llama" else save_tiny_qwen2(tmp_path / "qwen2")
    out = tmp_path / "out" / "model.gguf"
    assert cli(["export", "--to", "gguf", "--model", str(src), "--out", str(out), "--outtype", "f16"]) == 0
    source = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)
    back, back_tok = load_gguf(out)
    ids = prompt_ids(tok)
    assert prompt_ids(back_tok) == ids  # the tokenizer, its special tokens and the chat template survived
    assert back_tok.chat_template == tok.chat_template
    with torch.inference_mode():
        want, got = source(torch.tensor([ids])).logits, back(torch.tensor([ids])).logits
    assert torch.allclose(want, got, atol=2e-2 * want.abs().max().item())  # f16 rounding only
    assert greedy(back, ids) == greedy(source, ids)
    meta, tensors = metadata(out)
    assert meta["general.architecture"] == kind
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert meta["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    # transformers loads a Qwen2 folder with Qwen2's own split regex, which llama.cpp knows as "qwen2"
    assert meta["tokenizer.ggml.pre"] == ("gpt-2" if kind == "llama" else "qwen2")
    assert tensors["blk.0.attn_q.weight"] == "F16" and tensors["blk.0.attn_norm.weight"] == "F32"
    assert ("output.weight" in tensors) == (kind == "qwen2")  # Llama's tied embedding is written once
    if kind == "qwen2":
        assert tensors["blk.0.attn_q.bias"] == "F32"
        assert meta["qwen2.vocab_size"] == len(tok) + 8  # spare embedding rows became placeholder tokens


def test_lora_is_merged_before_export(tiny_model_dir, tmp_path):
    import finechat

    adapter = make_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "merged.gguf"
    assert cli(["export", "--to", "gguf", "--model", str(tiny_model_dir), "--adapter", str(adapter),
                "--out", str(out)]) == 0
    with_adapter = finechat.load(str(tiny_model_dir), adapter=str(adapter))
    base = finechat.load(str(tiny_model_dir))
    ids = prompt_ids(with_adapter.tokenizer)
    back, _ = load_gguf(out)
    expected = greedy(with_adapter.model, ids)
    assert greedy(back, ids) == expected
    assert greedy(base.model, ids) != expected  # the adapter matters
    assert "merged" in metadata(out)[0]["general.description"]


def test_quantized_types_shrink_the_file_and_stay_close(wide_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(wide_llama).eval()
    ids = prompt_ids(AutoTokenizer.from_pretrained(wide_llama))
    with torch.inference_mode():
        want = source(torch.tensor([ids])).logits
    sizes, errors = {}, {}
    for outtype in ("bf16", "q8_0", "q4_1", "q4_0"):
        out = tmp_path / f"m-{outtype}.gguf"
        assert cli(["export", "--to", "gguf", "--model", str(wide_llama), "--out", str(out),
                    "--outtype", outtype]) == 0
        _, tensors = metadata(out)
        assert tensors["blk.1.ffn_down.weight"] == outtype.upper()
        # 4-bit files keep the (tied) embedding, which also makes every logit, at Q8_0
        assert tensors["token_embd.weight"] == ("Q8_0" if outtype.startswith("q4") else outtype.upper())
        back, _ = load_gguf(out)
        with torch.inference_mode():
            errors[outtype] = (back(torch.tensor([ids])).logits - want).abs().max().item()
        sizes[outtype] = out.stat().st_size
    assert sizes["bf16"] > sizes["q8_0"] > sizes["q4_1"] > sizes["q4_0"]
    assert errors["bf16"] < errors["q4_0"] and errors["q8_0"] < errors["q4_0"]
    assert errors["q8_0"] < 0.1 * want.abs().max().item()


def test_modelfile_template_renders_like_the_chat_template(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from finechat.models.ollama import _role_pieces, _simulate

    out = tmp_path / "m.gguf"
    assert cli(["export", "--to", "gguf", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    text = (tmp_path / "m.Modelfile").read_text()
    assert "FROM ./m.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert re.search(r"PARAMETER temperature 0\.7\b", text) and "TEMPLATE" in text
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pieces, default_system = _role_pieces(tok, ["<|im_end|>"])
    assert default_system is None
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "2+2?"}]
    assert _simulate(pieces, chat) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    # a template that adds a default system prompt (as SmolLM2's does): it becomes the Modelfile's SYSTEM
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are kind.<|im_end|>\\n' }}"
                         "{% endif %}" + tok.chat_template)
    assert _role_pieces(tok, ["<|im_end|>"])[1] == "You are kind."


def test_template_with_round_numbers_gets_no_fixed_template(tiny_model_dir, tmp_path):
    from finechat.data.templates import TEMPLATES

    # ChatGLM-6B's format numbers its rounds: no fixed prefix can say "[Round 1]", so the Modelfile says why
    out = tmp_path / "glm-format.gguf"
    assert cli(["export", "--to", "gguf", "--model", str(tiny_model_dir), "--out", str(out),
                "--template", "chatglm"]) == 0
    text = (tmp_path / "glm-format.Modelfile").read_text()
    assert "\nTEMPLATE " not in text and "# No TEMPLATE:" in text
    defaults = dict(TEMPLATES["chatglm"].generation_defaults)  # the template's own sampling defaults
    assert f"PARAMETER top_p {defaults['top_p']}" in text and f"PARAMETER temperature {defaults['temperature']}" in text


def _only_expected_files(folder, names):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporary or half-written file


def test_bad_inputs_are_one_clear_error(wide_llama, tmp_path, capsys):
    good = tmp_path / "good.gguf"
    assert cli(["export", "--to", "gguf", "--model", str(wide_llama), "--out", str(good)]) == 0
    capsys.readouterr()
    data = good.read_bytes()
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04 this is a zip file, not a GGUF" * 10)
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    cases = [
        (["--model", str(truncated)], "truncated or damaged GGUF file"),
        (["--model", str(foreign)], "not a GGUF file"),
        (["--model", str(good), "--out", str(good)], "is the input file"),
        (["--model", str(wide_llama), "--out", str(out_dir / "x.bin")], "ending in .gguf"),
    ]
    for extra, message in cases:
        argv = ["export", "--to", "gguf", "--out", str(out_dir / "x.gguf"), *extra]
        assert cli(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:  # argparse names the valid choices
        cli(["export", "--to", "gguf", "--model", str(wide_llama), "--out", str(out_dir / "x.gguf"),
             "--outtype", "q3_x"])
    assert e.value.code == 2 and "q8_0" in capsys.readouterr().err
    _only_expected_files(out_dir, [])
    assert good.read_bytes() == data  # the input was not touched


def test_adapter_for_another_base_and_chatglm_are_refused(wide_llama, tmp_path, capsys):
    from chatglm_tiny import write_fake_chatglm

    other = save_tiny_model(tmp_path / "other", hidden=32)
    adapter = make_adapter(other, tmp_path / "other-lora")
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    assert cli(["export", "--to", "gguf", "--model", str(wide_llama), "--adapter", str(adapter),
                "--out", str(out_dir / "x.gguf")]) == 2
    assert "does not fit this base model" in capsys.readouterr().err
    glm = write_fake_chatglm(tmp_path / "glm")
    assert cli(["export", "--to", "gguf", "--model", str(glm), "--out", str(out_dir / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "ChatGLM-6B (v1) has no llama.cpp architecture" in err and "llama, mistral, qwen2" in err
    _only_expected_files(out_dir, [])


def test_a_crash_mid_write_leaves_nothing(wide_llama, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finechat.models.gguf_writer import write_gguf

    model = AutoModelForCausalLM.from_pretrained(wide_llama)
    tok = AutoTokenizer.from_pretrained(wide_llama)
    calls = []
    real = gguf.quants.quantize

    def failing(data, qtype):
        calls.append(qtype)
        if len(calls) == 6:
            raise MemoryError("simulated crash")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(MemoryError):
        write_gguf(model, tok, tmp_path / "m.gguf", "q8_0", progress=False)
    _only_expected_files(tmp_path, [])
