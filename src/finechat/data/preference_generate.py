"""Preference data with a known right side, built from SFT data by a rule, and arithmetic SFT data to build it on.

A demo of preference training needs pairs where we *know* which answer is better. The rules here make the
rejected answer from the correct one:

- ``numbers``: the result changed (17 + 25 = 42 -> 17 + 25 = 45): correct vs a wrong result;
- ``operands``: the question copied wrong, with right arithmetic on it (17 + 25 = 42 -> 17 + 28 = 45), for
  answers that state ``a op b = c``;
- ``mixed``: ``numbers`` and ``operands`` alternately: both ways small models get arithmetic wrong.
  (A 135M reward model learns to catch the second within a CPU budget, not the first, which needs the sum
  worked out again: see the README's pipeline section.)
- ``swap``: the answer of another record (a fluent answer to the wrong question);
- ``truncate``: the answer cut off after its first third (an unfinished answer);
- ``auto``: ``numbers`` where the answer holds a number, else ``swap``.

``arithmetic_records`` writes small addition / subtraction / multiplication questions in English and Chinese
with their exact answers (the data of the GRPO demo, whose reward checks answers with the calculator tool), each
question once and none from a held-out set given as ``exclude``.
All of it is deterministic by seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from typing import Any

from finechat.data.conversation import Conversation
from finechat.data.pairs import PreferencePair
from finechat.errors import DataError
from finechat.files import write_jsonl_atomic

RULES = ("auto", "numbers", "operands", "mixed", "swap", "truncate")
_NUMBER = re.compile(r"\d+")
_STATEMENT = re.compile(r"(\d+) ([-+×*]) (\d+) = (\d+)")
_OPS = {"+": ("plus", "加"), "-": ("minus", "减"), "*": ("times", "乘以")}


def arithmetic_records(n: int, seed: int = 0, chinese_share: float = 0.5, max_operand: int = 50,
                       exclude: Collection[str] = ()) -> list[dict]:
    """``n`` alpaca records ``{instruction, input, output, answer}``: a small sum and its exact result.

    Every question is different, and none is in ``exclude`` (the questions of a held-out set, so that training
    data never repeats one)."""
    rng = random.Random(seed)
    out: list[dict] = []
    seen = set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 10_000:
            raise DataError(f"only {len(out)} different arithmetic questions of the {n} asked for could be made "
                            f"(operands up to {max_operand}, {len(exclude)} excluded); ask for fewer")
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
        if question in seen:
            continue
        seen.add(question)
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


def _miscopy_operands(text: str, rng: random.Random) -> str | None:
    """Change one operand of ``a op b = c`` and give the right result for the changed question (None: no such
    statement in the answer)."""
    m = _STATEMENT.search(text)
    if m is None:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    for _ in range(100):
        if rng.random() < 0.5:
            new_a, new_b = a + rng.choice([-1, 1]) * rng.randint(1, 9), b
        else:
            new_a, new_b = a, b + rng.choice([-1, 1]) * rng.randint(1, 3 if op in "×*" else 9)
        if new_a >= 0 and new_b >= 0 and (new_a, new_b) != (a, b) and (op != "-" or new_a >= new_b):
            break
    else:
        return None
    result = new_a + new_b if op == "+" else new_a - new_b if op == "-" else new_a * new_b
    return text[: m.start()] + f"{new_a} {op} {new_b} = {result}" + text[m.end():]


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
        elif rule == "mixed":
            use = "operands" if i % 2 else "numbers"  # exactly half each, not half on average
        if use == "operands":
            rejected = _miscopy_operands(chosen, rng)
            if rejected is None:
                left_out.append((conv.where, "no 'a op b = c' in the answer for rule operands"))
                continue
        elif use == "numbers":
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


def write_arithmetic(path: str, n: int, seed: int, exclude: Collection[str] = ()) -> int:
    """``finechat data generate arithmetic``: write ``n`` arithmetic records as JSONL (none asking an excluded
    question)."""
    return write_jsonl_atomic(path, arithmetic_records(n, seed, exclude=exclude))


def pairs_main(convs: list[Conversation], rule: str, seed: int, out: str) -> str:
    """``finechat data pairs``: write pairs built by ``rule``; returns the report (left-out records listed)."""
    from finechat.data.pairs import write_preferences

    pairs, left_out = pairs_from_sft(convs, rule, seed)
    n = write_preferences(pairs, out, "pref-prompt")
    lines = [f"wrote {n} pairs (rule {rule}, seed {seed}) from {len(convs)} conversations to {out}"]
    if left_out:
        lines.append(f"left out {len(left_out)}:")
        lines += [f"  {where}  {reason}" for where, reason in left_out]
    return "\n".join(lines)
