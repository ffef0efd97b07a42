"""Calculate(): exact arithmetic by walking the parsed expression; hostile input is refused, never run."""

import threading
import time

import pytest

from finechat.tools.calculator import CalculationError, calculate
from finechat.tools.toolbox import build_registry


def _within(seconds, fn, *args):
    """Run fn in a thread and fail the test if it does not finish in time (a hang is a failure)."""
    box = {}

    def work():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__}{args!r:.60} did not finish within {seconds} s"
    return box


@pytest.mark.parametrize("expression, expected", [
    ("1+2*3", "7"),
    ("0.1 + 0.2", "0.3"),  # exact, not 0.30000000000000004
    ("1/3", "1/3 (≈ 0.333333333333333)"),
    ("(2+3)*7/5", "7"),
    ("2**100", str(2**100)),
    ("2^10", "1024"),
    ("-3.5 * 2", "-7"),
    ("7 // 2 + 7 % 2", "4"),
    ("sqrt(16) + sqrt(1/4)", "4.5"),
    ("factorial(20)", "2432902008176640000"),
    ("round(2/3, 3)", "0.667"),
    ("abs(-1.25)", "1.25"),
    ("log(8, 2)", "3"),
    ("gcd(12, 18) + lcm(4, 6)", "18"),
    ("3 × 4 ÷ 6", "2"),
    ("123456789012345678901234567890.5 * 2", "246913578024691357802469135781"),
])
def test_exact_results(expression, expected):
    assert calculate(expression) == expected


def test_floating_functions():
    assert calculate("sqrt(2)").startswith("1.414213562373")
    assert calculate("sin(pi/2)") == "1"


HOSTILE = [
    "__import__('os')",
    "__import__('os').system('echo pwned')",
    "open('/etc/passwd').read()",
    "(1).__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: 1",
    "(lambda x: x)(1)",
    "[x for x in range(10)]",
    "globals()",
    "eval('1+1')",
    "exec('import os')",
    "print",
    "__builtins__",
    "x",
    "'a' * 10",
    "True + 1",
    "9**9**9",
    "10**100000",
    "2**(2**64)",
    "factorial(100000)",
    "1e999999999",
    "(1/3)**100000",
    "exp(100000)",
    "(" * 10_000 + "1" + ")" * 10_000,
    "(" * 500 + "1" + ")" * 500,
    "-" * 1500 + "1",
    "2" + "**2" * 500,
    "١٢٣ + 1",  # Arabic-Indic digits
    "１２３ + 1",  # full-width digits
    "sqrt(-1)",
    "1/0",
    "1j * 2",
    "a := 3",
    "1 if 1 else 0",
    "max(*[1, 2])",
    "round(x=1)",
    "",
]


@pytest.mark.parametrize("expression", HOSTILE, ids=[repr(h[:30]) for h in HOSTILE])
def test_hostile_input_is_refused_quickly(expression):
    started = time.perf_counter()
    box = _within(5, calculate, expression)
    assert "value" not in box, f"computed {box.get('value')!r:.80}"
    assert isinstance(box["error"], CalculationError), repr(box["error"])  # no RecursionError etc. leaking
    assert str(box["error"])
    assert time.perf_counter() - started < 5


def test_nothing_is_executed(tmp_path):
    marker = tmp_path / "pwned"
    for expression in (f"__import__('pathlib').Path({str(marker)!r}).touch()",
                       f"open({str(marker)!r}, 'w')"):
        with pytest.raises(CalculationError):
            calculate(expression)
    assert not marker.exists()


def test_refusals_come_back_as_tool_results():
    registry = build_registry("calculator")
    ok = registry.call("Calculate", ["6*7"])
    assert ok.ok and ok.content == "42"
    for expression in ("__import__('os')", "9**9**9", "(" * 10_000 + ")" * 10_000):
        result = _within(5, registry.call, "Calculate", [expression])["value"]
        assert not result.ok and result.content.startswith("error: ")
