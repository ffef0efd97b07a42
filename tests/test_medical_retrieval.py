"""Disease-table retrieval (ChatDoctor's autonomous mode), cited sources and the not-medical-advice notice."""

import subprocess
import sys
from pathlib import Path

import pytest

from finechat.errors import DataError
from finechat.medical.retrieval import NOTICE, DiseaseTable, MedicalAssistant, retrieval_prompt, with_notice

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples" / "medical"


@pytest.fixture(scope="module")
def table():
    return DiseaseTable.load(SAMPLES / "diseases.csv")


@pytest.mark.parametrize("query, disease", [
    ("我这几天尿频、尿急，小便还痛", "尿路感染"),
    ("最近怕热、多汗、手抖，人也消瘦了", "甲状腺功能亢进症"),
    ("偏头痛吃什么药", "偏头痛"),
    ("Which department treats gout?", "痛风"),
    ("膝盖疼，上下楼梯困难，关节弹响", "膝骨关节炎"),
])
def test_search_finds_the_matching_record(table, query, disease):
    hits = table.search(query, k=3)
    assert hits and hits[0][1].name == disease
    assert hits[0][1].source.startswith("diseases.csv row ")


def test_graph_file_works_as_the_table():
    graph_table = DiseaseTable.load(SAMPLES / "graph.json")
    hit = graph_table.search("一侧搏动性头痛，恶心，畏光", k=1)[0][1]
    assert hit.name == "偏头痛" and hit.source == "graph.json#1" and hit.fields["department"] == "神经内科"


def test_unrelated_query_retrieves_nothing(table):
    assert table.search("the of and", k=3) == []
    assert retrieval_prompt("hello", []) == "hello"


def test_bad_tables(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("name,symptoms\n感冒,鼻塞\n", encoding="utf-8")
    with pytest.raises(DataError, match="t.csv:1: the header needs a 'disease' column"):
        DiseaseTable.load(path)
    path.write_text("disease,symptoms\n感冒,鼻塞\n,咳嗽\n", encoding="utf-8")
    with pytest.raises(DataError, match="t.csv:3: field 'disease' is empty"):
        DiseaseTable.load(path)
    with pytest.raises(DataError, match="no such disease table"):
        DiseaseTable.load(tmp_path / "missing.csv")


class ScriptedDoctor:
    """A model double: answers with a fixed text and remembers the prompts it was given."""

    def __init__(self, answer="建议到泌尿外科就诊 [1]。"):
        self.answer = answer
        self.queries = []
        self.tokenizer = "tok"

    def stream_chat(self, query, history=None, system=None, **gen):
        self.queries.append(query)
        for n in range(1, len(self.answer) + 1):
            yield self.answer[:n], list(history or []) + [(query, self.answer[:n])]

    def stream_text(self, messages, tools=None, **gen):
        self.queries.append(messages[-1]["content"])
        yield self.answer


def test_assistant_injects_records_and_cites_sources(table):
    doctor = ScriptedDoctor()
    bot = MedicalAssistant(doctor, table, k=2)
    response, history = bot.chat("我尿频、尿急、尿痛", [])
    assert "尿路感染" in doctor.queries[0] and "diseases.csv row" in doctor.queries[0]
    assert response.startswith(doctor.answer)
    assert "[1] 尿路感染 (diseases.csv row" in response and response.endswith(NOTICE)
    assert history == [("我尿频、尿急、尿痛", doctor.answer)]  # sources and notice are not fed back
    assert bot.tokenizer == "tok"  # everything else is the wrapped model's
    text = bot.chat_messages([{"role": "user", "content": "偏头痛吃什么药"}])
    assert "偏头痛" in doctor.queries[-1] and "[1] 偏头痛" in text and text.endswith(NOTICE)


def test_notice_without_retrieval_and_on_a_real_model(tiny_bot):
    assert with_notice("答案") == f"答案\n\n{NOTICE}" and with_notice(with_notice("x")) == with_notice("x")
    assert with_notice("") == NOTICE
    response, history = MedicalAssistant(tiny_bot).chat("头痛怎么办", [], max_new_tokens=4, greedy=True)
    assert response.endswith(NOTICE) and NOTICE not in history[0][1]


def test_assistant_reads_the_engine_through_and_forwards_nothing_else(tiny_bot):
    bot = MedicalAssistant(tiny_bot)
    assert bot.model is tiny_bot.model and bot.tokenizer is tiny_bot.tokenizer and bot.template is tiny_bot.template
    assert bot.encode_prompt("你好") == tiny_bot.encode_prompt("你好")
    assert bot.stop_token_ids() == tiny_bot.stop_token_ids() and bot._lock is tiny_bot._lock
    with pytest.raises(AttributeError):
        bot.not_an_engine_attribute  # noqa: B018  (no catch-all proxy)
    bot.note = "set on the assistant"
    assert not hasattr(tiny_bot, "note")


def test_chat_command_medical_with_knowledge(tiny_model_dir):
    cmd = [sys.executable, "-m", "finechat.cli", "chat", "--model", str(tiny_model_dir), "--greedy",
           "--max-new-tokens", "4", "--knowledge", str(SAMPLES / "diseases.csv")]
    result = subprocess.run(cmd, input="最近尿频尿急尿痛\n", capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "尿路感染 (diseases.csv row" in result.stdout and result.stdout.count(NOTICE) == 1
    bad = subprocess.run(cmd[:-1] + [str(SAMPLES / "nope.csv")], input="x\n", capture_output=True, text=True,
                         timeout=180)
    assert bad.returncode != 0 and "nope.csv" in bad.stderr and "Traceback" not in bad.stderr


def test_server_answers_carry_sources_and_notice(tiny_bot, table):
    import httpx
    from serve_helpers import LiveServer

    from finechat.serve.api import ServeSettings, create_app

    # one record: the tiny model's context is short
    srv = LiveServer(create_app(MedicalAssistant(tiny_bot, table, k=1), ServeSettings(model_name="tiny")))
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "我尿频、尿急、尿痛"}], "max_tokens": 4,
                "temperature": 0}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert "[1] 尿路感染 (diseases.csv row" in text and text.endswith(NOTICE)
        r = httpx.post(srv.url + "/", json={"prompt": "hello", "history": [], "temperature": 0}, timeout=120)
        assert r.status_code == 200 and r.json()["response"].endswith(NOTICE)
    finally:
        srv.stop()
