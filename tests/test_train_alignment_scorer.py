"""The pipeline's held-out report: each stage's reference is the previous row's scores, not a second model load;
command-line ``defaults.KEY`` overrides reach every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finechat.eval.pair_accuracy import preference_accuracy
from finechat.generate.chat_loader import load as load_chat_model
from finechat.train import alignment_eval
from finechat.train.alignment_eval import AlignmentEvalConfig, AlignmentScorer
from finechat.train.stages import parse_stages, resolve_stages

PAIRS = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} + {i} = {2 * i}.", "rejected": f"{i} + {i} = {2 * i + 3}."}
         for i in range(2, 8)]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights: a policy that differs from its base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finechat.models.resolve import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32", device="cpu")
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def pairs_path(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    return path


def test_reference_comes_from_the_previous_row_without_loading_it(tiny_model_dir, adapter_dir, pairs_path, tmp_path,
                                                                  monkeypatch):
    scorer = AlignmentScorer(AlignmentEvalConfig(pairs=str(pairs_path), batch_size=4))
    base = (str(tiny_model_dir), None)
    before = scorer.score(load_chat_model(base[0], dtype="float32"), base, None, tmp_path / "before", None)
    assert before["preference accuracy"] == 0.5 and before["log-ratio margin"] == 0.0

    # the policy trained from the base: its reference is the row above, already scored
    def no_load(*args, **kwargs):
        raise AssertionError("the reference was loaded again")

    monkeypatch.setattr(alignment_eval, "load_model_and_tokenizer", no_load)
    bot = load_chat_model(base[0], adapter=str(adapter_dir), dtype="float32")
    after = scorer.score(bot, (base[0], str(adapter_dir)), base, tmp_path / "after", None)

    # the same numbers as scoring against the base by switching the adapter off
    direct = preference_accuracy(bot.model, bot.tokenizer, bot.template, scorer.pairs, batch_size=4)
    assert after["pairs"] == len(PAIRS)
    assert after["preference accuracy"] == direct["preference accuracy"]
    assert after["log-ratio margin"] == pytest.approx(direct["log-ratio margin"], abs=1e-4)
    assert after["log-ratio margin"] != 0.0  # the adapter changed the model: not trivially equal


def test_a_reference_nobody_scored_yet_is_loaded_and_kept(tiny_model_dir, adapter_dir, pairs_path, tmp_path):
    """After a restart the row above is gone: the reference is loaded once and its scores kept."""
    scorer = AlignmentScorer(AlignmentEvalConfig(pairs=str(pairs_path), batch_size=4))
    started = (str(tiny_model_dir), str(adapter_dir))
    bot = load_chat_model(str(tiny_model_dir), dtype="float32")
    report = scorer.score(bot, (str(tiny_model_dir), None), started, tmp_path / "x", None)
    assert started in scorer.logps
    reverse = preference_accuracy(load_chat_model(str(tiny_model_dir), adapter=str(adapter_dir), dtype="float32").model,
                                  bot.tokenizer, bot.template, scorer.pairs, batch_size=4)
    # the base against the adapter is the adapter against the base, mirrored
    assert report["log-ratio margin"] == pytest.approx(-reverse["log-ratio margin"], abs=1e-4)


def test_command_line_defaults_replace_what_each_stage_sets(tmp_path):
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump({
        "model": "default", "defaults": {"max_steps": 16, "learning_rate": 1e-3},
        "stages": [{"name": "a", "data": ["a.jsonl"], "max_steps": 30},
                   {"name": "b", "data": ["b.jsonl"], "learning_rate": 5e-4}],
    }), encoding="utf-8")
    cfg, _ = resolve_stages(str(path), [])
    assert [s.train["max_steps"] for s in parse_stages(cfg)] == [30, 16]  # the file: a stage's own value wins
    cfg, plain = resolve_stages(str(path), ["defaults.max_steps=2", "output_dir=out"])
    stages = parse_stages(cfg)
    assert [s.train["max_steps"] for s in stages] == [2, 2]
    assert [s.train["learning_rate"] for s in stages] == [1e-3, 5e-4]  # keys not given stay as the file says
    assert plain == ["output_dir=out"] and cfg.output_dir == "out"


def test_reward_model_pairs_default_to_the_pairs_and_are_not_capped(pairs_path, tmp_path):
    scorer = AlignmentScorer(AlignmentEvalConfig(pairs=str(pairs_path), max_samples=2))
    assert scorer.rm_pairs == scorer.pairs and len(scorer.pairs) == 2
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 3), encoding="utf-8")
    scorer = AlignmentScorer(AlignmentEvalConfig(pairs=str(pairs_path), rm_pairs=str(more), max_samples=2))
    assert len(scorer.pairs) == 2 and len(scorer.rm_pairs) == 3 * len(PAIRS)
