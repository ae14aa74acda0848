"""Issue 13's limits on the shape of dagtune's code, kept by CI: no function over 80 lines or over
cyclomatic complexity 15 (radon), and the training package within 1,300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from radon.complexity import cc_visit

PACKAGE = Path(__file__).resolve().parent.parent / "dagtune"


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_function_over_80_lines():
    long = [
        f"{p.relative_to(PACKAGE.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for p in _sources()
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > 80
    ]
    assert not long, long


def _functions(blocks: list) -> list:
    """radon's blocks flattened: a class's methods and every function's closures are scored too."""
    out = []
    for b in blocks:
        inner = getattr(b, "methods", None)
        out += _functions(inner) if inner is not None else [b, *_functions(b.closures)]
    return out


def _over(limit: int) -> list[str]:
    return [
        f"{p.relative_to(PACKAGE.parent)}:{b.lineno} {b.fullname} ({b.complexity})"
        for p in _sources()
        for b in _functions(cc_visit(p.read_text(encoding="utf-8")))
        if b.complexity > limit
    ]


def test_no_function_over_complexity_15():
    assert not _over(15), _over(15)
    assert any("cli.py" in x and " main " in x for x in _over(10))  # the scan sees what radon's CLI rates C


def test_training_package_within_1300_lines():
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (PACKAGE / "training").glob("*.py"))
    assert lines <= 1300, lines
