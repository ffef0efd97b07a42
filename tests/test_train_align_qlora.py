"""QLoRA (a 4-bit bitsandbytes base) with every TRL stage on a tiny model: a couple of steps train float32 adapter
weights, and the checkpoint loads with --adapter (a reward model for scoring) like every other checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import test_train_align
import torch
from test_train_align import SAMPLES, _cfg, _load_policy

from finechat.data.pairs import read_preferences
from finechat.eval.reward_scoring import load_reward_model, pairwise_accuracy
from finechat.train.recipe import run_training

pytest.importorskip("bitsandbytes")
pairs_file = test_train_align.pairs_file  # the same eight pairs (a module fixture)
IDS = torch.tensor([[5, 17, 33, 80, 120, 7]])


def _qlora(tiny_model_dir, tmp_path, stage, data, **kw):
    result = run_training(_cfg(tiny_model_dir, tmp_path / stage, stage, data, method="qlora", max_steps=2, save_steps=2,
                            **kw))
    assert result.global_step == 2
    assert all(math.isfinite(e["loss"]) for e in result.log_history if "loss" in e)
    ckpt = Path(result.final_checkpoint)
    run = json.loads((ckpt / "finechat_run.json").read_text())
    assert (run["stage"], run["method"], run["quantization_bit"]) == (stage, "qlora", 4)
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    # finechat's rule holds under TRL too (TRL would cast a quantized model's trainable weights to bf16)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    return ckpt


@pytest.mark.parametrize("stage", ["dpo", "kto", "orpo", "simpo", "grpo"])
def test_qlora_policy_stages_train_and_load_as_adapters(stage, tiny_model_dir, pairs_file, tmp_path):
    extra = dict(max_samples=8, num_generations=4, max_completion_length=8, rewards=["correct", "format"]) \
        if stage == "grpo" else {}
    data = SAMPLES / "preference" / "arithmetic_sft.jsonl" if stage == "grpo" else pairs_file
    ckpt = _qlora(tiny_model_dir, tmp_path, stage, data, **extra)
    base, _ = _load_policy(tiny_model_dir, None)
    policy, _ = _load_policy(tiny_model_dir, str(ckpt))  # the --adapter path of chat / serve / eval
    if stage != "grpo":  # the tiny model's samples all score 0, so GRPO has no advantage to learn from here
        with torch.no_grad():
            assert not torch.allclose(policy(input_ids=IDS).logits, base(input_ids=IDS).logits)  # it learned


def test_qlora_reward_model_trains_and_loads_for_scoring(tiny_model_dir, pairs_file, tmp_path):
    rm = load_reward_model(_qlora(tiny_model_dir, tmp_path, "rm", pairs_file))
    scores = pairwise_accuracy(rm, read_preferences(pairs_file).records)
    assert scores["pairs"] == 8 and math.isfinite(scores["rm margin"])


def test_qlora_dpo_on_the_native_chatglm(tmp_path, pairs_file):
    from chatglm_tiny import write_fake_chatglm

    glm = write_fake_chatglm(tmp_path / "glm")
    ckpt = _qlora(glm, tmp_path, "dpo", pairs_file)
    policy, _ = _load_policy(glm, str(ckpt))
    with torch.no_grad():
        assert torch.isfinite(policy(input_ids=IDS).logits).all()
