"""Safe arithmetic for checking equations written by models and by people.

``safe_eval`` parses with ``ast.parse(mode="eval")`` and walks the tree itself: only numeric
literals, ``+ - * / ** %``, unary ``+``/``-`` and parentheses are allowed, with limits on text
length, node count, exponent and magnitude.  Python's ``eval`` is never used, so model output such
as ``__import__('os')`` or ``9**9**9`` is rejected in microseconds instead of being run.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable

MAX_EXPR_CHARS = 200
MAX_NODES = 200  # expression nodes (operators not counted); 200 chars cannot need more
MAX_EXPONENT = 100
MAX_MAGNITUDE = 1e100  # bound on every intermediate and final |value|
_LOG10_MAX = math.log10(MAX_MAGNITUDE)


class ArithmeticCheckError(ValueError):
    """The expression cannot be evaluated: bad syntax, division by zero, complex or non-finite result."""


class UnsafeExpression(ArithmeticCheckError):
    """The expression uses something outside plain arithmetic or exceeds a resource limit."""


Number = int | float

_BINOPS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}
_UNARYOPS: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def _checked(value: object) -> Number:
    # Every intermediate goes through here so a huge value is stopped before it can feed a
    # bigger operation (ints are exact and unbounded in Python, so this is the only brake).
    if isinstance(value, complex):
        raise ArithmeticCheckError("complex result")
    if isinstance(value, float) and not math.isfinite(value):
        raise ArithmeticCheckError("non-finite result")
    assert isinstance(value, (int, float))
    if abs(value) > MAX_MAGNITUDE:
        raise UnsafeExpression(f"magnitude exceeds {MAX_MAGNITUDE:g}")
    return value


def _power(base: Number, exp: Number) -> Number:
    if abs(exp) > MAX_EXPONENT:
        raise UnsafeExpression(f"exponent {exp!r} exceeds {MAX_EXPONENT}")
    if base == 0:
        if exp < 0:
            raise ArithmeticCheckError("zero to a negative power")
        return 0 if exp > 0 else 1
    # Estimate the size before computing: 10**100 * 10**100 is fine, (1e99)**100 is not.
    if exp * math.log10(abs(base)) > _LOG10_MAX:
        raise UnsafeExpression("power result too large")
    return base**exp


def _eval_node(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant):
        # bool is an int subclass and complex a number: both are rejected on purpose.
        if type(node.value) not in (int, float):
            raise UnsafeExpression(f"literal {node.value!r} is not a real number")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        return _checked(_UNARYOPS[type(node.op)](_eval_node(node.operand)))
    if isinstance(node, ast.BinOp):
        left = _eval_node(node.left)
        right = _eval_node(node.right)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        fn = _BINOPS.get(type(node.op))
        if fn is None:
            raise UnsafeExpression(f"operator {type(node.op).__name__} not allowed")
        return _checked(fn(left, right))
    raise UnsafeExpression(f"{type(node).__name__} not allowed")


def safe_eval(expr: str) -> float:
    """Evaluate a plain arithmetic expression; raise ``UnsafeExpression``/``ArithmeticCheckError``."""
    if not isinstance(expr, str):
        raise UnsafeExpression(f"expected str, got {type(expr).__name__}")
    expr = expr.strip()
    if len(expr) > MAX_EXPR_CHARS:
        # Checked before parsing so a megabyte of garbage costs nothing.
        raise UnsafeExpression(f"expression longer than {MAX_EXPR_CHARS} characters")
    if not expr:
        raise ArithmeticCheckError("empty expression")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ArithmeticCheckError(f"cannot parse {expr!r}: {exc}") from None
    n_nodes = sum(1 for n in ast.walk(tree) if isinstance(n, ast.expr))
    if n_nodes > MAX_NODES:
        raise UnsafeExpression(f"expression has {n_nodes} nodes (max {MAX_NODES})")
    try:
        return float(_eval_node(tree))
    except (ZeroDivisionError, OverflowError) as exc:
        raise ArithmeticCheckError(str(exc)) from None
    except RecursionError:
        raise UnsafeExpression("expression nested too deeply") from None


# --------------------------------------------------------------------------------------------
# Sanitizing math-solution text into Python arithmetic
# --------------------------------------------------------------------------------------------

_CHAR_MAP = str.maketrans(
    {
        "×": "*",
        "✕": "*",
        "✖": "*",
        "∗": "*",
        "·": "*",
        "⋅": "*",
        "•": "*",
        "÷": "/",
        "∕": "/",
        "⁄": "/",
        "−": "-",
        "–": "-",
        "—": "-",
        "‒": "-",
        "﹣": "-",
        "－": "-",
        "＋": "+",
        "（": "(",
        "）": ")",
        "[": "(",
        "]": ")",
        "{": "(",
        "}": ")",
        "²": "**2",
        "³": "**3",
        "٫": ".",  # Arabic decimal separator
        "٬": "",  # Arabic thousands separator
        "،": ",",  # Arabic comma
        "$": "",
        "€": "",
        "£": "",
        "¥": "",
        "₹": "",
        **{chr(0x0660 + i): str(i) for i in range(10)},  # Arabic-Indic digits
        **{chr(0x06F0 + i): str(i) for i in range(10)},  # Eastern Arabic-Indic (Persian/Urdu)
    }
)
_VULGAR = {"½": "1/2", "⅓": "1/3", "⅔": "2/3", "¼": "1/4", "¾": "3/4", "⅕": "1/5", "⅛": "1/8"}
_VULGAR_RE = re.compile(r"(\d*)\s*([" + "".join(_VULGAR) + "])")
_GSM_ANNOTATION = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations <<48/2=24>>
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TIMES_X = re.compile(r"(?<=[\d)])\s*[xX]\s*(?=[\d(.])")
_PERCENT_OF = re.compile(r"%\s*(?:of|من)(?=\s|\d|\()", re.IGNORECASE)
_PERCENT = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*%(?!\s*[\d(.])")
_SCI_E = re.compile(r"(?<=\d)[eE](?=[+-]?\d)")
_WORD = re.compile(r"[^\W\d_]+")  # runs of Unicode letters (English and Arabic words, units)
_IMPLICIT_MUL_L = re.compile(r"(?<=[\d)])\(")
_IMPLICIT_MUL_R = re.compile(r"\)(?=[\d(.])")


def sanitize(side: str, *, percent_as_fraction: bool = True) -> str:
    """Turn one side of a written equation into a Python arithmetic string.

    Maps ``× · ÷ − ^ ²``, ``x`` between numbers, Arabic-Indic digits and separators; drops currency
    signs, thousand separators (``1,000``) and words/units; ``20%`` becomes ``(20/100)`` (or
    ``20`` with ``percent_as_fraction=False``), ``20% of 50`` becomes ``(20/100)*50``; ``2(3+4)``
    gets its implicit ``*``.  The result may still be unparseable; ``safe_eval`` decides.
    """
    s = _GSM_ANNOTATION.sub("", side)
    s = _VULGAR_RE.sub(
        lambda m: f"({m.group(1)}+{_VULGAR[m.group(2)]})" if m.group(1) else f"({_VULGAR[m.group(2)]})", s
    )
    s = s.translate(_CHAR_MAP)
    s = _THOUSANDS.sub("", s)
    s = s.replace("^", "**")
    s = _TIMES_X.sub("*", s)
    s = _PERCENT_OF.sub("%*", s)
    if percent_as_fraction:
        s = _PERCENT.sub(r"(\1/100)", s)
    else:
        s = _PERCENT.sub(r"\1", s)
    s = _SCI_E.sub("\x00", s)  # protect 1e-5 from the word remover
    s = _WORD.sub(" ", s).replace("\x00", "e")
    s = _IMPLICIT_MUL_L.sub("*(", s)
    s = _IMPLICIT_MUL_R.sub(")*", s)
    s = " ".join(s.split())
    # Sentence punctuation around an expression ("Total: 5+3." / "= 24.") is not arithmetic.
    return s.lstrip(",;:!? ").rstrip(".,;:!? ")


def _bare_literal_decimals(text: str) -> int | None:
    """Number of decimals when ``text`` is a bare decimal literal like ``3.33``, else None."""
    m = re.fullmatch(r"-?\d*\.(\d+)", text)
    return len(m.group(1)) if m else None


def _close(a: float, b: float, a_txt: str, b_txt: str, rel_tol: float, allow_rounding: bool) -> bool:
    if math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9):
        return True
    if allow_rounding:
        # People write 10/3 = 3.33: accept a decimal literal that is the other value rounded to
        # the digits shown.  Integers (d=0) get no such slack, so 7/2 = 3 stays wrong.
        for value, literal_txt, literal in ((a, b_txt, b), (b, a_txt, a)):
            d = _bare_literal_decimals(literal_txt)
            if d and abs(value - literal) <= 0.5 * 10.0**-d * (1 + 1e-9):
                return True
    return False


def check_equation(eqn: str | None, rel_tol: float = 1e-5, *, allow_rounding: bool = True) -> bool | None:
    """True when every side of ``eqn`` evaluates to the same value, False when not, None when unparseable.

    Chains ``a = b = c`` are checked pair by pair.  When a ``%`` appears, both readings (``20%`` as
    ``0.2`` and as ``20``) are tried so ``5/25*100 = 20%`` and ``20% of 50 = 10`` are both correct.
    """
    if not isinstance(eqn, str):
        return None
    text = _GSM_ANNOTATION.sub("", eqn).replace("==", "=")
    parts = text.split("=")
    if len(parts) < 2:
        return None
    modes = (True, False) if "%" in text else (True,)
    verdicts: list[bool] = []
    for mode in modes:
        sides = [sanitize(p, percent_as_fraction=mode) for p in parts]
        try:
            values = [safe_eval(s) for s in sides]
        except ArithmeticCheckError:
            continue
        verdicts.append(
            all(
                _close(values[i], values[i + 1], sides[i], sides[i + 1], rel_tol, allow_rounding)
                for i in range(len(values) - 1)
            )
        )
    if not verdicts:
        return None
    return any(verdicts)
