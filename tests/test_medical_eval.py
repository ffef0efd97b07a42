"""Medical evaluation: entity exact-match on held-out KG questions, Rouge/BLEU, the per-stage table."""

import json
from pathlib import Path

import pytest

from finechat.errors import DataError
from finechat.medical.evaluate import entity_hit, evaluate_kg, load_kg_questions, medical_table, score_kg
from finechat.medical.kg import KGSettings, generate_pairs, load_graph, write_jsonl

GRAPH = Path(__file__).resolve().parent.parent / "data" / "samples" / "medical" / "graph.json"


def test_entity_hit():
    assert entity_hit("偏头痛属于神经内科，建议就诊。", ["神经内科"])
    assert entity_hit("See a doctor in neurology .", ["Neurology"])
    assert not entity_hit("建议挂心血管内科。", ["神经内科"])
    assert entity_hit("常用药物有布洛芬。", ["佐米曲普坦", "布洛芬"])
    assert not entity_hit("", ["布洛芬"])


def test_score_kg_per_relation():
    rows = [
        {"output": "建议挂神经内科。", "answers": ["神经内科"], "relation": "department"},
        {"output": "建议挂眼科。", "answers": ["眼科"], "relation": "department"},
        {"output": "可能是痛风。", "answers": ["痛风"], "relation": "symptom_disease"},
    ]
    scores = score_kg(["建议挂神经内科。", "建议挂皮肤科。", ""], rows)
    assert scores["accuracy"] == pytest.approx(100 / 3)
    assert scores["acc-dept"] == 50.0 and scores["acc-disease"] == 0.0
    assert scores["n"] == 3 and scores["empty_predictions"] == 1 and scores["rouge-l"] > 0
    table = medical_table({"base": {"kg": score_kg(["", "", ""], rows), "general": {"rouge-l": 20.0, "bleu-4": 5.0}},
                           "stage2": {"kg": scores}})
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "stage" and "kg-acc" in lines[0] and "general-rouge-l" in lines[0]
    assert lines[2].startswith("| base") and "33.33" in lines[3] and lines[3].rstrip().endswith("|")


def test_load_questions_errors(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="q.jsonl:1: missing field 'answers'"):
        load_kg_questions(path)
    path.write_text("{bad\n", encoding="utf-8")
    with pytest.raises(DataError, match="q.jsonl:1: invalid JSON"):
        load_kg_questions(path)
    path.write_text("\n5\n", encoding="utf-8")  # JSON, but not a question (was a TypeError)
    with pytest.raises(DataError, match="q.jsonl:2: expected an object"):
        load_kg_questions(path)


def test_evaluate_on_a_tiny_model(tiny_bot, tmp_path):
    _, held = generate_pairs(load_graph(GRAPH), KGSettings(seed=2, holdout=0.1, relations="department"))
    path = tmp_path / "held.jsonl"
    write_jsonl(held[:4], path)
    rows = load_kg_questions(path)
    metrics, records = evaluate_kg(tiny_bot, rows, batch_size=4, max_new_tokens=4, progress=False)
    assert metrics["n"] == 4 and 0 <= metrics["accuracy"] <= 100 and "acc-dept" in metrics
    assert len(records) == 4 and all(r["source"].startswith("graph.json#") for r in records)
    assert all(isinstance(r["correct"], bool) for r in records)


def test_medical_eval_command(tiny_model_dir, tmp_path, capsys):
    from finechat.cli import main

    _, held = generate_pairs(load_graph(GRAPH), KGSettings(seed=2, holdout=0.1, relations="department"))
    write_jsonl(held[:2], tmp_path / "held.jsonl")
    code = main(["medical", "eval", "--model", str(tiny_model_dir), "--questions", str(tmp_path / "held.jsonl"),
                 "--max-new-tokens", "3", "--out", str(tmp_path / "eval")])
    assert code == 0
    assert "kg-acc" in capsys.readouterr().out
    assert len((tmp_path / "eval" / "kg_predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert main(["medical", "eval", "--model", str(tiny_model_dir), "--questions", str(tmp_path / "nope.jsonl")]) != 0
    assert "nope.jsonl: no such file" in capsys.readouterr().err


def test_medical_eval_takes_the_options_every_command_takes(tiny_model_dir, tmp_path, capsys):
    """--output-dir, key=value, --dtype / --device / --quantization-bit, as in finechat eval (--out still works)."""
    from finechat.cli import main

    _, held = generate_pairs(load_graph(GRAPH), KGSettings(seed=2, holdout=0.1, relations="department"))
    write_jsonl(held[:3], tmp_path / "held.jsonl")
    code = main(["medical", "eval", "--model", str(tiny_model_dir), "--questions", str(tmp_path / "held.jsonl"),
                 "--dtype", "float32", "--device", "cpu", "--output-dir", str(tmp_path / "eval"),
                 "max_new_tokens=2", "max_questions=2", "batch_size=1"])
    assert code == 0 and "kg-acc" in capsys.readouterr().out
    assert len((tmp_path / "eval" / "kg_predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert main(["medical", "eval", "--model", str(tiny_model_dir), "--quantization-bit", "3"]) == 2
    assert "quantization_bit must be 4 or 8" in capsys.readouterr().err
    assert main(["medical", "eval", "--model", str(tiny_model_dir), "batch_size=0"]) == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err
