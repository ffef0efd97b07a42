"""finechat quickstart end to end on a tiny model: data, before/after scores, adapter, table, chat command."""

import json

from finechat.cli import main as cli


def test_quickstart_runs_and_reports(tiny_model_dir, tmp_path, capsys):
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
    assert (out / "before" / "generated_predictions.jsonl").is_file()
    assert (out / "after" / "metrics.json").is_file()
    assert report["after"]["eval_loss"] < report["before"]["eval_loss"]  # it learned something
    # The printed chat command works: the adapter loads on the base.
    import finechat

    bot = finechat.load(str(tiny_model_dir), adapter=adapter)
    assert isinstance(bot.chat("类型#裤*颜色#白色", [], greedy=True, max_new_tokens=4)[0], str)
