"""Equation-extraction lines (line,eqn,type) and solution-classification rows (pairs or labeled).

Error-type vocabulary of ``pairs_csv`` and ``labeled_csv`` (``error_type`` of a flawed solution):
compared case-insensitively, with ``-``/space read as ``_`` and a trailing ``_error`` ignored,

* **computational** (a written calculation is wrong): ``comp``, ``computational``, ``computation``,
  ``calc``, ``calculation``, ``arithmetic``;
* **conceptual** (the reasoning is wrong): ``concep``, ``conceptual``, ``concept``, ``logic``,
  ``logical``, ``reasoning``, ``wrong_operation``, ``final_answer`` (the last two are the synthetic
  generator's).

A known value is stored as ``computational`` or ``conceptual``.  Any other value is kept as written and
reported in ``bad_rows.jsonl`` (``unknown error_type``, action kept) and so counted in ``stats.json``; a
flawed row without a type is stored as ``unspecified`` and reported the same way (``no error_type``).
Neither is mapped to a class here: ``evaluate`` scores them as ``conceptual_error`` and counts them.

``eqn_csv`` rows whose ``type`` disagrees with the arithmetic of their ``eqn`` (``flawed`` but the
equation holds, ``correct`` but it does not; ``safe_arith.check_equation``) are kept and reported
(``type disagrees with arithmetic``); an equation the checker cannot judge is not reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dagtune.data.errors import DataError
from dagtune.data.function_calling import require_fields, require_str
from dagtune.data.io import RawRow, SourceRows, row_id
from dagtune.data.split import normalize_text
from dagtune.data.tools import RowProblem

EQN_FIELDS = ("line", "eqn", "type")
PAIRS_FIELDS = ("question", "correct_answer", "wrong_answer", "error_type")
LABELED_FIELDS = ("question", "solution", "label")
EQN_TYPES = ("correct", "flawed", "missing")
LABELS = {"0": 0, "1": 1, "correct": 0, "flawed": 1, "incorrect": 1, "wrong": 1}
ERROR_TYPES = {
    **dict.fromkeys(
        ("comp", "computational", "computation", "calc", "calculation", "arithmetic"), "computational"
    ),
    **dict.fromkeys(
        (
            "concep",
            "conceptual",
            "concept",
            "logic",
            "logical",
            "reasoning",
            "wrong_operation",
            "final_answer",
        ),
        "conceptual",
    ),
}
UNSPECIFIED = "unspecified"


def canonical_error_type(value: str) -> str | None:
    """``computational`` / ``conceptual`` for a value of the vocabulary (module docstring), else None."""
    key = "_".join(value.strip().lower().replace("-", " ").split())
    return ERROR_TYPES.get(key.removesuffix("_error")) or ERROR_TYPES.get(key)


def optional_str(rec: dict[str, Any], key: str) -> str:
    value = rec.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowProblem("wrong type", f"{key} is {type(value).__name__}, expected a string")
    return value.strip()


def parse_eqn_row(row: RawRow, name: str) -> dict[str, Any]:
    rec = row.record
    require_fields(rec, EQN_FIELDS)
    line = require_str(rec, "line")
    kind = require_str(rec, "type").lower()
    if kind not in EQN_TYPES:
        raise RowProblem("bad value", f"type={kind!r}, allowed: {list(EQN_TYPES)}")
    eqn = optional_str(rec, "eqn").replace(" ", "")
    if kind == "missing" and eqn:
        raise RowProblem("inconsistent", f"type=missing but eqn={eqn!r} (must be empty)")
    if kind != "missing" and not eqn:
        raise RowProblem("missing field", f"eqn is empty for type={kind}")
    if eqn and eqn.count("=") != 1:
        raise RowProblem("bad value", f"eqn={eqn!r} must have the form lhs=rhs")
    return eqn_item(row_id(rec, name, row.line, "id"), f"{name}:{row.line}", line, eqn, kind)


def eqn_item(rid: str, source: str, line: str, eqn: str, kind: str) -> dict[str, Any]:
    """An equation-extraction example (its own group: lines of one source do not leak into each other)."""
    return {"id": rid, "source": source, "group": rid, "line": line, "eqn": eqn, "type": kind}


def parse_label(value: Any) -> int:
    if isinstance(value, bool):  # True could mean "correct" or "flawed": refuse to guess
        raise RowProblem("wrong type", f"label={value!r}, expected 0/1 or correct/flawed")
    key = str(value).strip().lower()
    if isinstance(value, float) and value.is_integer():
        key = str(int(value))
    if key not in LABELS:
        raise RowProblem("bad value", f"label={value!r}, expected 0 (correct) / 1 (flawed)")
    return LABELS[key]


def classifier_item(
    rid: str, source: str, group: str, question: str, solution: str, label: int, error_type: str
) -> dict[str, Any]:
    return {
        "id": rid,
        "source": source,
        "group": group,
        "question": question,
        "solution": solution,
        "label": label,
        "error_type": "" if label == 0 else (error_type or UNSPECIFIED),
    }


def solution_pair(
    rid: str, source: str, group: str, question: str, good: str, bad: str, error_type: str
) -> list[dict[str, Any]]:
    """A correct and a flawed solution of one question, in one group (so in one split)."""
    return [
        classifier_item(f"{rid}:correct", source, group, question, good, 0, ""),
        classifier_item(f"{rid}:flawed", source, group, question, bad, 1, error_type),
    ]


def report_error_types(src: SourceRows, items: list[dict[str, Any]]) -> None:
    """Map flawed items' error types onto the vocabulary in place; report what is not in it (kept)."""
    for item in items:
        if item["label"] == 0:
            continue
        raw = item["error_type"]
        known = canonical_error_type(raw) if raw != UNSPECIFIED else None
        if known is not None:
            item["error_type"] = known
        elif raw == UNSPECIFIED:
            src.bad.add(line_of(item), "no error_type", "flawed solution without error_type", "kept")
        else:
            allowed = "computational: comp, calc, ...; conceptual: concep, logic, ... (see math_tasks)"
            src.bad.add(line_of(item), "unknown error_type", f"error_type={raw!r}; {allowed}", "kept")


def line_of(item: dict[str, Any]) -> int:
    """Source line from an item's ``source`` ("name:line")."""
    tail = item["source"].rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def report_type_disagreements(src: SourceRows, rows: list[dict[str, Any]]) -> None:
    """Warn (rows kept) where ``type`` contradicts the gold equation's arithmetic."""
    from dagtune.evaluation.safe_arith import check_equation

    for row in rows:
        if row["type"] == "missing":
            continue
        holds = check_equation(row["eqn"])
        if holds is None or holds == (row["type"] == "correct"):
            continue
        what = "flawed but the equation holds" if holds else "correct but the equation is false"
        src.bad.add(
            line_of(row),
            "type disagrees with arithmetic",
            f"type={row['type']}, {what}: {row['eqn']!r}",
            "kept",
        )


def question_group(question: str) -> str:
    """All solutions of one problem split together: across splits they would leak the problem."""
    return "q:" + normalize_text(question)


def parse_pairs_row(row: RawRow, name: str) -> list[dict[str, Any]]:
    """One row -> a correct item and a flawed item that share a group, so both land in the same split
    (they share the question: across splits they would leak)."""
    rec = row.record
    require_fields(rec, PAIRS_FIELDS)
    question = require_str(rec, "question")
    good, bad = require_str(rec, "correct_answer"), require_str(rec, "wrong_answer")
    error_type = optional_str(rec, "error_type")
    rid, src, group = row_id(rec, name, row.line, "id"), f"{name}:{row.line}", question_group(question)
    return solution_pair(rid, src, group, question, good, bad, error_type)


def parse_labeled_row(row: RawRow, name: str) -> list[dict[str, Any]]:
    rec = row.record
    require_fields(rec, LABELED_FIELDS)
    question, solution = require_str(rec, "question"), require_str(rec, "solution")
    label = parse_label(rec["label"])
    rid = row_id(rec, name, row.line, "id")
    return [
        classifier_item(
            rid,
            f"{name}:{row.line}",
            question_group(question),
            question,
            solution,
            label,
            optional_str(rec, "error_type"),
        )
    ]


def parse_all(src: SourceRows, parse: Callable[[RawRow, str], Any], many: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for row in src.rows:
        try:
            got = parse(row, src.name)
        except RowProblem as e:
            src.bad.add(row.line, e.reason, e.detail)
            continue
        out.extend(got if many else [got])
    return out


def check_columns(src: SourceRows, fields: tuple[str, ...], fmt: str) -> None:
    """A whole file in the wrong format is one clear error, not thousands of 'missing field' rows."""
    missing = [f for f in fields if f not in src.columns]
    if missing and src.columns:
        raise DataError(f"{src.name}: format {fmt} needs columns {list(fields)}; missing {missing}")


def load_eqn_rows(src: SourceRows) -> list[dict[str, Any]]:
    check_columns(src, EQN_FIELDS, "eqn_csv")
    rows = parse_all(src, parse_eqn_row, many=False)
    report_type_disagreements(src, rows)
    return rows


def load_pairs_rows(src: SourceRows) -> list[dict[str, Any]]:
    check_columns(src, PAIRS_FIELDS, "pairs_csv")
    items = parse_all(src, parse_pairs_row, many=True)
    report_error_types(src, items)
    return items


def load_labeled_rows(src: SourceRows) -> list[dict[str, Any]]:
    check_columns(src, LABELED_FIELDS, "labeled_csv")
    items = parse_all(src, parse_labeled_row, many=True)
    report_error_types(src, items)
    return items
