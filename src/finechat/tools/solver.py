"""The ``Solve(equation)`` tool: equations and small systems solved by sympy, answered as text.

``Solve("x^2 - 4 = 0")`` -> ``x = -2; x = 2``; ``Solve("x + y = 3, x - y = 1")`` -> ``x = 2, y = 1``.
An expression without ``=`` means ``expression = 0``. Equations are separated by top-level commas,
semicolons or new lines.

sympy's own parser evaluates strings with Python's ``eval``, so model-written text never reaches it: the
calculator's AST walker (:class:`finechat.tools.calculator.ExpressionWalker`) builds the sympy expression
node by node, with the same whitelist and size limits; single-letter-ish names become symbols.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from finechat.tools.calculator import (
    FUNCTIONS,
    CalculationError,
    ExpressionWalker,
    literal_exponent_ok,
    parse,
    prepare,
)

MAX_EQUATIONS = 6
MAX_UNKNOWNS = 6
MAX_POWER = 64  # a symbolic power above this is refused (solving x**100000 would not finish)
_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,7}$")
# "3x", "2(x+1)", "(x+1)(x-1)": implicit multiplication, as people and models write it. A number followed
# by e5 / E-3 (scientific notation) or 0x (hex) is left alone.
_IMPLICIT = re.compile(r"(?<![A-Za-z_0-9.])(\d+(?:\.\d+)?)(?![eE][+-]?\d)\s*(?=[A-Za-z(])|(\))\s*(?=[A-Za-z0-9(])")
_PREFERRED = "xyzt"


class _Symbolic(ExpressionWalker):
    def __init__(self, source: str):
        super().__init__(source)
        import sympy

        self.sp = sympy

    def number(self, literal: str) -> Any:
        literal_exponent_ok(literal)
        lower = literal.lower().replace("_", "")
        if lower.endswith("j"):
            raise CalculationError("complex literals are not supported")
        if lower.startswith(("0x", "0o", "0b")):
            return self.sp.Integer(int(lower, 0))
        return self.sp.Rational(lower)

    def name(self, name: str) -> Any:
        if name == "pi":
            return self.sp.pi
        if name == "e":
            return self.sp.E
        if name in FUNCTIONS:
            raise CalculationError(f"{name} is a function: write {name}(x)")
        if not _SYMBOL.match(name) or name.startswith("_"):
            raise CalculationError(f"unknown name {name!r}: unknowns are short names such as x, y, n1")
        return self.sp.Symbol(name)

    def binop(self, op: ast.operator, a: Any, b: Any) -> Any:
        if isinstance(op, ast.Add):
            return a + b
        if isinstance(op, ast.Sub):
            return a - b
        if isinstance(op, ast.Mult):
            return a * b
        if isinstance(op, ast.Div):
            if b == 0:
                raise CalculationError("division by zero")
            return a / b
        if isinstance(op, ast.Pow):
            if b.is_number and (not b.is_Rational or abs(b) > MAX_POWER):
                if a.free_symbols or abs(b) > MAX_POWER:
                    raise CalculationError(f"powers above {MAX_POWER} are refused")
            if not b.is_number:
                raise CalculationError("unknowns in an exponent are not supported")
            return a**b
        raise CalculationError(f"operator {type(op).__name__} is not allowed in an equation")

    def call(self, name: str, args: list) -> Any:
        sp = self.sp
        table = {"sqrt": sp.sqrt, "abs": sp.Abs, "exp": sp.exp, "ln": sp.log, "sin": sp.sin, "cos": sp.cos,
                 "tan": sp.tan, "asin": sp.asin, "acos": sp.acos, "atan": sp.atan, "sinh": sp.sinh,
                 "cosh": sp.cosh, "tanh": sp.tanh, "factorial": sp.factorial, "floor": sp.floor,
                 "ceil": sp.ceiling, "log10": lambda x: sp.log(x, 10), "log2": lambda x: sp.log(x, 2),
                 "log": sp.log}
        if name not in table:
            raise CalculationError(f"{name}() is not supported in equations")
        return table[name](*args)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if depth == 0 and c in ",;\n":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expression(text: str) -> Any:
    return _Symbolic(text).walk(parse(text))


def parse_equations(text: str) -> list:
    """Model text -> sympy ``Eq`` objects (never through sympy's eval-based parser)."""
    import sympy

    text = prepare(text).replace("==", "=")
    text = _IMPLICIT.sub(lambda m: m.group(0) if m.group(1) == "0" and text[m.end():m.end() + 1] in "xXoObB"
                         else (m.group(1) or m.group(2)) + "*", text)
    pieces = _split_top_level(text)
    if not pieces:
        raise CalculationError("no equation given")
    if len(pieces) > MAX_EQUATIONS:
        raise CalculationError(f"at most {MAX_EQUATIONS} equations at once")
    equations = []
    for piece in pieces:
        sides = piece.split("=")
        if len(sides) > 2:
            raise CalculationError(f"more than one '=' in {piece!r}")
        left = _expression(sides[0].strip())
        right = _expression(sides[1].strip()) if len(sides) == 2 else sympy.Integer(0)
        equations.append(sympy.Eq(left, right))
    return equations


def _show(value: Any) -> str:
    import sympy

    if value.has(sympy.CRootOf) or value.has(sympy.Float):
        # A root of a polynomial with no closed form (degree >= 5, Abel-Ruffini): its numeric value is the answer.
        return f"≈ {_numeric(value)}"
    text = "= " + str(value).replace("**", "^")
    if not value.is_Rational and value.is_number:
        try:
            approx = value.evalf(12)
            text += f" (≈ {approx})"
        except (TypeError, ValueError):
            pass
    return text


def solve(equation: str) -> str:
    """Tool entry point: the solutions as text, or raises :class:`CalculationError`."""
    import sympy

    equations = parse_equations(equation)
    unknowns = sorted(set().union(*(eq.free_symbols for eq in equations)), key=lambda s: s.name)
    if not unknowns:
        truth = all(bool(eq) for eq in equations if eq in (sympy.true, sympy.false))
        return "true (no unknowns)" if truth else "false (no unknowns)"
    if len(unknowns) > len(equations):  # a*x = b: solve for x, keep a and b as parameters
        ranked = sorted(unknowns, key=lambda s: (_PREFERRED.find(s.name) % 99 if s.name in _PREFERRED else 99, s.name))
        unknowns = sorted(ranked[: len(equations)], key=lambda s: s.name)
    if len(unknowns) > MAX_UNKNOWNS:
        raise CalculationError(f"at most {MAX_UNKNOWNS} unknowns")
    try:
        # One equation goes in alone: sympy's system solver drops roots that have no closed form (it answers []
        # for [x^5 - x + 1 = 0]), while the single-equation solver returns them as CRootOf.
        solutions = sympy.solve(equations[0] if len(equations) == 1 else equations, unknowns, dict=True)
        if not solutions and len(equations) > 1:
            solutions = _polynomial_system(equations, unknowns)
        if any(v.has(sympy.CRootOf) for sol in solutions for v in sol.values()) and len(unknowns) == 1:
            solutions = _numeric_roots(equations, unknowns)  # CRootOf.evalf takes seconds a root; nroots does not
    except NotImplementedError:
        solutions = _numeric_roots(equations, unknowns)
    except (ValueError, TypeError) as e:
        raise CalculationError(f"cannot solve: {e}") from None
    if not solutions:
        return "no solution"
    lines = []
    for sol in solutions:
        parts = [f"{s} {_show(sol[s])}" for s in unknowns if s in sol]
        free = [str(s) for s in unknowns if s not in sol]
        line = ", ".join(parts)
        if free:
            line += f" ({', '.join(free)} free)"
        lines.append(line)
    return "; ".join(lines)


def _numeric(value: Any) -> str:
    """A number to 15 significant digits."""
    return str(value.evalf(15)).replace("**", "^")


def _is_polynomial(equations: list, unknowns: list) -> bool:
    return all((eq.lhs - eq.rhs).is_polynomial(*unknowns) for eq in equations)


def _polynomial_system(equations: list, unknowns: list) -> list[dict]:
    """A polynomial system sympy's solve answered [] for: [] only when it truly has no solution (its Groebner
    basis is [1]); roots without a closed form come back as CRootOf through nonlinsolve."""
    import sympy

    if not _is_polynomial(equations, unknowns):
        return []
    polys = [eq.lhs - eq.rhs for eq in equations]
    if list(sympy.groebner(polys, *unknowns, order="lex").exprs) == [1]:
        return []
    found = []
    for values in sympy.nonlinsolve(polys, unknowns):
        if all(v.is_number for v in values):  # nonlinsolve may hand back unsolved symbolic rows
            found.append(dict(zip(unknowns, values)))
    if not found:
        raise CalculationError("sympy cannot solve this system in closed form")
    # nonlinsolve answers a set: order it as solve does (real solutions first), so an answer repeats.
    return sorted(found, key=lambda sol: (not all(v.is_real for v in sol.values()), str(sol)))


def _numeric_roots(equations: list, unknowns: list) -> list[dict]:
    """One polynomial equation sympy cannot solve symbolically: all its roots numerically (real ones first)."""
    import sympy

    if len(equations) != 1 or len(unknowns) != 1 or not _is_polynomial(equations, unknowns):
        raise CalculationError("sympy cannot solve this equation in closed form")
    roots = sympy.Poly(equations[0].lhs - equations[0].rhs, unknowns[0]).nroots(n=15)
    return [{unknowns[0]: r} for r in sorted(roots, key=lambda r: not r.is_real)]
