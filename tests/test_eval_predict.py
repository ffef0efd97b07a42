"""finechat eval: batched greedy predictions equal chat answers; files; re-scoring; compare."""

import json

import pytest
from eval_helpers import PAIRS, teach_lora, write_alpaca

from finechat.cli import main as cli
from finechat.eval.metrics import compute_metrics


@pytest.fixture(scope="module")
def taught(tiny_model_dir, tmp_path_factory):
    return teach_lora(tiny_model_dir, tmp_path_factory.mktemp("taught") / "lora")


def test_batched_predictions_equal_chat_answers(tiny_model_dir, taught):
    import finechat
    from finechat.eval.predict import generate_answers
    from finechat.generate.engine import GenerationSettings

    bot = finechat.load(str(tiny_model_dir), adapter=str(taught))
    prompts = [[{"role": "user", "content": q}] for q, _ in PAIRS]
    settings = GenerationSettings(greedy=True, max_new_tokens=24)
    one = generate_answers(bot, prompts, settings, batch_size=1, progress=False)
    many = generate_answers(bot, prompts, settings, batch_size=4, progress=False)
    chat = [bot.chat(q, [], greedy=True, max_new_tokens=24)[0] for q, _ in PAIRS]
    assert one == chat
    assert many == chat
    assert chat == [a for _, a in PAIRS]  # the adapter learned them; stops at the end of turn


def test_eval_command_writes_predictions_and_metrics(tiny_model_dir, taught, tmp_path, capsys):
    data = write_alpaca(tmp_path / "dev.jsonl")
    out = tmp_path / "eval"
    code = cli(["eval", "--model", str(tiny_model_dir), "--adapter", str(taught), "--data", str(data),
                "--output-dir", str(out), "--batch-size", "3", "--max-new-tokens", "24"])
    assert code == 0
    records = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == [a for _, a in PAIRS]  # data order kept despite length sorting
    assert set(records[0]) >= {"prompt", "predict", "label"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bleu-4"] == pytest.approx(100, abs=0.01) and metrics["rouge-l"] == pytest.approx(100, abs=0.01)
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"])
    shown = capsys.readouterr().out
    assert "| bleu-4" in shown and "rouge-l" in shown and "example 1" in shown
    # The base model, before tuning: worse on every score, higher loss.
    base_out = tmp_path / "base"
    assert cli(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(base_out),
                "--max-new-tokens", "8"]) == 0
    base = json.loads((base_out / "metrics.json").read_text())
    assert base["bleu-4"] < 10 and base["eval_loss"] > metrics["eval_loss"]


@pytest.mark.parametrize("label_key", ["labels", "label"])
def test_rescoring_chatglm_and_llama_factory_files(tmp_path, capsys, label_key):
    rows = [("这件白色上衣简约大方。", "这件上衣简约大方"), ("", "空"), ("Paris is nice.", "The capital is Paris.")]
    path = tmp_path / "generated_predictions.txt"
    path.write_text("".join(json.dumps({label_key: lab, "predict": p}, ensure_ascii=False) + "\n" for p, lab in rows))
    assert cli(["eval", "--predictions", str(path), "--output-dir", str(tmp_path / "m")]) == 0
    expected = compute_metrics([p for p, _ in rows], [lab for _, lab in rows])
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert saved == expected
    table = capsys.readouterr().out
    assert f"{expected['bleu-4']:.2f}" in table and f"{expected['rouge-l']:.2f}" in table


def test_bad_predictions_file_names_the_line(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"predict": "a", "label": "a"}\n{"predict": "b"}\n')
    assert cli(["eval", "--predictions", str(path)]) == 3
    assert "p.jsonl:2: missing field 'label'" in capsys.readouterr().err
    path.write_text('{"predict": "a", "label": "a"}\nnot json\n')
    assert cli(["eval", "--predictions", str(path)]) == 3
    assert "p.jsonl:2: invalid JSON" in capsys.readouterr().err


def test_compare_before_and_after(tiny_model_dir, taught, tmp_path, capsys):
    data = write_alpaca(tmp_path / "dev.jsonl")
    out = tmp_path / "cmp"
    assert cli(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--compare", "base", str(taught),
                "--output-dir", str(out), "--max-new-tokens", "16", "--no-loss"]) == 0
    shown = capsys.readouterr().out
    header, _, base_row, lora_row = shown.splitlines()[:4]
    assert "bleu-4" in header and base_row.startswith("| base") and lora_row.startswith("| lora")
    report = json.loads((out / "compare.json").read_text())
    assert report["metrics"]["lora"]["bleu-4"] > report["metrics"]["base"]["bleu-4"] + 50
    assert "reference:" in shown and "这件白色上衣简约大方。" in shown
    assert (out / "lora" / "generated_predictions.jsonl").is_file()
    # Predictions files take part without a model.
    assert cli(["eval", "--compare", str(out / "base" / "generated_predictions.jsonl"),
                str(out / "lora" / "generated_predictions.jsonl"), "--output-dir", str(tmp_path / "c2")]) == 0
    assert "| lora" in capsys.readouterr().out


def test_eval_needs_data(capsys):
    assert cli(["eval"]) == 2
    assert "--data" in capsys.readouterr().err


def test_do_predict_at_the_end_of_training(tiny_model_dir, tmp_path):
    from finechat.train.recipe import run_training
    from finechat.train.train_config import TrainConfig

    data = write_alpaca(tmp_path / "train.jsonl")
    cfg = TrainConfig(model=str(tiny_model_dir), method="lora", data=[str(data)], output_dir=str(tmp_path / "run"),
                      max_steps=2, save_steps=2, per_device_train_batch_size=2, cutoff_len=64, report_to=["none"],
                      do_predict=True, predict_file=str(data), max_target_length=8)
    result = run_training(cfg)
    assert result.metrics["predict_n"] == len(PAIRS)
    assert "predict_bleu-4" in result.metrics and "predict_rouge-l" in result.metrics
    lines = (tmp_path / "run" / "generated_predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["label"] for line in lines] == [a for _, a in PAIRS]
