"""finechat export: a merged LoRA loads with plain transformers and answers exactly like base + adapter."""

import json
import subprocess
import sys

import pytest
import torch
from eval_helpers import make_adapter

from finechat.cli import main as cli

PROMPT = "类型#上衣*颜色#白色"


def greedy_ids(model, ids, n=12):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_merged_lora_equals_base_plus_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import finechat

    adapter = make_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "merged"
    assert cli(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    record = json.loads((out / "finechat_export.json").read_text())
    assert record["merged"] is True and record["adapter_type"] == "LORA"

    with_adapter = finechat.load(str(tiny_model_dir), adapter=str(adapter))
    base = finechat.load(str(tiny_model_dir))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers alone, no finechat class
    tok = AutoTokenizer.from_pretrained(out)
    ids = with_adapter.encode_prompt(with_adapter.build_prompt([{"role": "user", "content": PROMPT}]))
    assert tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                   add_generation_prompt=True) == with_adapter.build_prompt(
        [{"role": "user", "content": PROMPT}])
    expected = greedy_ids(with_adapter.model, ids)
    assert greedy_ids(plain, ids) == expected
    assert greedy_ids(base.model, ids) != expected  # the adapter matters
    merged_bot = finechat.load(str(out))
    assert merged_bot.chat(PROMPT, [], greedy=True, max_new_tokens=16)[0] == \
        with_adapter.chat(PROMPT, [], greedy=True, max_new_tokens=16)[0]


def test_merged_model_loads_without_finechat(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "merged"
    assert cli(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    # A fresh interpreter that blocks importing finechat.
    code = (
        "import sys; sys.modules['finechat'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "print(type(m).__name__, len(t))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("LlamaForCausalLM")


def test_prefix_adapter_is_exported_beside_the_base(tiny_model_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_model_dir, tmp_path / "prefix", kind="prefix")
    out = tmp_path / "exported"
    assert cli(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "cannot be merged" in captured.err
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "finechat_export.json").read_text())["merged"] is False


def test_quantized_export_reloads(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "q8"
    assert cli(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out),
                "--quantization-bit", "8"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["load_in_8bit"] is True
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == config["vocab_size"]


def test_quantized_base_is_refused_with_reason(tiny_model_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_model_dir, tmp_path / "lora")
    q = tmp_path / "q8"
    assert cli(["export", "--model", str(tiny_model_dir), "--out", str(q), "--quantization-bit", "8"]) == 0
    code = cli(["export", "--model", str(q), "--adapter", str(adapter), "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "stored quantized" in err and "full-precision base" in err


def test_bad_inputs(tiny_model_dir, tmp_path, capsys):
    assert cli(["export", "--model", str(tiny_model_dir), "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a peft adapter" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_builtin_template_is_written_as_chat_template(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from finechat.data.templates import TEMPLATES
    from finechat.train.export import builtin_template_jinja

    out = tmp_path / "chatglm"
    assert cli(["export", "--model", str(tiny_model_dir), "--out", str(out), "--template", "chatglm"]) == 0
    tok = AutoTokenizer.from_pretrained(out)  # plain transformers
    conversations = [
        [{"role": "user", "content": "你好"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    ]
    done = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    for name, template in TEMPLATES.items():
        if name != "chatglm":
            tok.chat_template = builtin_template_jinja(name, tok)
        for messages in conversations:
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
                template.render(messages, tok.eos_token, add_generation_prompt=True), name
        assert tok.apply_chat_template(done, tokenize=False) == template.render(done, tok.eos_token, False), name
