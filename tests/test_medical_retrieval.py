"""Disease-table retrieval (ChatDoctor's autonomous mode), cited sources and the not-medical-advice notice."""

import sys
from pathlib import Path

import pytest
from scripted import ScriptedChat
from side_by_side import beside

from finechat.errors import DataError
from finechat.generate.contract import ChatEngine, TurnHook
from finechat.generate.engine import ChatModel
from finechat.medical.retrieval import (
    NOTICE,
    DiseaseTable,
    MedicalHook,
    attach_medical,
    retrieval_prompt,
    with_notice,
)

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


ANSWER = "建议到泌尿外科就诊 [1]。"


def fresh_engine(tiny_bot):
    """An engine of its own over the tiny model (hooks go on it, not on the shared fixture)."""
    return ChatModel(tiny_bot.model, tiny_bot.tokenizer, tiny_bot.template)


def test_hook_injects_records_and_cites_sources(tiny_bot, table):
    doctor = ScriptedChat(tiny_bot.tokenizer, ANSWER, prompts_as="text")  # a fixed answer, prompts recorded
    bot = attach_medical(doctor, table, k=2)
    response, history = bot.chat("我尿频、尿急、尿痛", [])
    assert "尿路感染" in doctor.prompts[0] and "diseases.csv row" in doctor.prompts[0]
    assert response.startswith(ANSWER)
    assert "[1] 尿路感染 (diseases.csv row" in response and response.endswith(NOTICE)
    assert history == [("我尿频、尿急、尿痛", ANSWER)]  # sources and notice are not fed back
    partials = list(bot.stream_chat("我尿频、尿急、尿痛", []))
    assert partials[-1][0] == response and partials[-2][0] == ANSWER and partials[-1][1] == history
    text = bot.chat_messages([{"role": "user", "content": "偏头痛吃什么药"}])
    assert "偏头痛" in doctor.prompts[-1] and "[1] 偏头痛" in text and text.endswith(NOTICE)


def test_notice_without_retrieval_and_on_a_real_model(tiny_bot):
    assert with_notice("答案") == f"答案\n\n{NOTICE}" and with_notice(with_notice("x")) == with_notice("x")
    assert with_notice("") == NOTICE
    response, history = attach_medical(fresh_engine(tiny_bot)).chat("头痛怎么办", [], max_new_tokens=4, greedy=True)
    assert response.endswith(NOTICE) and NOTICE not in history[0][1]


def test_medical_demo_is_a_hook_on_the_engine_not_a_proxy(tiny_bot, table):
    engine = fresh_engine(tiny_bot)
    messages = [{"role": "user", "content": "偏头痛吃什么药"}]
    plain = engine.build_prompt(messages)
    assert attach_medical(engine, table, k=1) is engine  # the same engine: its lock, model, decoder and all
    assert isinstance(engine, ChatEngine) and isinstance(engine.hooks[0], MedicalHook)
    assert isinstance(engine.hooks[0], TurnHook)
    prompt = engine.build_prompt(messages)
    assert "[1] 偏头痛" in prompt and "[1] 偏头痛" not in plain
    assert messages == [{"role": "user", "content": "偏头痛吃什么药"}]  # the caller's messages are not changed
    assert tiny_bot.hooks == []


def test_chat_command_medical_with_knowledge(tiny_model_dir):
    cmd = [sys.executable, "-m", "finechat.cli", "chat", "--model", str(tiny_model_dir), "--greedy",
           "--max-new-tokens", "4", "--knowledge", str(SAMPLES / "diseases.csv")]
    # the good and the bad command run side by side (two cores)
    with beside(cmd, cmd[:-1] + [str(SAMPLES / "nope.csv")], stdin=True) as runs:
        (out, err), (_, bad_err) = (proc.communicate(text, timeout=180)
                                    for proc, text in zip(runs, ("最近尿频尿急尿痛\n", "x\n")))
    assert runs[0].returncode == 0, err
    assert "尿路感染 (diseases.csv row" in out and out.count(NOTICE) == 1
    assert runs[1].returncode != 0 and "nope.csv" in bad_err and "Traceback" not in bad_err


def test_server_answers_carry_sources_and_notice(tiny_bot, table):
    import httpx
    from serve_helpers import LiveServer

    from finechat.serve.api import ServeSettings, create_app

    # one record: the tiny model's context is short
    srv = LiveServer(create_app(attach_medical(fresh_engine(tiny_bot), table, k=1), ServeSettings(model_name="tiny")))
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
