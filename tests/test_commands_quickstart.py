"""finechat quickstart end to end on a tiny model: data, before/after scores, adapter, table, chat command."""

import json
import math

import pytest
from eval_helpers import greedy_by_generate
from tiny import save_tiny_model

from finechat.cli import main as cli


def test_quickstart_runs_and_reports(tmp_path, capsys):
    # a wide initialisation: the default one's greedy answers are empty, and every score would be 0 either way
    tiny_model_dir = save_tiny_model(tmp_path / "tiny", initializer_range=0.3)
    out = tmp_path / "qs"
    code = cli(["quickstart", "--model", str(tiny_model_dir), "--output-dir", str(out), "--max-steps", "3",
                "--batch-size", "2", "--train-examples", "8", "--eval-examples", "2", "--max-new-tokens", "8",
                "--learning-rate", "1e-2"])
    assert code == 0
    shown = capsys.readouterr().out
    assert "| before (untuned)" in shown and "| after LoRA (3 steps)" in shown and "bleu-4" in shown
    assert "example 1" in shown and "reference:" in shown
    report = json.loads((out / "quickstart.json").read_text())
    adapter = report["adapter"]
    assert f"finechat chat --model {tiny_model_dir} --adapter {adapter}" in shown
    assert report["after"]["eval_loss"] < report["before"]["eval_loss"]  # it learned something
    for stage in ("before", "after"):
        scores = report[stage]
        assert json.loads((out / stage / "metrics.json").read_text())["eval_loss"] == scores["eval_loss"]
        assert scores["n"] == 2 and scores["empty_predictions"] == 0
        assert all(0 <= scores[name] <= 100 for name in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"))
        assert scores["perplexity"] == pytest.approx(math.exp(scores["eval_loss"]))
    import finechat

    # the "before" predictions are the base model's greedy answers to the evaluation prompts
    base = finechat.load(str(tiny_model_dir))
    rows = [json.loads(line) for line in (out / "before" / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["label"] for row in rows)
    for row in rows:
        assert row["predict"] == greedy_by_generate(base, row["prompt"], 8)
    # The printed chat command works: the adapter loads on the base and answers greedily as generate does.
    bot = finechat.load(str(tiny_model_dir), adapter=adapter)
    answer, _ = bot.chat("类型#裤*颜色#白色", [], greedy=True, max_new_tokens=8)
    assert answer and answer == greedy_by_generate(bot, "类型#裤*颜色#白色", 8)
