"""Preference and RL stages on TRL with a tiny model: DPO learns the chosen side, the reward model ranks pairs,
KTO / ORPO / SimPO / GRPO train and checkpoint, checkpoints load as adapters, bad setups fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finechat.cli import main as cli
from finechat.data.pairs import read_preferences
from finechat.data.templates import get_template
from finechat.errors import ConfigError, ModelLoadError
from finechat.eval.pair_accuracy import preference_accuracy
from finechat.eval.reward_scoring import load_reward_model, pairwise_accuracy
from finechat.train.grpo_rewards import answer_format, calculator, correct
from finechat.train.recipe import run_training
from finechat.train.train_config import TrainConfig

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Eight pairs whose chosen side is one fixed, learnable answer style."""
    folder = tmp_path_factory.mktemp("pairs")
    path = folder / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} + {i} = {2 * i}.", "rejected": "I do not know."}
            for i in range(2, 10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(tiny_model_dir, out, stage, data, **kw):
    base = dict(model=str(tiny_model_dir), stage=stage, data=[str(data)], max_steps=12, save_steps=6,
                logging_steps=1, per_device_train_batch_size=4, learning_rate=2e-2, lora_dropout=0.0, lora_rank=8,
                output_dir=str(out), report_to=["none"], cutoff_len=64, seed=1, beta=0.5)
    base.update(kw)
    return TrainConfig(**base)


def _load_policy(tiny_model_dir, adapter):
    from finechat.models.resolve import load_adapter, load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32", device="cpu")
    return (load_adapter(model, adapter) if adapter else model), tokenizer


def test_dpo_lora_raises_preference_accuracy_and_its_checkpoint_loads(tiny_model_dir, pairs_file, tmp_path):
    pairs = read_preferences(pairs_file).records
    model, tokenizer = _load_policy(tiny_model_dir, None)
    template = get_template(None, tokenizer)
    before = preference_accuracy(model, tokenizer, template, pairs)
    assert before["preference accuracy"] == 0.5  # a model equal to its reference: chance

    result = run_training(_cfg(tiny_model_dir, tmp_path / "dpo", "dpo", pairs_file))
    assert result.metrics["final_loss"] < result.metrics["first_loss"]
    assert result.global_step == 12 and Path(result.loss_curve).is_file()
    ckpt = Path(result.final_checkpoint)
    run = json.loads((ckpt / "finechat_run.json").read_text())
    assert run["stage"] == "dpo" and "LORA" in run["adapter_type"] and (ckpt / "finechat_licenses.json").is_file()

    policy, _ = _load_policy(tiny_model_dir, str(ckpt))  # the --adapter path of chat / serve / eval
    after = preference_accuracy(policy, tokenizer, template, pairs)  # reference: the adapter disabled
    assert after["preference accuracy"] >= 0.8 and after["log-ratio margin"] > 0

    import finechat

    bot = finechat.load(str(tiny_model_dir), adapter=str(ckpt))
    assert isinstance(bot.chat("What is 3 plus 3?", max_new_tokens=4)[0], str)


def test_dpo_sft_weight_adds_the_chosen_answer_likelihood(tiny_model_dir, pairs_file, tmp_path):
    """RPO: DPO plus the chosen answer's NLL; the chosen side's likelihood rises further than with DPO alone."""
    from finechat.eval.pair_accuracy import pair_logps

    pairs = read_preferences(pairs_file).records
    chosen = {}
    for weight in (0.0, 1.0):
        ckpt = run_training(_cfg(tiny_model_dir, tmp_path / f"w{weight}", "dpo", pairs_file, max_steps=6, save_steps=6,
                              learning_rate=1e-2, sft_weight=weight)).final_checkpoint
        policy, tokenizer = _load_policy(tiny_model_dir, ckpt)
        logps = pair_logps(policy, tokenizer, get_template(None, tokenizer), pairs)
        chosen[weight] = sum(logps[0]) / len(pairs)
        assert preference_accuracy(policy, tokenizer, get_template(None, tokenizer), pairs)["preference accuracy"] >= 0.8
    assert chosen[1.0] > chosen[0.0]
    with pytest.raises(ConfigError, match="sft_weight: 1.0 for stage rm"):
        run_training(_cfg(tiny_model_dir, tmp_path / "bad", "rm", pairs_file, sft_weight=1.0))


def test_dpo_resumes_from_its_newest_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    first = run_training(_cfg(tiny_model_dir, tmp_path / "r", "dpo", pairs_file, max_steps=2, save_steps=2,
                           loss="ipo"))
    assert first.global_step == 2
    again = run_training(_cfg(tiny_model_dir, tmp_path / "r", "dpo", pairs_file, max_steps=4, save_steps=2,
                           loss="ipo", resume_from_checkpoint="auto"))
    assert again.resumed_from and again.resumed_from.endswith("checkpoint-2") and again.global_step == 4


def test_reward_model_learns_to_rank_pairs_and_loads_for_scoring(tiny_model_dir, pairs_file, tmp_path, capsys):
    result = run_training(_cfg(tiny_model_dir, tmp_path / "rm", "rm", pairs_file, max_steps=16, save_steps=8))
    assert result.metrics["final_loss"] < result.metrics["first_loss"]
    rm = load_reward_model(result.final_checkpoint)
    scores = pairwise_accuracy(rm, read_preferences(pairs_file).records)
    assert scores["rm accuracy"] >= 0.8 and scores["rm margin"] > 0
    assert cli(["eval", "--reward-model", result.final_checkpoint, "--data", str(pairs_file),
                "--output_dir", str(tmp_path / "rm-eval")]) == 0
    assert "rm accuracy" in capsys.readouterr().out
    assert cli(["eval", "--reward-model", result.final_checkpoint, "--model", str(tiny_model_dir), "--data",
                str(SAMPLES / "preference" / "arithmetic_heldout.jsonl"), "--max_samples", "2",
                "--max_new_tokens", "4", "--output_dir", str(tmp_path / "rm-answers")]) == 0
    scored = json.loads((tmp_path / "rm-answers" / "reward_scores.json").read_text())
    assert scored["n"] == 2 and isinstance(scored["rm score"], float) and "rm score of labels" in scored
    with pytest.raises(ModelLoadError, match="is a reward model"):
        _load_policy(tiny_model_dir, result.final_checkpoint)


def test_reward_model_loads_whole_inside_a_zero3_run(tiny_model_dir, pairs_file, tmp_path):
    """GRPO's reward_model reward is loaded after the Trainer's arguments made DeepSpeed ZeRO-3 the process's setting;
    it must load whole (it is only called, on every rank), not partitioned by zero.Init (then: "size mismatch ...
    torch.Size([0])" at start), and the setting must be there again afterwards."""
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    result = run_training(_cfg(tiny_model_dir, tmp_path / "rm", "rm", pairs_file, max_steps=2, save_steps=2))
    plain = load_reward_model(result.final_checkpoint, device="cpu").model.state_dict()
    setting = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        inside = load_reward_model(result.final_checkpoint, device="cpu").model.state_dict()
        assert is_deepspeed_zero3_enabled() and setting.is_zero3()
    finally:
        unset_hf_deepspeed_config()
    assert set(inside) == set(plain)
    for key, tensor in plain.items():
        assert inside[key].shape == tensor.shape and bool((inside[key] == tensor).all()), key


@pytest.mark.parametrize("stage", ["kto", "orpo", "simpo"])
def test_other_preference_stages_train_and_checkpoint(stage, tiny_model_dir, pairs_file, tmp_path):
    result = run_training(_cfg(tiny_model_dir, tmp_path / stage, stage, pairs_file, max_steps=2, save_steps=2))
    assert result.global_step == 2
    assert json.loads((Path(result.final_checkpoint) / "finechat_run.json").read_text())["stage"] == stage
    _load_policy(tiny_model_dir, result.final_checkpoint)


def test_grpo_samples_scores_and_checkpoints(tiny_model_dir, tmp_path):
    result = run_training(_cfg(tiny_model_dir, tmp_path / "grpo", "grpo", SAMPLES / "preference" / "arithmetic_sft.jsonl",
                            max_steps=1, save_steps=1, max_samples=8, num_generations=4, max_completion_length=8,
                            rewards=["correct", "format", "calculator"]))
    assert result.global_step == 1 and "first reward" in result.metrics
    _load_policy(tiny_model_dir, result.final_checkpoint)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU fallback")
def test_grpo_use_vllm_on_a_cpu_says_so_once_and_rolls_out_with_pytorch(tiny_model_dir, tmp_path, capsys):
    kw = dict(max_steps=1, save_steps=1, max_samples=8, num_generations=4, max_completion_length=8,
              rewards=["correct", "format"])
    runs = [run_training(_cfg(tiny_model_dir, tmp_path / f"grpo-{flag}", "grpo",
                              SAMPLES / "preference" / "arithmetic_sft.jsonl", use_vllm=flag, **kw))
            for flag in (True, False)]
    err = capsys.readouterr().err
    assert err.count("TRL's vLLM rollouts sync the policy's weights into vLLM over NCCL") == 1
    assert runs[0].global_step == 1 and runs[0].metrics["first reward"] == runs[1].metrics["first reward"]


def test_rule_rewards():
    prompts = ["What is 17 plus 25?"] * 4
    answers = ["17 + 25 = 42.", "17 + 25 = 43.", "It is 42", "I like cats."]
    assert correct(prompts, answers, gold=["17 + 25 = 42."] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert answer_format(prompts, answers) == [1.0, 1.0, 1.0, 0.0]
    # the calculator checks what the model wrote: right and grounded in the prompt, wrong, or nothing to check
    assert calculator(prompts, answers) == [1.0, -1.0, 0.0, 0.0]
    assert calculator(["计算 6 × 7 等于多少？"], ["6 × 7 = 42。"]) == [1.0]
    assert calculator(prompts, ["1 + 1 = 2."]) == [0.0]  # right, but not the prompt's numbers


def test_sft_data_for_dpo_names_the_missing_fields(tiny_model_dir, tmp_path, capsys):
    code = cli(["train", f"model={tiny_model_dir}", "stage=dpo", f"data=[{SAMPLES / 'alpaca.json'}]",
                f"output_dir={tmp_path / 'x'}", "max_steps=1"])
    assert code == 3
    assert "chosen, rejected: missing" in capsys.readouterr().err


def test_ptuning_and_chatglm_limits_are_clear_errors(tiny_model_dir, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="method ptuning"):
        run_training(_cfg(tiny_model_dir, tmp_path / "p", "dpo", pairs_file, method="ptuning"))
    from chatglm_tiny import write_fake_chatglm

    glm = write_fake_chatglm(tmp_path / "glm")
    with pytest.raises(ConfigError, match="stage rm does not work with the native ChatGLM-6B"):
        run_training(_cfg(glm, tmp_path / "g", "rm", pairs_file))
    # DPO's rows keep [gMASK]<sop> between prompt and answer, and the native model builds its mask from the ids
    result = run_training(_cfg(glm, tmp_path / "g", "dpo", pairs_file, max_steps=4, save_steps=4))
    assert result.metrics["final_loss"] < result.metrics["first_loss"]


def test_published_layouts_train_with_every_record_kept(tiny_model_dir, tmp_path):
    """HH-RLHF whole dialogues, UltraFeedback-binarized message lists, ShareGPT and alpaca pairs: nothing dropped."""
    files = [SAMPLES / n for n in ("preference_hh.jsonl", "preference_prompt.jsonl", "preference_sharegpt.json",
                                   "preference_alpaca.json")]
    cfg = _cfg(tiny_model_dir, tmp_path / "pub", "dpo", files[0], max_steps=2, save_steps=2, cutoff_len=512)
    cfg.data = [str(f) for f in files]
    result = run_training(cfg)
    run = json.loads((Path(result.final_checkpoint) / "finechat_run.json").read_text())
    assert run["data"]["records"] == 16 and run["data"]["train_rows"] == 16
    assert run["data"]["skipped_records"] == 0 and run["data"]["no_room"] == 0
