"""Chinese preference sets in the registry: each record layout (data/samples/published/, written for finechat in
the sets' field layouts) is detected as the registry says, converts and trains with every record kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finechat.cli import main as cli
from finechat.data.catalog import DATASETS, check_commercial
from finechat.data.pairs import read_preferences
from finechat.errors import ConfigError
from finechat.train.recipe import run_training
from finechat.train.train_config import TrainConfig

PUBLISHED = Path(__file__).resolve().parent.parent / "data" / "samples" / "published"
LAYOUTS = {  # registry name -> a file in that set's layout, and its number of pairs
    "dpo-en-zh-20k": ("dpo_en_zh_20k.json", 3),
    "dpo-en-zh-20k-preference": ("dpo_en_zh_20k_preference.jsonl", 2),
    "chinese-dpo-pairs": ("chinese_dpo_pairs.jsonl", 2),
    "medical-reward-zh": ("medical_reward.json", 2),
    "rlhf-reward-single-round-zh": ("rlhf_reward_single_round_zh.jsonl", 2),
}


def _pairs(path) -> list[tuple]:
    return [(tuple(map(str, p.prompt.messages())), p.chosen, p.rejected) for p in read_preferences(path).records]


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_is_detected_as_registered_and_converts_with_every_record(name, tmp_path):
    entry = DATASETS[name]
    assert entry.license and entry.source and "http" not in entry.source + entry.where
    path, n = PUBLISHED / LAYOUTS[name][0], LAYOUTS[name][1]
    result = read_preferences(path)
    assert (result.format, len(result.records), result.skipped) == (entry.format, n, [])
    assert any("\u4e00" <= ch <= "\u9fff" for p in result.records for ch in str(p.prompt.messages()) + p.chosen)
    out = tmp_path / "converted.jsonl"
    assert cli(["data", "convert", str(path), "--to", "pref-prompt", str(out)]) == 0
    assert _pairs(out) == _pairs(path)  # nothing lost or changed on the way (system and history included)


def test_system_column_and_medicalgpt_history_are_kept():
    pair = read_preferences(PUBLISHED / "chinese_dpo_pairs.jsonl").records[0]
    assert pair.prompt.system == "你是一个乐于助人的助手。"
    turns = read_preferences(PUBLISHED / "dpo_en_zh_20k_preference.jsonl").records[1].prompt.turns
    assert [(t.role, t.content) for t in turns] == [("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4."),
                                                    ("user", "And 3 + 3?")]


def test_commercial_flags_of_the_chinese_sets():
    check_commercial("default", ["dpo-en-zh-20k", "chinese-dpo-pairs", "medical-reward-zh"], commercial=True)
    with pytest.raises(ConfigError, match=r"dataset 'rlhf-reward-single-round-zh' \(licence: unknown"):
        check_commercial("default", ["rlhf-reward-single-round-zh"], commercial=True)


def test_every_layout_trains_a_few_steps_with_every_record_kept(tiny_model_dir, tmp_path):
    files = [str(PUBLISHED / f) for f, _ in LAYOUTS.values()]
    total = sum(n for _, n in LAYOUTS.values())
    cfg = TrainConfig(model=str(tiny_model_dir), stage="dpo", data=files, max_steps=2, save_steps=2, logging_steps=1,
                      per_device_train_batch_size=4, lora_rank=4, output_dir=str(tmp_path / "dpo"),
                      report_to=["none"], cutoff_len=256, seed=0)
    result = run_training(cfg)
    data = json.loads((Path(result.final_checkpoint) / "finechat_run.json").read_text())["data"]
    assert result.global_step == 2
    assert (data["records"], data["train_rows"], data["skipped_records"], data["no_room"]) == (total, total, 0, 0)
