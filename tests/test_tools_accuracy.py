"""The tools demo's score through the real tool loop with a scripted model: a right call with the exact result in
the answer counts; no call, another tool, a wrong argument or a wrong final number does not."""

import json

import pytest
from scripted import ScriptedChat
from tiny import make_tokenizer

from finechat.tools.accuracy import holds_exactly, score_example, score_tool_use
from finechat.tools.agent import Agent
from finechat.tools.demo_data import ToolExample, demo_registry

PRODUCT = ToolExample("arithmetic", "What is 37 * 48?", ["Calculate"], "Calculate", {"expression": "37 * 48"},
                      "1776", "37 * 48 = 1776.", "1776")
MAYOR = ToolExample("lookup", "Who is the mayor of Larkhaven?", ["Search"], "Search", {"query": "mayor of Larkhaven"},
                    "", "The mayor of Larkhaven is Edda Quill.", "Edda Quill")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def registry():
    return demo_registry()


def model(tokenizer, call: dict | None, answer: str) -> ScriptedChat:
    """Writes ``call`` as a <tool_call> block when no tool result is in the prompt yet, then ``answer``."""
    def script(prompt):
        if call is not None and "<|im_start|>tool" not in prompt:
            return f"<tool_call>{json.dumps(call)}</tool_call>"
        return answer
    return ScriptedChat(tokenizer, script, prompts_as="text")


@pytest.mark.parametrize("call,answer,reason", [
    ({"name": "Calculate", "arguments": {"expression": "37 * 48"}}, "37 * 48 = 1776.", "correct"),
    ({"name": "Calculate", "arguments": {"expression": "37*48"}}, "It is 1776", "correct"),  # any spelling of it
    ({"name": "calculate", "arguments": {"expression": "48 * 37"}}, "1776", "correct"),
    (None, "37 * 48 = 1776.", "no tool call"),  # right number, no tool: does not count
    ({"name": "Calculate", "arguments": {"expression": "37 * 47"}}, "37 * 48 = 1776.", "wrong result"),
    ({"name": "Solve", "arguments": {"equation": "x = 1776"}}, "1776", "wrong tool"),
    ({"name": "Calculate", "arguments": {"expr": "37 * 48"}}, "1776", "the call failed"),
    ({"name": "Calculate", "arguments": {"expression": "37 * 48"}}, "37 * 48 = 1766.", "answer lacks the result"),
    ({"name": "Calculate", "arguments": {"expression": "37 * 48"}}, "It is 17760.", "answer lacks the result"),
    ({"name": "Calculate", "arguments": {"expression": "37 * 48"}}, "About 1776.5", "answer lacks the result"),
])
def test_a_call_counts_only_when_right(tokenizer, registry, call, answer, reason):
    record = score_example(Agent(model(tokenizer, call, answer), registry), PRODUCT, greedy=True, max_new_tokens=200)
    assert record["reason"] == reason, record
    assert record["correct"] == (reason == "correct")
    assert record["answer"] == answer
    if call is not None:
        assert len(record["calls"]) == 1 and json.loads(record["calls"][0]["call"]) == call  # readable, as written


def test_a_search_counts_when_the_fact_comes_back_and_is_answered(tokenizer, registry):
    right = model(tokenizer, {"name": "Search", "arguments": {"query": "mayor Larkhaven"}}, "It is Edda Quill.")
    record = score_example(Agent(right, registry), MAYOR, greedy=True, max_new_tokens=200)
    assert record["correct"] and "Edda Quill" in record["calls"][0]["result"]
    elsewhere = model(tokenizer, {"name": "Search", "arguments": {"query": "ferry ticket"}}, "It is Edda Quill.")
    assert score_example(Agent(elsewhere, registry), MAYOR, max_new_tokens=200)["reason"] == "wrong result"


def test_the_summary_counts_shares_per_kind(tokenizer, registry):
    bot = model(tokenizer, {"name": "Calculate", "arguments": {"expression": "37 * 48"}}, "37 * 48 = 1776.")
    summary, records = score_tool_use(Agent(bot, registry), [PRODUCT, MAYOR, PRODUCT], progress=False,
                                      max_new_tokens=200)
    assert [r["correct"] for r in records] == [True, False, True]
    assert summary["n"] == 3 and summary["accuracy"] == pytest.approx(2 / 3) and summary["called_a_tool"] == 1.0
    assert summary["arithmetic"] == 1.0 and summary["lookup"] == 0.0 and "equation" not in summary
    assert summary["reasons"] == {"correct": 2, "wrong tool": 1}


@pytest.mark.parametrize("text,value,held", [
    ("37 * 48 = 1776.", "1776", True), ("=1776", "1776", True), ("17760", "1776", False), ("1776.5", "1776", False),
    ("21776", "1776", False), ("x = 4; x = 5", "x = 4", True), ("x = 45", "x = 4", False),
    ("costs 14.50 euros.", "14.50 euros", True), ("1,776", "776", False), ("anything", "", False),
])
def test_holds_exactly(text, value, held):
    assert holds_exactly(text, value) is held
