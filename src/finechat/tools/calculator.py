"""The ``Calculate(expression)`` tool: exact arithmetic on model-written expressions, without ``eval``.

A model's tool call is untrusted text, so the expression is parsed with :mod:`ast` and walked node by node
over a small whitelist (numbers, + - * / // % **, unary signs, a few named functions and constants).
Anything else -- names, attribute access, lambdas, subscripts, calls to unlisted functions, keyword
arguments, non-ASCII digits -- is refused with a message, and nothing is ever executed.

Numbers stay exact where they can: integers are Python ints, decimals such as ``0.1`` become
:class:`fractions.Fraction` read from the literal's own text (so ``0.1 + 0.2`` is exactly ``0.3``), and
division keeps fractions. Only irrational functions (sqrt of a non-square, sin, log, ...) fall back to
floating point. Every intermediate result is bounded (``MAX_DIGITS``) *before* it is computed where that
is possible (powers, factorials, literals), so ``9**9**9`` is refused at once instead of running for hours.
Nesting is bounded before parsing, so 10,000 nested parentheses are refused without a RecursionError.

sympy could do the arithmetic, but its parser (``sympify``/``parse_expr``) evaluates strings with Python's
``eval``, which is exactly what must not happen here; :mod:`finechat.tools.solver` reuses this walker to
build sympy expressions safely.
"""

from __future__ import annotations

import ast
import math
from fractions import Fraction
from typing import Any

MAX_LENGTH = 2000  # characters in one expression
MAX_NESTING = 64  # parentheses/brackets open at once, and depth of the parsed tree
MAX_DIGITS = 1000  # decimal digits of any integer, numerator or denominator
_MAX_BITS = int(MAX_DIGITS * math.log2(10)) + 1

# Characters models often write for operators; anything else outside ASCII is refused.
_OPERATOR_ALIASES = {"×": "*", "÷": "/", "−": "-", "（": "(", "）": ")", "＋": "+", "＊": "*", "／": "/"}


class CalculationError(ValueError):
    """An expression that is refused or cannot be computed; the message is shown to the model."""


Number = int | Fraction | float


def _factorial(n: Number) -> int:
    if isinstance(n, float) or (isinstance(n, Fraction) and n.denominator != 1):
        raise CalculationError("factorial() needs a whole number")
    n = int(n)
    if n < 0:
        raise CalculationError("factorial() of a negative number is not defined")
    if n > 1 and math.lgamma(n + 1) / math.log(10) > MAX_DIGITS:
        raise CalculationError(f"factorial({n}) has more than {MAX_DIGITS} digits; refused")
    return math.factorial(n)


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise CalculationError("sqrt() of a negative number is not a real number")
    if isinstance(x, (int, Fraction)):
        q = Fraction(x)
        rn, rd = math.isqrt(q.numerator), math.isqrt(q.denominator)
        if rn * rn == q.numerator and rd * rd == q.denominator:
            return _normal(Fraction(rn, rd))
    return math.sqrt(x)


def _log(x: Number, base: Number | None = None) -> float:
    if x <= 0 or (base is not None and (base <= 0 or base == 1)):
        raise CalculationError("log() needs a positive number (and a positive base other than 1)")
    return math.log(x) if base is None else math.log(x) / math.log(base)


def _whole(name: str, *xs: Number) -> list[int]:
    out = []
    for x in xs:
        if isinstance(x, float) or (isinstance(x, Fraction) and x.denominator != 1):
            raise CalculationError(f"{name}() needs whole numbers")
        out.append(int(x))
    return out


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    (n,) = _whole("round", ndigits)
    if abs(n) > MAX_DIGITS:
        raise CalculationError("round(): too many digits")
    return round(x, n)


FUNCTIONS: dict[str, tuple[Any, int, int]] = {  # name -> (function, min args, max args)
    "sqrt": (_sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "factorial": (_factorial, 1, 1),
    "gcd": (lambda *a: math.gcd(*_whole("gcd", *a)), 1, 8),
    "lcm": (lambda *a: math.lcm(*_whole("lcm", *a)), 1, 8),
    "exp": (math.exp, 1, 1),
    "log": (_log, 1, 2),
    "ln": (_log, 1, 1),
    "log10": (lambda x: _log(x, 10), 1, 1),
    "log2": (lambda x: _log(x, 2), 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1),
    "acos": (math.acos, 1, 1),
    "atan": (math.atan, 1, 1),
    "sinh": (math.sinh, 1, 1),
    "cosh": (math.cosh, 1, 1),
    "tanh": (math.tanh, 1, 1),
    "degrees": (math.degrees, 1, 1),
    "radians": (math.radians, 1, 1),
    "min": (min, 1, 16),
    "max": (max, 1, 16),
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def prepare(expression: str) -> str:
    """Normalise and size-check an expression's text before parsing (refusing non-ASCII and deep nesting)."""
    if not isinstance(expression, str):
        raise CalculationError("the expression must be text")
    text = expression.strip()
    for alias, op in _OPERATOR_ALIASES.items():
        text = text.replace(alias, op)
    if not text:
        raise CalculationError("empty expression")
    if len(text) > MAX_LENGTH:
        raise CalculationError(f"expression longer than {MAX_LENGTH} characters; refused")
    bad = sorted({c for c in text if ord(c) > 127})
    if bad:
        raise CalculationError(f"only ASCII digits and operators are allowed; refused {''.join(bad[:5])!r}")
    depth = deepest = 0
    for c in text:  # counted before parsing: CPython's parser recurses on nesting
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth -= 1
    if deepest > MAX_NESTING:
        raise CalculationError(f"expression nested more than {MAX_NESTING} levels deep; refused")
    return text.replace("^", "**")  # calculators (and models) write powers as ^


def parse(text: str) -> ast.Expression:
    """Parse prepared text into an expression tree (syntax only; nothing runs)."""
    try:
        return ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculationError(f"not a valid expression: {e.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise CalculationError("expression too complex; refused") from None


class ExpressionWalker:
    """Walks a parsed expression over a whitelist of node types; subclasses decide what numbers are."""

    def __init__(self, source: str):
        self.source = source

    def walk(self, node: ast.AST, depth: int = 0) -> Any:
        if depth > MAX_NESTING:
            raise CalculationError(f"expression nested more than {MAX_NESTING} levels deep; refused")
        if isinstance(node, ast.Expression):
            return self.walk(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise CalculationError(f"only numbers are allowed, not {type(node.value).__name__}")
            return self.number(ast.get_source_segment(self.source, node) or repr(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = self.walk(node.operand, depth + 1)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            left = self.walk(node.left, depth + 1)
            right = self.walk(node.right, depth + 1)
            return self.binop(node.op, left, right)
        if isinstance(node, ast.Name):
            return self.name(node.id)
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                shown = node.func.id if isinstance(node.func, ast.Name) else ast.get_source_segment(
                    self.source, node.func)
                raise CalculationError(f"function {shown!r} is not allowed; allowed: {', '.join(FUNCTIONS)}")
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                raise CalculationError("keyword and * arguments are not allowed")
            fn, low, high = FUNCTIONS[node.func.id]
            if not low <= len(node.args) <= high:
                raise CalculationError(f"{node.func.id}() takes {low}..{high} arguments, got {len(node.args)}")
            return self.call(node.func.id, [self.walk(a, depth + 1) for a in node.args])
        kind = {ast.Attribute: "attribute access", ast.Lambda: "lambda", ast.Subscript: "subscript",
                ast.Compare: "comparison", ast.BoolOp: "boolean operator", ast.NamedExpr: "assignment"}
        raise CalculationError(f"not allowed in an expression: {kind.get(type(node), type(node).__name__)}")

    # -- hooks ----------------------------------------------------------------------------------------
    def number(self, literal: str) -> Any:
        raise NotImplementedError

    def binop(self, op: ast.operator, left: Any, right: Any) -> Any:
        raise NotImplementedError

    def name(self, name: str) -> Any:
        raise NotImplementedError

    def call(self, name: str, args: list) -> Any:
        raise NotImplementedError


def _digits_ok(x: Number) -> Number:
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            raise CalculationError("the result is not a finite number")
        return x
    if isinstance(x, Fraction):
        big = max(x.numerator.bit_length(), x.denominator.bit_length())
    else:
        big = x.bit_length()
    if big > _MAX_BITS:
        raise CalculationError(f"the result has more than {MAX_DIGITS} digits; refused")
    return x


def _normal(x: Number) -> Number:
    if isinstance(x, Fraction) and x.denominator == 1:
        return x.numerator
    return x


def literal_exponent_ok(literal: str) -> None:
    """Refuse literals like ``1e999999999`` before Fraction builds a billion-digit integer."""
    lower = literal.lower().replace("_", "")
    if "e" in lower:
        try:
            exponent = int(lower.split("e", 1)[1])
        except ValueError:
            raise CalculationError(f"bad number {literal!r}") from None
        if abs(exponent) > MAX_DIGITS:
            raise CalculationError(f"number {literal!r} has more than {MAX_DIGITS} digits; refused")
    if len(lower) > MAX_DIGITS:
        raise CalculationError(f"number has more than {MAX_DIGITS} digits; refused")


class _Exact(ExpressionWalker):
    def number(self, literal: str) -> Number:
        literal_exponent_ok(literal)
        lower = literal.lower().replace("_", "")
        if lower.startswith(("0x", "0o", "0b")) or lower.isdigit():
            return int(lower, 0) if not lower.isdigit() else int(lower)
        if lower.endswith("j"):
            raise CalculationError("complex numbers are not supported")
        return _normal(_digits_ok(Fraction(lower)))

    def name(self, name: str) -> float:
        if name in CONSTANTS:
            return CONSTANTS[name]
        if name in FUNCTIONS:
            raise CalculationError(f"{name} is a function: write {name}(x)")
        raise CalculationError(f"unknown name {name!r}; only numbers, {', '.join(CONSTANTS)} and functions are allowed")

    def binop(self, op: ast.operator, a: Number, b: Number) -> Number:
        try:
            if isinstance(op, ast.Add):
                r = a + b
            elif isinstance(op, ast.Sub):
                r = a - b
            elif isinstance(op, ast.Mult):
                r = a * b
            elif isinstance(op, ast.Div):
                r = a / b if isinstance(a, float) or isinstance(b, float) else Fraction(a) / Fraction(b)
            elif isinstance(op, ast.FloorDiv):
                r = a // b
            elif isinstance(op, ast.Mod):
                r = a % b
            elif isinstance(op, ast.Pow):
                r = self.power(a, b)
            else:
                raise CalculationError(f"operator {type(op).__name__} is not allowed")
        except ZeroDivisionError:
            raise CalculationError("division by zero") from None
        except OverflowError:
            raise CalculationError("the result is too large") from None
        return _normal(_digits_ok(r))

    def power(self, base: Number, exponent: Number) -> Number:
        if isinstance(exponent, Fraction) and exponent.denominator == 1:
            exponent = exponent.numerator
        if isinstance(exponent, int) and not isinstance(base, float):
            base = Fraction(base)
            if base == 0 and exponent < 0:
                raise ZeroDivisionError
            size = max(base.numerator.bit_length(), base.denominator.bit_length())
            if base not in (0, 1, -1) and size > 1 and abs(exponent) * (size - 1) > _MAX_BITS:
                raise CalculationError(f"the result has more than {MAX_DIGITS} digits; refused")
            return base**exponent
        if base < 0:
            raise CalculationError("a negative number to a fractional power is not a real number")
        result = float(base) ** float(exponent)
        return result

    def call(self, name: str, args: list) -> Number:
        fn = FUNCTIONS[name][0]
        try:
            return _normal(_digits_ok(fn(*args)))
        except CalculationError:
            raise
        except (ValueError, ZeroDivisionError) as e:
            raise CalculationError(f"{name}(): {e}") from None
        except OverflowError:
            raise CalculationError(f"{name}(): the result is too large") from None


def evaluate(expression: str) -> Number:
    """The exact value of ``expression`` (int, Fraction or float); raises :class:`CalculationError`."""
    text = prepare(expression)
    return _Exact(text).walk(parse(text))


def format_number(value: Number) -> str:
    """Show a result: integers and terminating fractions exactly, other fractions as p/q with a decimal."""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.15g}"
    twos = fives = 0
    den = value.denominator
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den == 1:  # a terminating decimal: print all of it, exactly
        places = max(twos, fives)
        scaled = abs(value.numerator) * (10**places // value.denominator)
        whole, frac = divmod(scaled, 10**places)
        sign = "-" if value < 0 else ""
        return f"{sign}{whole}.{frac:0{places}d}".rstrip("0").rstrip(".")
    return f"{value.numerator}/{value.denominator} (≈ {float(value):.15g})"


def calculate(expression: str) -> str:
    """Tool entry point: the formatted result, or raises :class:`CalculationError` with the reason."""
    return format_number(evaluate(expression))
