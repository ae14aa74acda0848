"""Equation-extraction lines (line,eqn,type) and solution-classification rows (pairs or labeled)."""

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
    rid = row_id(rec, name, row.line, "id")
    return {"id": rid, "source": f"{name}:{row.line}", "group": rid, "line": line, "eqn": eqn, "type": kind}


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
        "error_type": "" if label == 0 else (error_type or "unspecified"),
    }


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
    return [
        classifier_item(f"{rid}:correct", src, group, question, good, 0, ""),
        classifier_item(f"{rid}:flawed", src, group, question, bad, 1, error_type),
    ]


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
    return parse_all(src, parse_eqn_row, many=False)


def load_pairs_rows(src: SourceRows) -> list[dict[str, Any]]:
    check_columns(src, PAIRS_FIELDS, "pairs_csv")
    return parse_all(src, parse_pairs_row, many=True)


def load_labeled_rows(src: SourceRows) -> list[dict[str, Any]]:
    check_columns(src, LABELED_FIELDS, "labeled_csv")
    return parse_all(src, parse_labeled_row, many=True)
