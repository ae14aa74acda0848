"""Safe arithmetic for checking equations written by models and by people.

``exact_eval`` parses with ``ast.parse(mode="eval")`` and walks the tree itself: only numeric
literals, ``+ - * / // ** %``, unary ``+``/``-`` and parentheses are allowed, with limits on text
length, node count, exponent and magnitude.  Python's ``eval`` is never used, so model output such
as ``__import__('os')`` or ``9**9**9`` is rejected in microseconds instead of being run.

Semantics of ``check_equation`` (True = every ``=`` holds, False = one does not, None = uncheckable):

* **Length first.**  Text longer than ``MAX_EQUATION_CHARS`` is uncheckable before any regex runs,
  so the cost of a check is bounded whatever a model emits (a 20,000-digit line returns at once).
* **Unknowns make an equation uncheckable.**  A single Latin letter (``2c``, ``x+5``, ``0.20*M``)
  or a word in an operand position (``price*2``, ``2*price``) is an unknown: the equation is algebra,
  not arithmetic, and gives None.  The articles ``a``/``A``/``I`` before a word are prose.
* **Units are dropped with their slash.**  A word after a number (``600 miles``, ``5kg``, ``$12.50 per
  hour``) is a unit; ``/word`` after a number or a unit (``20/week``, ``miles/gallon``, ``km/h``) is a
  per-unit and goes with its slash, so ``20/week*52/year`` is ``20*52``.  Other words are prose and
  are dropped; a hyphen between letters (``pre-state``) is part of the prose, not a minus.
* **Prose between numbers.**  When prose or sentence punctuation separates two operands
  (``80% of them ... 100 - 20 = 80``), the arithmetic is the run next to the ``=``: the last run of
  the first side, the first run of the last side.  Such a reading can prove an equation True; it
  never proves it False (the cut may be wrong), which gives None instead.
* **Percent.**  ``20%`` is read both as ``0.2`` and as ``20`` (``5/25*100 = 20%`` and ``20% of 50 =
  10`` are both right); ``% of`` multiplies only when a number follows (``20% of 50``), never a word.
  ``%`` between two numbers (``17 % 5``) is Python's modulo.
* **Operators as in Python.**  ``//`` is floor division and ``%`` modulo with Python's signs
  (``-7 // 2 = -4``, ``-7 % 3 = 2``); ``^`` is a power.
* **Exact arithmetic.**  Literals are exact rationals (``0.1 + 0.2 = 0.3`` holds).  When both sides
  are integers they are compared exactly (``450000-200000=249999`` is False whatever ``rel_tol``).
  Otherwise a side is accepted when it equals the other, is within ``rel_tol`` of it, or both agree
  once rounded half away from zero to the number of decimals written on the right-hand side: the
  writer's precision (``10/3 = 3.33``, ``12/48 = 0.3`` and ``66.67*1.50 = 100`` hold; ``12/48 = 0.2``,
  ``2/3 = 0.66`` and ``7/2 = 3`` do not; ``10/3 = 3`` holds at 0 decimals).
* **Chains** ``a = b = c`` are checked pair by pair, each pair at its right member's precision.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from fractions import Fraction

MAX_EQUATION_CHARS = 1000  # raw text (prose included); checked before any regex
MAX_EXPR_CHARS = 200
MAX_NODES = 200  # expression nodes (operators not counted); 200 chars cannot need more
MAX_EXPONENT = 100
MAX_MAGNITUDE = 1e100  # bound on every intermediate and final |value|
_LOG10_MAX = math.log10(MAX_MAGNITUDE)


class ArithmeticCheckError(ValueError):
    """The expression cannot be evaluated: bad syntax, division by zero, complex or non-finite result."""


class UnsafeExpression(ArithmeticCheckError):
    """The expression uses something outside plain arithmetic or exceeds a resource limit."""


class Uncheckable(ArithmeticCheckError):
    """The text is not plain arithmetic: it has unknowns (``x+5``, ``0.20*M``) or is too long."""


Number = Fraction | float

_BINOPS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARYOPS: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def _checked(value: object) -> Number:
    # Every intermediate goes through here so a huge value is stopped before it can feed a
    # bigger operation (rationals are exact and unbounded, so this is the only brake).
    if isinstance(value, complex):
        raise ArithmeticCheckError("complex result")
    if isinstance(value, float) and not math.isfinite(value):
        raise ArithmeticCheckError("non-finite result")
    if isinstance(value, int):  # Fraction // Fraction is an int
        value = Fraction(value)
    assert isinstance(value, (Fraction, float))
    if abs(value) > MAX_MAGNITUDE:
        raise UnsafeExpression(f"magnitude exceeds {MAX_MAGNITUDE:g}")
    return value


def _literal(value: object) -> Number:
    # bool is an int subclass and complex a number: both are rejected on purpose.
    if type(value) not in (int, float):
        raise UnsafeExpression(f"literal {value!r} is not a real number")
    if isinstance(value, float):
        _checked(value)  # inf (1e999) is refused before it reaches Fraction
        return _checked(Fraction(repr(value)))  # the decimal as written: 0.1 is exactly 1/10
    return _checked(Fraction(value))


def _power(base: Number, exp: Number) -> Number:
    if abs(exp) > MAX_EXPONENT:
        raise UnsafeExpression(f"exponent {exp!r} exceeds {MAX_EXPONENT}")
    if base == 0:
        if exp < 0:
            raise ArithmeticCheckError("zero to a negative power")
        return Fraction(0 if exp > 0 else 1)
    # Estimate the size before computing: 10**100 * 10**100 is fine, (1e99)**100 is not.
    if exp * math.log10(abs(base)) > _LOG10_MAX:
        raise UnsafeExpression("power result too large")
    return base**exp  # a Fraction for an integer exponent, else a float (4**0.5) or complex


def _eval_node(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant):
        return _literal(node.value)
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


def exact_eval(expr: str) -> Number:
    """Evaluate a plain arithmetic expression exactly (a ``Fraction``; a float only after a
    fractional power); raise ``UnsafeExpression``/``ArithmeticCheckError``."""
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
        return _eval_node(tree)
    except (ZeroDivisionError, OverflowError) as exc:
        raise ArithmeticCheckError(str(exc)) from None
    except RecursionError:
        raise UnsafeExpression("expression nested too deeply") from None


def safe_eval(expr: str) -> float:
    """``exact_eval`` as a float."""
    return float(exact_eval(expr))


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
# (?<!\d) keeps every regex here linear: without it each position inside a digit run rescans it.
_VULGAR_RE = re.compile(r"(?:(?<!\d)(\d+)\s*)?([" + "".join(_VULGAR) + "])")
_GSM_ANNOTATION = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations <<48/2=24>>
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TIMES_X = re.compile(r"(?<=[\d)])\s*[xX]\s*(?=[\d(.])")
_PERCENT_OF = re.compile(r"%\s*(?:of|من)(?=\s*[\d(.])", re.IGNORECASE)  # "of" a number, not a word
_PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?|\.\d+)\s*%(?!\s*[\d(.])")
_SCI_E = re.compile(r"(?<=\d)[eE](?=[+-]?\d)")
_HYPHENATED = re.compile(r"(?<=[^\W\d_])-(?=[^\W\d_])")  # pre-state, well-known: prose, not minus
_TOKEN = re.compile(
    r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:\x00[+-]?\d+)?)"  # \x00 stands for the e of 1e-5
    r"|(?P<word>[^\W\d_]+)"  # runs of Unicode letters: English and Arabic words, units, unknowns
    r"|(?P<op>\*\*|//|[-+*/%])"
    r"|(?P<open>\()|(?P<close>\))"
    r"|(?P<punct>[,;:!?])"  # sentence punctuation between numbers separates them like prose
    r"|(?P<space>\s+)"
    r"|(?P<other>.)",
    re.DOTALL,
)
_ARTICLES = frozenset({"a", "A", "I"})
_IMPLICIT_MUL_L = re.compile(r"(?<=[\d)])\(")
_IMPLICIT_MUL_R = re.compile(r"\)(?=[\d(.])")
_DECIMALS = re.compile(r"\.(\d+)")


def _prepare(side: str, percent_as_fraction: bool) -> str:
    """Symbols, digits, separators and percentages mapped to Python arithmetic; words still in."""
    s = _GSM_ANNOTATION.sub("", side)
    s = _VULGAR_RE.sub(
        lambda m: f"({m.group(1)}+{_VULGAR[m.group(2)]})" if m.group(1) else f"({_VULGAR[m.group(2)]})", s
    )
    s = s.translate(_CHAR_MAP)
    s = _THOUSANDS.sub("", s)
    s = s.replace("^", "**")
    s = _TIMES_X.sub("*", s)
    s = _PERCENT_OF.sub("%*", s)
    s = _PERCENT.sub(r"(\1/100)" if percent_as_fraction else r"\1", s)
    s = _SCI_E.sub("\x00", s)  # protect 1e-5 from the word classifier
    return _HYPHENATED.sub(" ", s)


class _Segments:
    """Walks the tokens of one side, dropping units and prose, and cutting the arithmetic into runs
    wherever dropped words separate two operands."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.runs: list[list[str]] = [[]]
        self.last: str | None = None  # operand | unit | prose | op | open | other
        self.dropped = False  # words dropped since the last kept token
        self.has_operand = False  # the current run ends with an operand

    def next_kind(self, i: int) -> tuple[int, str | None, str]:
        j = i + 1
        while j < len(self.tokens) and self.tokens[j][0] == "space":
            j += 1
        return (j, *self.tokens[j]) if j < len(self.tokens) else (j, None, "")

    def keep(self, kind: str, text: str) -> None:
        if kind in ("num", "open") and self.has_operand and self.dropped:
            self.runs.append([])  # "80% of them ... 100 - 20": a new run starts at 100
        self.runs[-1].append(text)
        self.has_operand = kind in ("num", "close")
        self.last = "operand" if self.has_operand else kind
        self.dropped = False

    def drop(self, what: str, spacer: str = " ") -> None:
        self.runs[-1].append(spacer)  # a space keeps "5 apples 3" from becoming 53
        self.last, self.dropped = what, True

    def word(self, i: int, text: str) -> None:
        _, nxt_kind, nxt = self.next_kind(i)
        if len(text) == 1 and text.isascii():
            if not (text in _ARTICLES and nxt_kind == "word" and len(nxt) > 1):
                raise Uncheckable(f"unknown {text!r}")
            self.drop("prose")
        elif self.last in ("operand", "unit"):
            self.drop("unit")
        elif self.last == "op" or nxt_kind == "op":
            raise Uncheckable(f"unknown {text!r}")
        else:
            self.drop("prose")

    def per_unit(self, i: int) -> int | None:
        """Index of the word in ``/word`` after a number or unit (``20/week``, ``km/h``), else None."""
        j, kind, text = self.next_kind(i)
        if kind == "word" and (self.last == "unit" or (self.last == "operand" and len(text) > 1)):
            return j
        return None

    def walk(self) -> list[str]:
        i = 0
        while i < len(self.tokens):
            kind, text = self.tokens[i]
            if kind == "word":
                self.word(i, text)
            elif kind == "op" and text == "/" and (j := self.per_unit(i)) is not None:
                # "20/week*52" is 20*52: no space is needed where an operator or the end follows
                glued = self.next_kind(j)[1] in ("op", "close", None)
                self.drop("unit", "" if glued else " ")
                i = j
            elif kind == "punct":
                self.drop("prose")
            elif kind == "space":
                self.runs[-1].append(text)
            else:
                self.keep(kind, text)
            i += 1
        return [_tidy("".join(run)) for run in self.runs if "".join(run).strip(",;:!?. ")]


def _tidy(s: str) -> str:
    s = s.replace("\x00", "e")
    s = _IMPLICIT_MUL_L.sub("*(", s)
    s = _IMPLICIT_MUL_R.sub(")*", s)
    s = " ".join(s.split())
    # Sentence punctuation around an expression ("= 24.") is not arithmetic.
    return s.lstrip(",;:!? ").rstrip(".,;:!? ")


def _check_length(text: str) -> None:
    if len(text) > MAX_EQUATION_CHARS:
        raise Uncheckable(f"text longer than {MAX_EQUATION_CHARS} characters")


def arithmetic_runs(side: str, *, percent_as_fraction: bool = True) -> list[str]:
    """The arithmetic runs of one side of a written equation, in order (usually one; several when
    prose separates numbers).  Raises ``Uncheckable`` for unknowns or over-long text."""
    _check_length(side)
    prepared = _prepare(side, percent_as_fraction)
    tokens = [(m.lastgroup or "other", m.group()) for m in _TOKEN.finditer(prepared)]
    return _Segments(tokens).walk()


def sanitize(side: str, *, percent_as_fraction: bool = True) -> str:
    """Turn one side of a written equation into a Python arithmetic string.

    Maps ``× · ÷ − ^ ²``, ``x`` between numbers, Arabic-Indic digits and separators; drops currency
    signs, thousand separators (``1,000``), units (``/unit`` with its slash) and prose; ``20%``
    becomes ``(20/100)`` (or ``20`` with ``percent_as_fraction=False``), ``20% of 50`` becomes
    ``(20/100)*50``; ``2(3+4)`` gets its implicit ``*``.  Raises ``Uncheckable`` for unknowns
    (``0.20*M``) and text over ``MAX_EQUATION_CHARS``.  Runs separated by prose come back separated
    by a space, so the result does not parse; ``safe_eval`` decides.
    """
    return " ".join(arithmetic_runs(side, percent_as_fraction=percent_as_fraction))


# --------------------------------------------------------------------------------------------
# Checking equations
# --------------------------------------------------------------------------------------------


def _decimals(text: str) -> int:
    """Decimals the writer used: the most digits after a point among the literals of ``text``."""
    return max((len(d) for d in _DECIMALS.findall(text)), default=0)


def _round_half_away(value: Number, decimals: int) -> Fraction:
    scaled = Fraction(value) * 10**decimals
    rounded = math.floor(abs(scaled) + Fraction(1, 2))
    return Fraction(rounded if scaled >= 0 else -rounded, 10**decimals)


def _is_integer(value: Number) -> bool:
    return value.denominator == 1 if isinstance(value, Fraction) else float(value).is_integer()


def values_agree(left: Number, right: Number, right_text: str, rel_tol: float, allow_rounding: bool) -> bool:
    """One ``left = right`` under the module's semantics (integers exact; otherwise ``rel_tol`` or the
    right side's written precision, rounded half away from zero)."""
    if left == right:
        return True
    if _is_integer(left) and _is_integer(right):
        return False
    if math.isclose(float(left), float(right), rel_tol=rel_tol, abs_tol=1e-9):
        return True
    if allow_rounding:
        d = _decimals(right_text)
        return _round_half_away(left, d) == _round_half_away(right, d)
    return False


def _reading(runs_per_side: list[list[str]]) -> list[str] | None:
    """One expression per side: the run next to the ``=`` (last of the first side, first of the
    last); a middle side of a chain must be a single run."""
    n = len(runs_per_side)
    out = []
    for i, runs in enumerate(runs_per_side):
        if not runs or (0 < i < n - 1 and len(runs) > 1):
            return None
        out.append(runs[-1] if i == 0 else runs[0])
    return out


def _check_mode(
    parts: list[str], percent_as_fraction: bool, rel_tol: float, allow_rounding: bool
) -> bool | None:
    runs = [arithmetic_runs(p, percent_as_fraction=percent_as_fraction) for p in parts]
    sides = _reading(runs)
    if sides is None:
        return None
    try:
        values = [exact_eval(s) for s in sides]
    except ArithmeticCheckError:
        return None
    ok = all(
        values_agree(values[i], values[i + 1], sides[i + 1], rel_tol, allow_rounding)
        for i in range(len(values) - 1)
    )
    if not ok and any(len(r) > 1 for r in runs):
        return None  # prose cut the side: the reading may be the wrong one, so no evidence of an error
    return ok


def check_equation(eqn: str | None, rel_tol: float = 1e-5, *, allow_rounding: bool = True) -> bool | None:
    """True when every side of ``eqn`` has the same value, False when not, None when uncheckable
    (no ``=``, unknowns, unparseable, too long).  See the module docstring for the semantics."""
    if not isinstance(eqn, str) or len(eqn) > MAX_EQUATION_CHARS:
        return None  # before any regex: the cost of a check is bounded by the cap
    text = _GSM_ANNOTATION.sub("", eqn).replace("==", "=")
    parts = text.split("=")
    if len(parts) < 2:
        return None
    modes = (True, False) if "%" in text else (True,)
    try:
        verdicts = [_check_mode(parts, mode, rel_tol, allow_rounding) for mode in modes]
    except Uncheckable:
        return None
    if True in verdicts:
        return True
    return False if False in verdicts else None
