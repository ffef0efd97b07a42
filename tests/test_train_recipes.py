"""The recipes in recipes/: every one resolves and points at bundled data; one trains the default model and chats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import greedy_by_generate, train_log_losses
from side_by_side import beside

from finechat.config import resolve_config
from finechat.train.train_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["alpaca-lora", "adgen-ptuning", "adgen-lora", "adgen-full"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_and_its_data_is_bundled(name):
    cfg = resolve_config(TrainConfig, ROOT / "recipes" / f"{name}.yaml")
    assert cfg.model == "default"
    for path in cfg.data + ([cfg.val_file] if cfg.val_file else []):
        assert (ROOT / path).is_file(), path
    assert cfg.datasets and not cfg.commercial
    assert cfg.max_steps > 0 and cfg.save_steps <= cfg.max_steps


@pytest.mark.slow
def test_adgen_lora_recipe_trains_the_default_model_and_its_checkpoint_chats(tmp_path):
    out = tmp_path / "adgen-lora"
    # the recipe's own validation file, cut to its first 8 rows (one eval batch): the run evaluates as the recipe
    # does, without the 40 rows' 5 batches of the default model (most of the test's time)
    recipe_val = resolve_config(TrainConfig, ROOT / "recipes" / "adgen-lora.yaml").val_file
    val = tmp_path / "adgen_dev_8.jsonl"
    val.write_text("".join((ROOT / recipe_val).read_text(encoding="utf-8").splitlines(keepends=True)[:8]),
                   encoding="utf-8")
    train = subprocess.run(
        [sys.executable, "-m", "finechat", "train", "recipes/adgen-lora.yaml", "max_steps=3", "save_steps=3",
         "eval_steps=3", f"val_file={val}", f"output_dir={out}", "report_to=[none]"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    # the chat command runs beside the in-process reference below (two cores)
    with beside([sys.executable, "-m", "finechat", "chat", "--adapter", str(out / "checkpoint-3"), "--greedy",
                 "max_new_tokens=16"], stdin=True, cwd=ROOT) as (chat,):
        chat.stdin.write("类型#上衣*颜色#白色*风格#简约\n")
        chat.stdin.flush()  # the question goes now; communicate() below closes stdin, which ends the chat
        losses = train_log_losses(out)
        assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
        assert any("eval_loss" in json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines())
        # the command's answer is the trained adapter's greedy answer, computed here through transformers' generate
        import finechat

        bot = finechat.load("default", adapter=str(out / "checkpoint-3"))
        expected = greedy_by_generate(bot, "类型#上衣*颜色#白色*风格#简约", 16)
        chat_out, chat_err = chat.communicate(timeout=600)
    assert chat.returncode == 0, chat_err[-3000:]
    assert expected and chat_out.strip() == expected
