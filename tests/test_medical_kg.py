"""Knowledge graph -> QA pairs (finechat.medical.kg, `finechat data from-kg`): sample graph, determinism, hold-out, errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from finechat.errors import DataError
from finechat.medical.kg import KGSettings, generate_pairs, load_graph, write_disease_table

ROOT = Path(__file__).resolve().parent.parent
GRAPH = ROOT / "data" / "samples" / "medical" / "graph.json"


def test_sample_graph_is_complete():
    graph = load_graph(GRAPH)
    assert 40 <= len(graph.records) <= 80
    for r in graph.records:
        assert r.departments and r.symptoms and r.sites, r.name
        assert r.departments[0] in graph.departments_en, r.departments[0]
    migraine = next(r for r in graph.records if r.name == "偏头痛")
    assert migraine.departments == ["神经内科"] and "布洛芬" in migraine.drugs


def test_pairs_are_varied_deterministic_and_keep_their_record():
    graph = load_graph(GRAPH)
    train, held = generate_pairs(graph, KGSettings(seed=7))
    again, _ = generate_pairs(graph, KGSettings(seed=7))
    other, _ = generate_pairs(graph, KGSettings(seed=8))
    assert train == again and train != other and held == []
    assert {p["relation"] for p in train} == {"department", "department_en", "symptom_disease", "drug", "site",
                                              "complication", "test", "symptom"}
    assert {p["lang"] for p in train} == {"zh", "en"}
    dept = [p for p in train if p["relation"] == "department"]
    assert len({p["instruction"].replace(p["source"]["中心词"], "X") for p in dept}) >= 5  # varied phrasings
    for p in train:
        record = graph.records[p["source"]["record"] - 1]
        assert p["source"]["data"] == record.raw and p["source"]["中心词"] == record.name
        assert any(a in p["output"] for a in p["answers"]), p  # the reference names a gold entity
    # symptom -> disease: the asked symptoms belong to the disease named in the answer
    for p in (p for p in train if p["relation"] == "symptom_disease"):
        assert p["source"]["中心词"] in p["answers"]


def test_holdout_by_question_keeps_the_fact_taught():
    graph = load_graph(GRAPH)
    train, held = generate_pairs(graph, KGSettings(seed=1, holdout=0.3, relations="department,drug"))
    assert held and {p["relation"] for p in held} <= {"department", "drug"}
    train_questions = {p["instruction"] for p in train}
    for p in held:
        assert p["instruction"] not in train_questions
        taught = [t for t in train if t["relation"] == p["relation"] and t["source"]["record"] == p["source"]["record"]]
        assert taught, "a held-out question must be about a fact the training file teaches"


def test_holdout_by_disease_separates_diseases():
    graph = load_graph(GRAPH)
    train, held = generate_pairs(graph, KGSettings(seed=1, holdout=0.2, holdout_by="disease"))
    assert held
    assert not {p["source"]["中心词"] for p in train} & {p["source"]["中心词"] for p in held}


def test_cli_writes_pairs_heldout_and_table(tmp_path):
    out = tmp_path / "qa.jsonl"
    table = tmp_path / "diseases.csv"
    cmd = [sys.executable, "-m", "finechat.cli", "data", "from-kg", str(GRAPH), "--out", str(out), "--seed", "3",
           "--holdout", "0.25", "--relations", "department,symptom_disease", "--table", str(table)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    held = [json.loads(line) for line in (tmp_path / "qa.heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows and held and "department" in result.stdout
    assert {"instruction", "input", "output", "answers", "source"} <= set(rows[0])
    with table.open(encoding="utf-8") as f:
        table_rows = list(csv.DictReader(f))
    assert len(table_rows) == len(load_graph(GRAPH).records) and table_rows[0]["disease"] == "偏头痛"


@pytest.mark.parametrize("content, message", [
    ('[{"中心词": "感冒"}, {"所属科室": ["内科"]}]', "#2: missing or empty field '中心词'"),
    ('[{"中心词": "感冒", "相关症状": 3}]', "#1: field '相关症状' must be a list"),
    ('[{"中心词": "感冒"},\n {"中心词": }]', ":2: invalid JSON"),
    ('{"中心词": "a"}\n{"中心词": "a"}\n', "already defined at g.json:1"),
    ('{"name": "x"}', "needs a 'records' list"),
])
def test_bad_graphs_name_the_place(tmp_path, content, message):
    path = tmp_path / "g.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_graph(path)


def test_jsonl_graph_and_string_fields(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"中心词": "感冒", "所属科室": "呼吸内科", "相关症状": "鼻塞、流涕，咽痛"}\n'
                    '{"中心词": "胃炎", "所属科室": ["消化内科"], "相关症状": ["胃痛", "反酸"]}\n', encoding="utf-8")
    graph = load_graph(path)
    assert graph.records[0].symptoms == ["鼻塞", "流涕", "咽痛"] and graph.records[1].source == "g.jsonl:2"
    train, _ = generate_pairs(graph, KGSettings(relations=("department", "drug", "department_en")))
    assert {p["relation"] for p in train} == {"department"}  # no drugs, no English names: nothing made up
    assert write_disease_table(graph, tmp_path / "t.csv") == 2


def test_bad_settings_and_cli_exit_code(tmp_path):
    with pytest.raises(DataError, match="unknown relation"):
        KGSettings(relations="department,colour")
    bad = tmp_path / "bad.json"
    bad.write_text("[1]", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "finechat", "data", "from-kg", str(bad), "--out",
                             str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and "bad.json#1: expected a JSON object" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_one_record_jsonl_graph_is_that_record(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"中心词": "感冒", "所属科室": ["呼吸内科"]}\n', encoding="utf-8")
    assert [r.name for r in load_graph(path).records] == ["感冒"]
    path.write_text('{"中心词": "感冒", "所属科室": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match="field '所属科室' must be a list"):
        load_graph(path)
