"""Preference data with a known right side, built from SFT data by a rule, and arithmetic SFT data to build it on.

A demo of preference training needs pairs where we *know* which answer is better. The rules here make the
rejected answer from the correct one:

- ``numbers``: every number in the answer changed (17 + 25 = 42 -> 17 + 25 = 45): correct vs corrupted;
- ``swap``: the answer of another record (a fluent answer to the wrong question);
- ``truncate``: the answer cut off after its first third (an unfinished answer);
- ``auto``: ``numbers`` where the answer holds a number, else ``swap``.

``arithmetic_records`` writes small addition / subtraction / multiplication questions in English and Chinese
with their exact answers (the data of the GRPO demo, whose reward checks answers with the calculator tool).
All of it is deterministic by seed.
"""

from __future__ import annotations

import random
import re
from typing import Any

from finechat.data.conversation import Conversation
from finechat.data.preference import PreferencePair
from finechat.errors import DataError
from finechat.files import write_jsonl_atomic

RULES = ("auto", "numbers", "swap", "truncate")
_NUMBER = re.compile(r"\d+")
_OPS = {"+": ("plus", "加"), "-": ("minus", "减"), "*": ("times", "乘以")}


def arithmetic_records(n: int, seed: int = 0, chinese_share: float = 0.5, max_operand: int = 50) -> list[dict]:
    """``n`` alpaca records ``{instruction, input, output, answer}``: a small sum and its exact result."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        op = rng.choice(list(_OPS))
        a, b = rng.randint(2, max_operand), rng.randint(2, max_operand if op != "*" else 12)
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b if op == "-" else a * b
        symbol = "×" if op == "*" else op
        if rng.random() < chinese_share:
            question = f"计算 {a} {symbol} {b} 等于多少？"
            answer = f"{a} {symbol} {b} = {result}。"
        else:
            question = f"What is {a} {_OPS[op][0]} {b}?"
            answer = f"{a} {symbol} {b} = {result}."
        out.append({"instruction": question, "input": "", "output": answer, "answer": str(result)})
    return out


def _corrupt_numbers(text: str, rng: random.Random) -> str:
    """Change the last number of the answer (the result), keeping its sign and rough size."""
    matches = list(_NUMBER.finditer(text))
    m = matches[-1]
    value = int(m.group())
    wrong = value + rng.choice([-1, 1]) * rng.randint(1, max(3, value // 4 or 1))
    if wrong < 0 or wrong == value:
        wrong = value + rng.randint(1, 9)
    return text[: m.start()] + str(wrong) + text[m.end():]


def pairs_from_sft(convs: list[Conversation], rule: str = "auto", seed: int = 0) -> tuple[list[PreferencePair],
                                                                                     list[tuple[str, str]]]:
    """(pairs, left out as (where, reason)): the conversation's last answer is chosen, the rule makes rejected."""
    if rule not in RULES:
        raise DataError(f"unknown rule {rule!r}; choose from: {', '.join(RULES)}")
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    left_out: list[tuple[str, str]] = []
    answers = [c.turns[-1].content for c in convs]
    for i, conv in enumerate(convs):
        prompt = Conversation(conv.turns[:-1], system=conv.system, tools=conv.tools, source=conv.source,
                              line=conv.line)
        chosen = answers[i]
        use = rule
        if rule == "auto":
            use = "numbers" if _NUMBER.search(chosen) else "swap"
        if use == "numbers":
            if not _NUMBER.search(chosen):
                left_out.append((conv.where, "no number in the answer for rule numbers"))
                continue
            rejected = _corrupt_numbers(chosen, rng)
        elif use == "swap":
            others = [j for j in range(len(convs)) if answers[j].strip() != chosen.strip()]
            if not others:
                left_out.append((conv.where, "no other answer to swap in"))
                continue
            rejected = answers[rng.choice(others)]
        else:
            cut = max(1, len(chosen) // 3)
            rejected = chosen[:cut]
            if rejected.strip() == chosen.strip() or not rejected.strip():
                left_out.append((conv.where, "answer too short to truncate"))
                continue
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs, left_out


def grpo_prompts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GRPO rows ``{prompt: [messages], answer}`` from records with an ``answer`` field (arithmetic_records)."""
    return [{"prompt": [{"role": "user", "content": r["instruction"]}], "answer": r["answer"]} for r in records]


def write_arithmetic(path: str, n: int, seed: int) -> int:
    """``finechat data generate arithmetic``: write ``n`` arithmetic records as JSONL."""
    return write_jsonl_atomic(path, arithmetic_records(n, seed))


def pairs_main(convs: list[Conversation], rule: str, seed: int, out: str) -> str:
    """``finechat data pairs``: write pairs built by ``rule``; returns the report (left-out records listed)."""
    from finechat.data.preference import write_preferences

    pairs, left_out = pairs_from_sft(convs, rule, seed)
    n = write_preferences(pairs, out, "pref-prompt")
    lines = [f"wrote {n} pairs (rule {rule}, seed {seed}) from {len(convs)} conversations to {out}"]
    if left_out:
        lines.append(f"left out {len(left_out)}:")
        lines += [f"  {where}  {reason}" for where, reason in left_out]
    return "\n".join(lines)
