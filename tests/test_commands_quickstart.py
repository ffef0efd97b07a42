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


def test_quickstart_tools_runs_and_reports(tmp_path, capsys):
    import py_compile

    from finechat.data.formats import read_conversations

    tiny_model_dir = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "qs-tools"
    code = cli(["quickstart", "--task", "tools", "--model", str(tiny_model_dir), "--output-dir", str(out),
                "--max-steps", "1", "--batch-size", "2", "--train-examples", "6", "--eval-examples", "3",
                "--max-new-tokens", "4"])
    assert code == 0
    shown = capsys.readouterr().out
    assert "| all held-out questions" in shown and "| after LoRA (1 steps)" in shown and "look-ups (Search)" in shown
    assert "--- example 1" in shown and "expected " in shown
    report = json.loads((out / "quickstart.json").read_text())
    adapter = report["adapter"]
    assert (out / "lora").exists() and adapter.startswith(str(out / "lora"))
    assert f"finechat chat --model {tiny_model_dir} --adapter {adapter} --greedy --tools calculator\n" in shown
    assert f"finechat serve --model {tiny_model_dir} --adapter {adapter} --tools calculator,solver,search " \
           f"--docs {out / 'docs'}" in shown
    for stage in ("before", "after"):
        assert report[stage]["n"] == 3 and 0 <= report[stage]["accuracy"] <= 1
        rows = [json.loads(line) for line in (out / stage / "answers.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all("reason" in row for row in rows)
    # what it trained on reads back with finechat's readers; the held-out questions are written beside it
    assert len(read_conversations(out / "data" / "tools_train.jsonl").conversations) == 6
    assert read_conversations(out / "data" / "tools_train_moss.jsonl").format == "moss"
    assert len((out / "data" / "tools_heldout.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in (out / "docs").iterdir()) == ["places.md", "town.md", "transport.md"]
    py_compile.compile(str(out / "openai_tools.py"), doraise=True)
    # the client example offers Calculate exactly as the model was trained to see it
    import ast


    module = ast.parse((out / "openai_tools.py").read_text())
    tools = next(node.value for node in module.body if isinstance(node, ast.Assign) and node.targets[0].id == "tools")
    # the client offers every tool the model was trained with (not only Calculate) and runs them with finechat's own
    assert ast.unparse(tools) == "registry.openai_schemas()"
    from finechat.tools.demo_data import demo_registry

    offered = [t["function"]["name"] for t in demo_registry(out / "docs").openai_schemas()]
    assert offered == ["Calculate", "Solve", "Search"]
    assert "registry.call(call.function.name" in (out / "openai_tools.py").read_text()
