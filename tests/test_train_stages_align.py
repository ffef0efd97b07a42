"""A `stages:` file running SFT -> reward model -> GRPO -> DPO on a tiny model, with the alignment table."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from finechat.train.stages import main_stages

ROOT = Path(__file__).resolve().parent.parent


def test_chatgpt_pipeline_recipe_runs_every_stage_and_prints_one_table(tiny_model_dir, tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "recipes" / "chatgpt-pipeline.yaml").read_text(encoding="utf-8"))
    cfg.update(model=str(tiny_model_dir), output_dir=str(tmp_path / "pipe"))
    for stage in cfg["stages"]:
        stage["max_steps"] = 1
        for key in ("data",):
            stage[key] = [str(ROOT / p) for p in stage[key]]
    cfg["defaults"].update(save_steps=1, cutoff_len=64)
    cfg["eval_general"].update(data=str(ROOT / cfg["eval_general"]["data"]), max_samples=2, max_new_tokens=4)
    cfg["eval_alignment"].update(pairs=str(ROOT / cfg["eval_alignment"]["pairs"]),
                                 rm_pairs=str(ROOT / cfg["eval_alignment"]["rm_pairs"]),
                                 prompts=str(ROOT / cfg["eval_alignment"]["prompts"]), max_samples=4,
                                 max_new_tokens=4)
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main_stages(str(path), []) == 0
    table = capsys.readouterr().out
    for column in ("pref acc", "reward margin", "rm acc", "rm score", "correct", "general rouge-l"):
        assert column in table
    assert "| base (before)" in table and "| 3. grpo" in table and "| 4. dpo" in table
    state = json.loads((tmp_path / "pipe" / "stages_state.json").read_text())
    assert state["alignment_before"]["preference accuracy"] == 0.5  # the base against itself: chance
    rm = state["stages"]["reward-model"]
    assert rm["next_model"] == state["stages"]["sft"]["next_model"]  # the reward model does not continue the chain
    assert state["reward_model"] == rm["checkpoint"] and "rm accuracy" in rm["alignment"]
    assert rm["alignment"]["pairs"] == 512  # the reward model on all of its larger held-out set, not max_samples
    assert "rm score" in state["stages"]["grpo"]["alignment"]
