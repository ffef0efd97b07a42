"""Tool-call accuracy: the share of questions a model answers through a correct tool call with the exact result.

Each question of :func:`finechat.tools.demo_data.generate_tool_examples` runs through the real tool loop
(:class:`~finechat.tools.agent.Agent`: the model's calls are parsed, run and their results fed back, as in
``finechat chat --tools``). An answer counts when

1. the model called the question's tool (``Calculate``, ``Solve`` or ``Search``) and the call ran,
2. that call's result is the right one: exactly the expected value for ``Calculate`` / ``Solve`` (a wrong
   argument gives another result), the expected fact inside the search results for ``Search``, and
3. the final answer holds that value exactly, as a whole (``408`` does not count inside ``4080`` or ``40.8``).

A question answered without a call, with another tool, a failing call, a wrong argument or a final answer
without the exact value does not count; each record says which of these happened (``reason``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from finechat.tools.agent import Agent
from finechat.tools.demo_data import KINDS, ToolExample

REASONS = ("correct", "no tool call", "wrong tool", "the call failed", "wrong result", "answer lacks the result")


def holds_exactly(text: str, value: str) -> bool:
    """Whether ``value`` appears in ``text`` as a whole: not inside a longer word or number."""
    if not value:
        return False
    pattern = r"(?<![\w.])(?<!\d,)" + re.escape(value) + r"(?![\w]|[.,]\d)"
    return re.search(pattern, text) is not None


def _right_result(example: ToolExample, result: str) -> bool:
    if example.tool == "Search":
        return holds_exactly(result, example.expected)
    return result.strip() == example.expected


def verdict(example: ToolExample, calls: list[dict], answer: str) -> str:
    """Why an answer counts or not: one of :data:`REASONS`."""
    if not calls:
        return "no tool call"
    mine = [c for c in calls if c["name"] == example.tool]
    if not mine:
        return "wrong tool"
    ran = [c for c in mine if c["ok"]]
    if not ran:
        return "the call failed"
    right = [c for c in ran if _right_result(example, c["result"])]
    if not right:
        return "wrong result"
    return "correct" if holds_exactly(answer, example.expected) else "answer lacks the result"


def score_example(agent: Agent, example: ToolExample, **gen: Any) -> dict:
    """Answer one question through the tool loop; the record holds the calls, the answer and the verdict."""
    calls: dict[str, dict] = {}
    answer = ""
    messages = [{"role": role, "content": text} for pair in example.history
                for role, text in zip(("user", "assistant"), pair)]
    for event in agent.run(messages + [{"role": "user", "content": example.question}], **gen):
        if event.kind == "tool_call":
            calls[event.call_id] = {"name": event.name, "call": event.text, "arguments": event.arguments,
                                    "result": "", "ok": False}
        elif event.kind == "tool_result" and event.call_id in calls:
            calls[event.call_id].update(result=event.text, ok=event.ok)
        elif event.kind == "done":
            answer = event.text
    called = list(calls.values())
    # Tool names as the registry spells them: a model writing "calculate" still ran Calculate.
    for call in called:
        tool = agent.tools.get(call["name"])
        call["name"] = tool.name if tool is not None else call["name"]
    reason = verdict(example, called, answer)
    return {"kind": example.kind, "question": example.question, "expected": example.expected,
            "tool": example.tool, "calls": called, "answer": answer, "correct": reason == "correct",
            "reason": reason}


def score_tool_use(agent: Agent, examples: Iterable[ToolExample], progress: bool = True,
                   desc: str = "Tool questions", **gen: Any) -> tuple[dict, list[dict]]:
    """(summary, records) over ``examples``; ``gen`` goes to the generation (``greedy``, ``max_new_tokens``).

    The summary: ``accuracy`` (the share answered through a correct call with the exact result), ``called_a_tool``
    (the share with any call), ``n``, the accuracy per kind and how many answers fell under each reason.
    """
    from tqdm.auto import tqdm

    examples = list(examples)
    records = []
    with tqdm(total=len(examples), desc=desc, unit="q", disable=not progress, dynamic_ncols=True) as bar:
        for example in examples:
            records.append(score_example(agent, example, **gen))
            bar.update(1)
    n = len(records)
    summary: dict[str, Any] = {
        "accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
        "called_a_tool": sum(bool(r["calls"]) for r in records) / n if n else 0.0,
        "n": n,
    }
    for kind in KINDS:
        mine = [r for r in records if r["kind"] == kind]
        if mine:
            summary[kind] = sum(r["correct"] for r in mine) / len(mine)
    summary["reasons"] = {reason: sum(r["reason"] == reason for r in records) for reason in REASONS
                          if any(r["reason"] == reason for r in records)}
    return summary, records
