"""Each training method on a tiny Llama: loss falls, checkpoints are self-contained and reload exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finechat.errors import ConfigError, ModelLoadError
from finechat.train.recipe import run_training
from finechat.train.train_config import TrainConfig

PRODUCTS = ["上衣", "裙", "外套", "裤"]
COLORS = ["白色", "黑色", "红色", "蓝色"]


@pytest.fixture(scope="module")
def adgen(tmp_path_factory):
    """A small ADGEN-like prompt-response file (content -> summary)."""
    path = tmp_path_factory.mktemp("data") / "adgen.json"
    rows = [{"content": f"类型#{p}*颜色#{c}*风格#简约", "summary": f"这件{c}的{p}采用简约的设计，时尚又大方。"}
            for p in PRODUCTS for c in COLORS]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


def train(tiny_model_dir, adgen, out, **kw):
    settings = dict(model=str(tiny_model_dir), data=[str(adgen)], output_dir=str(out), max_steps=6, save_steps=3,
                    logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, val_size=4,
                    report_to=["none"], pre_seq_len=8, lora_target=["q_proj", "k_proj", "v_proj", "o_proj"])
    settings.update(kw)
    return run_training(TrainConfig(**settings))


def eval_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 33, 80, 120, 7]])


@pytest.mark.parametrize("method", ["lora", "ptuning", "full", "freeze", "qlora"])
def test_method_trains_saves_and_reloads(method, tiny_model_dir, adgen, tmp_path):
    import finechat

    lr = {"full": 3e-3, "freeze": 3e-3, "ptuning": 3e-2}.get(method, 1e-2)
    result = train(tiny_model_dir, adgen, tmp_path / method, method=method, learning_rate=lr,
                   num_layer_trainable=1)
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses  # the loss really moves (QLoRA included)
    assert "eval_loss" in result.metrics
    ckpt = tmp_path / method / "checkpoint-6"
    assert result.final_checkpoint == str(ckpt)
    files = {p.name for p in ckpt.iterdir()}
    weights = {"adapter_config.json", "adapter_model.safetensors"} if method in ("lora", "ptuning", "qlora") \
        else {"config.json", "model.safetensors"}
    assert weights | {"finechat_run.json", "finechat_licenses.json", "tokenizer.json", "trainer_state.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) and "model" in name for name in files)
    run = json.loads((ckpt / "finechat_run.json").read_text())
    assert run["method"] == method and run["template"] == "tokenizer"
    assert run["base_model"]["hidden_size"] == 64 and run["base_model"]["num_hidden_layers"] == 2
    assert run["licenses"]["model"]["license"] == "unknown"
    assert (tmp_path / method / "loss_curve.png").stat().st_size > 1000

    # every checkpoint, not only the last, loads on its own onto the base
    for step in (3, 6):
        bot = finechat.load(str(tiny_model_dir), adapter=str(tmp_path / method / f"checkpoint-{step}"))
        assert bot.template.name == "tokenizer"
    base = finechat.load(str(tiny_model_dir))
    if method != "qlora":  # the 4-bit base rounds differently from the float32 one used for chat
        assert not torch.allclose(eval_logits(bot.model, IDS), eval_logits(base.model, IDS))


def test_ptuning_checkpoint_reloads_to_identical_logits_and_generates_with_its_prefix(tiny_model_dir, adgen,
                                                                                        tmp_path):
    from peft import PeftModel

    import finechat

    train(tiny_model_dir, adgen, tmp_path / "pt", method="ptuning", learning_rate=3e-2, max_steps=3)
    ckpt = tmp_path / "pt" / "checkpoint-3"
    a = finechat.load(str(tiny_model_dir), adapter=str(ckpt))
    b = finechat.load(str(tiny_model_dir), adapter=str(ckpt))
    assert isinstance(a.model, PeftModel)
    assert torch.equal(eval_logits(a.model, IDS), eval_logits(b.model, IDS))
    # generate() must use the prefix: its greedy tokens equal a step-by-step argmax of the forward pass
    out = a.model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False,
                           output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = a.model(input_ids=out.sequences[:, :-1]).logits[0, -4:]
    for i in range(4):
        assert torch.allclose(out.scores[i][0], ref[i], atol=1e-4)


def test_adapter_on_the_wrong_base_or_prefix_length_is_a_clear_error(tiny_model_dir, adgen, tmp_path):
    from tiny import save_tiny_model

    import finechat

    train(tiny_model_dir, adgen, tmp_path / "pt", method="ptuning", max_steps=3)
    ckpt = tmp_path / "pt" / "checkpoint-3"
    other = save_tiny_model(tmp_path / "other", hidden=32, layers=3)
    with pytest.raises(ModelLoadError, match="different base model"):
        finechat.load(str(other), adapter=str(ckpt))
    run = json.loads((ckpt / "finechat_run.json").read_text())
    run["base_model"]["pre_seq_len"] = 16
    (ckpt / "finechat_run.json").write_text(json.dumps(run))
    with pytest.raises(ModelLoadError, match="pre_seq_len"):
        finechat.load(str(tiny_model_dir), adapter=str(ckpt))


def test_config_checks_itself():
    with pytest.raises(ValueError, match="quantization_bit"):
        TrainConfig(method="full", quantization_bit=4)
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        TrainConfig(per_device_train_batch_size=0)
    assert TrainConfig(method="qlora").quantization_bit == 4
    with pytest.raises(ConfigError, match="no training data"):
        run_training(TrainConfig(model="/nonexistent", data=[]))


def test_lora_all_linear_adapts_every_linear_layer_but_the_head(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finechat.train.methods import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = apply_lora(model, TrainConfig(model=str(tiny_model_dir), data=["x"], lora_target=["all-linear"]))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in peft_model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
