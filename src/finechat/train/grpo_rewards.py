"""Reward functions for ``stage: grpo``, in TRL's calling convention ``f(prompts, completions, **columns)``.

- ``correct``: 1 when the answer's final number equals the gold answer's (or, for answers without a number,
  when the gold text appears in the answer), else 0. The gold answer is the data's reference answer.
- ``format``: 1 when the answer ends on a stated result (``... = 42.`` / ``答案是 42。``), 0.5 when it merely
  ends on a number, else 0; rewards answers that commit to one result.
- ``calculator``: checks the arithmetic the model wrote, with finechat's own calculator tool (exact, no
  ``eval``): every ``expression = value`` in the answer is computed; 1 when all are right and at least one
  uses the prompt's numbers, -1 when one is wrong, 0 when there is nothing to check. No gold answer needed.
- ``reward_model``: the score of a ``stage: rm`` checkpoint (``reward_model: DIR``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from finechat.errors import ConfigError
from finechat.eval.reward_scoring import conversation_of
from finechat.tools.calculator import CalculationError, evaluate

_NUMBER = r"-?\d+(?:\.\d+)?"
_FINAL_NUMBER = re.compile(_NUMBER)
# "a op b [op c ...] = value": the left side may use the operators models write (× ÷ −).
_EQUATION = re.compile(rf"((?:{_NUMBER}\s*[-+*/×÷−]\s*)+{_NUMBER})\s*=\s*({_NUMBER})")
_STATED = re.compile(rf"(?:=|is|是|为|等于)\s*{_NUMBER}\s*[。.!！]?\s*$")


def _text(completion: Any) -> str:
    """A completion as text (TRL passes message lists for conversational data)."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def _final_number(text: str) -> Fraction | None:
    found = _FINAL_NUMBER.findall(text.replace(",", ""))
    return Fraction(found[-1]) if found else None


def correct(prompts: list, completions: list, gold: list[str] | None = None, **_: Any) -> list[float]:
    """1.0 when the answer's final number (or text) matches the gold answer, else 0.0."""
    if gold is None:
        raise ConfigError("reward correct needs a gold answer per prompt (the data's reference answer)")
    out = []
    for completion, answer in zip(completions, gold):
        text, want = _text(completion), _final_number(answer)
        if want is None:
            out.append(1.0 if answer.strip() and answer.strip() in text else 0.0)
        else:
            out.append(1.0 if _final_number(text) == want else 0.0)
    return out


def answer_format(prompts: list, completions: list, **_: Any) -> list[float]:
    """1.0 for an answer ending on a stated result, 0.5 for one ending on a number, else 0.0."""
    out = []
    for completion in completions:
        text = _text(completion).strip()
        if _STATED.search(text):
            out.append(1.0)
        elif re.search(rf"{_NUMBER}\s*[。.!！]?$", text):
            out.append(0.5)
        else:
            out.append(0.0)
    return out


def calculator(prompts: list, completions: list, **_: Any) -> list[float]:
    """Check every ``expression = value`` in the answer with the calculator tool (see the module docstring)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        text = _text(completion).replace(",", "")
        prompt_numbers = set(_FINAL_NUMBER.findall(_text(prompt)))
        equations = _EQUATION.findall(text)
        if not equations:
            out.append(0.0)
            continue
        right, grounded = True, False
        for expression, value in equations:
            try:
                result = evaluate(expression)
            except (CalculationError, ZeroDivisionError, OverflowError):
                right = False
                break
            if Fraction(result) != Fraction(value):
                right = False
                break
            grounded |= set(_FINAL_NUMBER.findall(expression)) <= prompt_numbers
        out.append(1.0 if right and grounded else -1.0 if not right else 0.0)
    return out


def reward_model_reward(rm: Any) -> Callable[..., list[float]]:
    """A reward function scoring (prompt, answer) with a loaded :class:`finechat.eval.reward_scoring.RewardModel`."""
    def reward_model(prompts: list, completions: list, prompt_messages: list[str] | None = None,
                     **_: Any) -> list[float]:
        if prompt_messages is None:
            raise ConfigError("reward reward_model needs the prompt messages of each row (prompt_messages)")
        convs = [conversation_of(json.loads(m)) for m in prompt_messages]
        return rm.score([(c, _text(a)) for c, a in zip(convs, completions)])

    return reward_model


REWARDS: dict[str, Callable[..., list[float]]] = {"correct": correct, "format": answer_format,
                                                   "calculator": calculator}


def get_rewards(names: list[str], rm: Any = None) -> list[Callable]:
    """The reward functions named in ``rewards:`` (``reward_model`` needs ``rm``)."""
    funcs = []
    for name in names:
        if name == "reward_model":
            if rm is None:
                raise ConfigError("rewards: reward_model needs reward_model: DIR (a stage-rm checkpoint)")
            funcs.append(reward_model_reward(rm))
        elif name in REWARDS:
            funcs.append(REWARDS[name])
        else:
            raise ConfigError(f"unknown reward {name!r}; choose from: {', '.join([*REWARDS, 'reward_model'])}")
    if not funcs:
        raise ConfigError("stage grpo needs at least one reward in rewards: [...]")
    return funcs
