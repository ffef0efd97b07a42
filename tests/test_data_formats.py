"""Readers, writers and bad-input errors of finechat.data.formats, on the sample files in data/samples."""

import json
from pathlib import Path

import pytest

from finechat.cli import main as cli_main
from finechat.data.conversation import Conversation, Turn
from finechat.data.formats import FORMATS, WRITERS, read_conversations, write_conversations
from finechat.errors import DataError

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
# sample file -> (format it must be read as, explicit format or "auto", turns per conversation)
EXPECTED = {
    "alpaca.json": ("alpaca", "auto", [2, 2, 2, 2]),
    "chatglm_tuning.jsonl": ("chatglm-tuning", "auto", [2, 2, 2]),
    "adgen.json": ("prompt-response", "auto", [2, 2, 2]),
    "prompt_response_history.jsonl": ("prompt-response", "auto", [4, 2]),
    "dolly.jsonl": ("dolly", "auto", [2, 2, 2]),
    "sharegpt.json": ("sharegpt", "auto", [4, 2]),
    "sharegpt_tools.json": ("sharegpt", "auto", [4, 4]),
    "openai.jsonl": ("openai", "auto", [2, 4]),
    "moss.jsonl": ("moss", "auto", [4, 4]),
    "moss_plugin.jsonl": ("moss", "auto", None),  # the tools engineer's sample: only its format is fixed here
    "chatdoctor.json": ("chatdoctor", "auto", [2, 2]),
    "huatuo.json": ("huatuo", "huatuo", [2, 2]),
}


def turns_of(conv):
    return conv.system, [(t.role, t.content) for t in conv.turns]


def test_every_format_has_a_sample():
    assert {fmt for fmt, _, _ in EXPECTED.values()} == set(FORMATS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_reads_with_expected_format(name):
    fmt, given, turns = EXPECTED[name]
    result = read_conversations(SAMPLES / name, format=given)
    assert result.format == fmt
    if turns is not None:
        assert [len(c.turns) for c in result.conversations] == turns
    assert not result.skipped
    for conv in result.conversations:
        assert conv.source == str(SAMPLES / name) and conv.line >= 1
        assert conv.turns[0].role == "user" and conv.turns[-1].role == "assistant"
        msgs = conv.messages()
        assert msgs[0]["role"] == ("system" if conv.system else "user")


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("writer", WRITERS)
def test_round_trip_keeps_every_turn(name, writer, tmp_path):
    _, given, _ = EXPECTED[name]
    convs = read_conversations(SAMPLES / name, format=given).conversations
    out = tmp_path / f"out.{writer}.jsonl"
    has_tools = any(t.role == "tool" for c in convs for t in c.turns)
    if writer == "alpaca" and has_tools:
        with_tools = [c for c in convs if any(t.role == "tool" for t in c.turns)]
        where = f"{name}:{with_tools[0].line}"
        with pytest.raises(DataError, match=rf"{where}: \(turns\): the alpaca format cannot hold tool turns"):
            write_conversations(convs, out, writer)
        skipped = []
        assert write_conversations(convs, out, writer, skipped=skipped) == len(convs) - len(with_tools)
        assert [s[1] for s in skipped] == [c.line for c in with_tools]
        convs = [c for c in convs if c not in with_tools]
        if not convs:
            return
    else:
        assert write_conversations(convs, out, writer) == len(convs)
    back = read_conversations(out).conversations
    assert back[0].meta["format"] == writer
    assert [turns_of(c) for c in back] == [turns_of(c) for c in convs]
    # A second generation writes the same bytes (nothing drifts).
    again = tmp_path / "again.jsonl"
    write_conversations(back, again, writer)
    assert again.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")


def test_alpaca_empty_input_adds_no_input_block():
    from finechat.data.templates import get_template

    convs = read_conversations(SAMPLES / "alpaca.json").conversations
    # Rendered with the alpaca template, a record with an input reads as Stanford Alpaca's prompt.
    assert get_template("alpaca").render(convs[1].messages()[:1]).endswith(
        "### Instruction:\nTranslate the sentence into Chinese.\n\n### Input:\nThe weather is nice today."
        "\n\n### Response:\n")
    assert convs[0].turns[0].content == "Give three tips for staying healthy."
    assert convs[1].turns[0].content == "Translate the sentence into Chinese.\n\n### Input:\nThe weather is nice today."
    assert convs[1].turns[1].content == "今天天气很好。"


def test_chatglm_tuning_old_and_new_layouts():
    convs = read_conversations(SAMPLES / "chatglm_tuning.jsonl").conversations
    assert turns_of(convs[0])[1] == [("user", "Name the largest planet in the solar system."),
                                     ("assistant", "Jupiter is the largest planet in the solar system.")]
    assert turns_of(convs[1])[1] == [("user", "Instruction: 写一个关于春天的短句。\nAnswer: "),
                                     ("assistant", "春风吹过，柳枝发芽，万物复苏。")]


def test_prompt_response_columns_and_history(tmp_path):
    convs = read_conversations(SAMPLES / "prompt_response_history.jsonl", history_column="history").conversations
    assert turns_of(convs[0])[1] == [("user", "法国在哪个洲？"), ("assistant", "法国位于欧洲西部。"),
                                     ("user", "那它的首都是哪里？"), ("assistant", "法国的首都是巴黎。")]
    f = tmp_path / "cols.jsonl"
    f.write_text(json.dumps({"q": "1+1?", "a": "2", "h": [["hi", "hello"]]}) + "\n", encoding="utf-8")
    convs = read_conversations(f, prompt_column="q", response_column="a", history_column="h").conversations
    assert [t.content for t in convs[0].turns] == ["hi", "hello", "1+1?", "2"]
    with pytest.raises(DataError, match=r"cols\.jsonl:1: h\[0\]: expected a \[query, response\] pair"):
        f.write_text(json.dumps({"q": "x", "a": "y", "h": [["only one"]]}) + "\n", encoding="utf-8")
        read_conversations(f, prompt_column="q", response_column="a", history_column="h")


def test_dolly_context_and_category(tmp_path):
    convs = read_conversations(SAMPLES / "dolly.jsonl").conversations
    assert convs[1].turns[0].content.startswith("Summarise the paragraph in one sentence.\n\nInput:\nTea is grown")
    assert convs[1].meta["category"] == "summarization"
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "context": "", "response": "b", "category": "poetry"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: category: 'poetry' is not one of open_qa"):
        read_conversations(bad)


MOSS_PLUGIN_RECORD = {
    "conversation_id": 7, "meta_instruction": "You are MOSS.\n- Calculator: enabled. API: Calculate(expression)\n",
    "num_turns": 1, "category": "tool",
    "chat": {"turn_1": {
        "Human": "<|Human|>: 12 乘以 34 等于多少？<eoh>\n",
        "Inner Thoughts": "<|Inner Thoughts|>: 这是一道乘法题，我需要使用计算器。<eot>\n",
        "Commands": '<|Commands|>: Calculate("12*34")<eoc>\n',
        "Tool Responses": '<|Results|>: Calculate("12*34") => 408<eor>\n',
        "MOSS": "<|MOSS|>: 12 乘以 34 等于 408。<eom>\n"}},
}


def test_moss_plugin_turns_split_into_action_tool_answer(tmp_path):
    f = tmp_path / "plugin.jsonl"
    f.write_text(json.dumps(MOSS_PLUGIN_RECORD, ensure_ascii=False) + "\n", encoding="utf-8")
    conv = read_conversations(f).conversations[0]
    assert conv.system == "You are MOSS.\n- Calculator: enabled. API: Calculate(expression)\n"
    assert turns_of(conv)[1] == [
        ("user", "12 乘以 34 等于多少？"),
        ("assistant", '<|Inner Thoughts|>: 这是一道乘法题，我需要使用计算器。<eot>\n<|Commands|>: Calculate("12*34")<eoc>'),
        ("tool", 'Calculate("12*34") => 408'),
        ("assistant", "12 乘以 34 等于 408。"),
    ]
    assert conv.meta["conversation_id"] == 7
    # "None" slots add no turns.
    plain = read_conversations(SAMPLES / "moss.jsonl").conversations[0]
    assert [t.role for t in plain.turns] == ["user", "assistant", "user", "assistant"]
    # Every sample plugin conversation has its tool results in tool turns.
    plugin = read_conversations(SAMPLES / "moss_plugin.jsonl").conversations
    assert plugin and all(any(t.role == "tool" for t in c.turns) for c in plugin)


def test_moss_single_pretty_printed_object(tmp_path):
    f = tmp_path / "conversation_7.json"
    f.write_text(json.dumps(MOSS_PLUGIN_RECORD, ensure_ascii=False, indent=4), encoding="utf-8")
    convs = read_conversations(f).conversations
    assert len(convs) == 1 and len(convs[0].turns) == 4


def test_folder_of_conversation_files(tmp_path):
    for i in (2, 1):
        rec = {**MOSS_PLUGIN_RECORD, "conversation_id": i}
        (tmp_path / f"conversation_{i}.json").write_text(json.dumps(rec, ensure_ascii=False, indent=2))
    convs = read_conversations(tmp_path).conversations
    assert [c.meta["conversation_id"] for c in convs] == [1, 2]
    with pytest.raises(DataError, match="no data files"):
        read_conversations(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)


def test_chatdoctor_instruction_is_system_text():
    conv = read_conversations(SAMPLES / "chatdoctor.json").conversations[0]
    assert conv.system.startswith("If you are a doctor")
    assert conv.turns[0].content.startswith("Doctor, I have had a sore throat")


def test_json_array_records_know_their_lines():
    assert [c.line for c in read_conversations(SAMPLES / "alpaca.json").conversations] == [2, 7, 12, 17]


# --- bad input ---------------------------------------------------------------------------------------------
BAD = {
    "malformed.jsonl": r"malformed\.jsonl:2: \(json\): malformed JSON",
    "malformed_array.json": r"malformed_array\.json:4: \(json\): malformed JSON",
    "missing_field.jsonl": r"missing_field\.jsonl:2: output: missing field",
    "mistyped_field.jsonl": r"mistyped_field\.jsonl:2: instruction: expected text, got list",
    "empty_answer.jsonl": r"empty_answer\.jsonl:2: turns\[1\]: empty answer",
    "ends_on_user.jsonl": r"ends_on_user\.jsonl:2: \(turns\): the conversation ends on a user turn",
    "wrong_encoding.jsonl": r"wrong_encoding\.jsonl:2: \(encoding\): not UTF-8 text",
    "unknown_role.json": r"unknown_role\.json:2: conversations\[1\]\.from: unknown role 'robot'",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_error_names_file_line_field(name):
    with pytest.raises(DataError, match=BAD[name]):
        read_conversations(SAMPLES / "bad" / name)


@pytest.mark.parametrize("name", sorted(set(BAD) - {"malformed_array.json"}))
def test_bad_records_skipped_and_listed(name):
    result = read_conversations(SAMPLES / "bad" / name, on_bad_record="skip")
    good = {"malformed.jsonl": 2, "unknown_role.json": 0}.get(name, 1)
    assert len(result.conversations) == good
    assert len(result.skipped) == 1
    path, line, field, reason = result.skipped[0]
    assert path.endswith(name) and line >= 2 and field and reason
    assert name in result.skipped_table()


def test_cli_reports_bad_record_without_traceback(tmp_path, capsys):
    code = cli_main(["data", "convert", str(SAMPLES / "bad" / "missing_field.jsonl"), "--to", "openai",
                     str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 3
    assert "finechat data: error:" in err and "missing_field.jsonl:2: output: missing field" in err
    assert "Traceback" not in err
    code = cli_main(["data", "convert", str(SAMPLES / "bad" / "missing_field.jsonl"), "--to", "openai",
                     str(tmp_path / "o.jsonl"), "--on-bad-record", "skip"])
    captured = capsys.readouterr()
    assert code == 0 and "skipped 1 bad record" in captured.out and "missing_field.jsonl:2" in captured.err


def test_unknown_format_and_undetectable_records(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:1: cannot tell the data format"):
        read_conversations(f)
    assert read_conversations(SAMPLES / "chatglm_tuning.jsonl", format="chatglm_tuning").format == "chatglm-tuning"
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        read_conversations(f, format="csv")
    with pytest.raises(DataError, match="no such data file"):
        read_conversations(tmp_path / "missing.json")


def test_conversation_dict_round_trip():
    conv = Conversation([Turn("user", "hi"), Turn("assistant", "hello")], system="s", meta={"k": 1})
    assert Conversation.from_dict(conv.to_dict()) == conv
    with pytest.raises(DataError):
        Turn("robot", "x")


def test_pretraining_jsonl_names_the_bad_line(tmp_path):
    from finechat.train.pretrain import read_documents

    good = tmp_path / "docs.jsonl"
    good.write_text('{"text": "一"}\n\n{"text": "two"}\n', encoding="utf-8")
    assert read_documents([str(good)]) == ["一", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_documents([str(bad)])
    bad.write_text('{"text": "a"}\n["not", "a record"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: text: a pretraining record needs a 'text' string"):
        read_documents([str(bad)])


@pytest.mark.parametrize("depth", [70, 5000])
@pytest.mark.parametrize("layout", ["jsonl", "array", "tools"])
def test_deeply_nested_records_are_bad_records_not_recursion_errors(tmp_path, capsys, depth, layout):
    good = {"instruction": "hi", "output": "there"}
    deep = "[" * depth + "]" * depth
    path = tmp_path / ("deep.json" if layout == "array" else "deep.jsonl")
    if layout == "tools":  # a JSON string inside the record, decoded later
        bad = json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
                          "tools": deep})
        lines = [json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}), bad]
    else:
        lines = [json.dumps(good), '{"instruction": ' + deep + ', "output": "x"}', json.dumps(good)]
    path.write_text("[\n" + ",\n".join(lines) + "\n]\n" if layout == "array" else "\n".join(lines) + "\n")
    line = 3 if layout == "array" else 2  # the array's "[" is line 1
    with pytest.raises(DataError, match=rf"deep\.jsonl?:{line}: .*nested more than 64 deep"):
        read_conversations(path)
    if layout != "array":  # a JSON array cannot be read past a broken record; a JSONL file can
        result = read_conversations(path, on_bad_record="skip")
        assert len(result.conversations) == len(lines) - 1 and [s[1] for s in result.skipped] == [2]
        assert cli_main(["data", "convert", str(path), "--to", "openai", str(tmp_path / "o.jsonl"),
                         "--on-bad-record", "skip"]) == 0
        assert "skipped 1 bad record" in capsys.readouterr().err
