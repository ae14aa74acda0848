"""Per-task glue between the prepare_data splits, model outputs and the metric functions in
``metrics.py``: gold extraction, per-example tables, aggregate blocks, the verdict gold mapping and
the extractor prompt for arbitrary solution lines. Pure pandas/numpy: no model is loaded here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pandas as pd

from dagtune.evaluation.metrics import (
    coerce_expected_calls,
    equation_score,
    extractor_metrics,
    function_calling_metrics,
    score_function_call,
    split_solution_lines,
    two_stage_verdict,
    verdict_metrics,
)
from dagtune.evaluation.safe_arith import check_equation
from dagtune.formats import parse_eq, parse_function_calls

FC_GROUPS = ("dialect", "domain")
# Overall metrics compared between fine-tuned and base (``delta``); counts are left out.
FC_DELTA_KEYS = (
    "parse_ok_rate",
    "tool_name_accuracy",
    "exact_match",
    "call_exact_match",
    "arg_key_precision",
    "arg_key_recall",
    "arg_key_f1",
    "missed_call_rate",
    "false_call_rate",
)
EXTRACTOR_DELTA_KEYS = ("equation_score", "exact_match", "tag_parse_failure_rate")


def subsample(df: pd.DataFrame, max_examples: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_examples`` rows, a seeded random sample kept in the split's order (a plain head
    could be all negatives or one dialect when the split is sorted)."""
    if max_examples is None or len(df) <= max_examples:
        return df.reset_index(drop=True)
    return df.sample(n=max_examples, random_state=seed).sort_index().reset_index(drop=True)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _jsonish(value: Any) -> Any:
    """A JSON string (how prepare_data stores nested values in Parquet) or an already-decoded value."""
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            return value
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


# --------------------------------------------------------------------------------------------
# function calling
# --------------------------------------------------------------------------------------------


def expected_calls(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Gold calls of one test row.

    The rendered ``completion`` is the exact training target and the only column holding parallel
    calls, so it is read first; when it does not parse (a format change) the ``has_call`` /
    ``target_name`` / ``target_arguments`` columns are used.  ``[]`` means "no call expected".
    """
    completion = row.get("completion")
    if isinstance(completion, str):
        parsed = parse_function_calls(completion)
        if parsed is not None:
            return parsed
    has_call = row.get("has_call")
    name = row.get("target_name")
    if has_call is False or not name:
        return []
    args = _jsonish(row.get("target_arguments")) or {}
    return coerce_expected_calls({"name": str(name), "arguments": args})


def fc_rows(df: pd.DataFrame, predictions: Sequence[str | None]) -> list[dict[str, Any]]:
    """Rows for ``function_calling_metrics``: prediction, expected calls and the grouping columns."""
    rows = []
    for rec, pred in zip(df.to_dict("records"), predictions, strict=True):
        row = {"id": rec.get("id"), "prediction": pred, "expected": expected_calls(rec)}
        for g in FC_GROUPS:
            if g in df.columns:
                row[g] = str(rec.get(g) if rec.get(g) not in (None, "") else "unknown")
        rows.append(row)
    return rows


def fc_evaluate(
    df: pd.DataFrame, predictions: Sequence[str | None], *, arabic: bool
) -> tuple[dict[str, Any], pd.DataFrame]:
    """(metrics ``{overall, by_dialect, by_domain}``, per-example table) for one model's outputs."""
    rows = fc_rows(df, predictions)
    metrics = function_calling_metrics(rows, FC_GROUPS, arabic=arabic)
    table = []
    for r in rows:
        s = score_function_call(r["prediction"], r["expected"], arabic=arabic)
        parsed = parse_function_calls(r["prediction"])
        table.append(
            {
                "id": r["id"],
                **{g: r.get(g) for g in FC_GROUPS if g in r},
                "expected": _json(r["expected"]),
                "prediction": r["prediction"],
                "parsed": None if parsed is None else _json(parsed),
                **s,
            }
        )
    return metrics, pd.DataFrame(table)


def deltas(ft: dict[str, Any], base: dict[str, Any], keys: Sequence[str]) -> dict[str, float | None]:
    """``ft - base`` per metric; None where either side is None (empty denominator)."""
    out: dict[str, float | None] = {}
    for k in keys:
        a, b = ft.get(k), base.get(k)
        out[k] = None if a is None or b is None else float(a) - float(b)
    return out


def fc_delta_block(ft: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``{metric: ft - base}`` over the overall block, plus ``by_dialect``/``by_domain`` deltas for
    groups present in both."""
    out: dict[str, Any] = deltas(ft["overall"], base["overall"], FC_DELTA_KEYS)
    for g in FC_GROUPS:
        key = f"by_{g}"
        if key in ft and key in base:
            out[key] = {
                name: deltas(ft[key][name], base[key][name], FC_DELTA_KEYS)
                for name in ft[key]
                if name in base[key]
            }
    return out


# --------------------------------------------------------------------------------------------
# extractor
# --------------------------------------------------------------------------------------------


def extractor_evaluate(
    df: pd.DataFrame, predictions: Sequence[str | None], *, rel_tol: float
) -> tuple[dict[str, Any], pd.DataFrame]:
    rows = [
        {
            "id": rec.get("id"),
            "prediction": pred,
            "gold": rec.get("eqn") or "",
            "line_type": str(rec.get("type") or "unknown"),
        }
        for rec, pred in zip(df.to_dict("records"), predictions, strict=True)
    ]
    metrics = extractor_metrics(rows, rel_tol=rel_tol)
    table = []
    for r in rows:
        pred_eqn = parse_eq(r["prediction"])
        table.append(
            {
                "id": r["id"],
                "line_type": r["line_type"],
                "gold": r["gold"],
                "prediction": r["prediction"],
                "pred_eqn": pred_eqn,
                "tag_parse_failure": pred_eqn is None,
                "score": equation_score(pred_eqn, r["gold"], rel_tol=rel_tol),
                "exact_match": pred_eqn is not None
                and "".join(pred_eqn.split()) == "".join(r["gold"].split()),
            }
        )
    return metrics, pd.DataFrame(table)


class ExtractorPrompt:
    """Renders the extractor prompt for any line exactly as prepare_data rendered its rows.

    A reference row whose ``line`` occurs exactly once in its ``prompt`` gives the text before and
    after the line (chat template, instruction); a new line goes in between.  No tokenizer or
    template is needed, and the prompt cannot drift from what the extractor was trained on.
    """

    def __init__(self, prefix: str, suffix: str) -> None:
        self.prefix, self.suffix = prefix, suffix

    @classmethod
    def from_rows(cls, df: pd.DataFrame) -> ExtractorPrompt:
        for rec in df.to_dict("records"):
            line, prompt = rec.get("line"), rec.get("prompt")
            if isinstance(line, str) and isinstance(prompt, str) and line and prompt.count(line) == 1:
                i = prompt.index(line)
                return cls(prompt[:i], prompt[i + len(line) :])
        raise ValueError("no extractor row whose prompt contains its line exactly once")

    def __call__(self, line: str) -> str:
        return f"{self.prefix}{line}{self.suffix}"


# --------------------------------------------------------------------------------------------
# two-stage verdict
# --------------------------------------------------------------------------------------------


def _norm_type(value: Any) -> str:
    return str(value or "").strip().lower().replace("-", "_").replace(" ", "_")


def gold_verdict(label: Any, error_type: Any, computational_types: Sequence[str]) -> str:
    """``correct`` for label 0; for label 1 ``computational_error`` when ``error_type`` (case- and
    separator-insensitive) is one of ``computational_types``, else ``conceptual_error`` (a type
    outside the vocabulary is counted in the verdict's ``unmapped_error_types``, see
    ``unmapped_error_types``)."""
    if int(label) == 0:
        return "correct"
    wanted = {_norm_type(t) for t in computational_types}
    return "computational_error" if _norm_type(error_type) in wanted else "conceptual_error"


def unmapped_error_types(
    labels: Sequence[Any], error_types: Sequence[Any], computational_types: Sequence[str]
) -> dict[str, int]:
    """Flawed rows scored as ``conceptual_error`` only because their type is in neither
    ``computational_types`` nor the conceptual vocabulary (``dagtune.data.math_tasks``): value -> rows."""
    from dagtune.data.math_tasks import canonical_error_type

    wanted = {_norm_type(t) for t in computational_types}
    out: Counter[str] = Counter()
    for label, et in zip(labels, error_types, strict=True):
        raw = str(et or "")
        if int(label) == 1 and _norm_type(raw) not in wanted and canonical_error_type(raw) != "conceptual":
            out[raw or "(empty)"] += 1
    return dict(sorted(out.items()))


def stage_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per gold class: rows the arithmetic stage decided (a false equation), rows that went to the
    classifier, rows with at least one uncheckable equation and the uncheckable equations themselves."""
    out = {}
    for gold, rows in table.groupby("gold", sort=True):
        decided = int((rows["stage"] == "arithmetic").sum())
        out[str(gold)] = {
            "n": len(rows),
            "arithmetic": decided,
            "classifier": len(rows) - decided,
            "rows_with_uncheckable": int((rows["n_uncheckable"] > 0).sum()),
            "uncheckable_equations": int(rows["n_uncheckable"].sum()),
        }
    return out


def solution_lines(solutions: Sequence[str]) -> list[list[str]]:
    return [split_solution_lines(s if isinstance(s, str) else "") for s in solutions]


def verdict_evaluate(
    df: pd.DataFrame,
    lines: list[list[str]],
    line_outputs: list[list[str | None]],
    prob_flawed: Sequence[float],
    threshold: float,
    computational_types: Sequence[str],
    rel_tol: float = 1e-5,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics and per-solution table of the two-stage verdict.

    ``line_outputs[i][j]`` is the extractor's raw text for line j of solution i; a tag-parse failure
    yields no equation for that line (no evidence, never a crash), an uncheckable equation is skipped
    by ``two_stage_verdict``.  The classifier flags a solution when ``prob >= threshold``.
    ``rel_tol`` is ``evaluate.rel_tol``.  ``stages_by_class`` says per gold class how many rows each
    stage decided and how many had uncheckable equations.
    """
    table = []
    for rec, ls, outs, p in zip(df.to_dict("records"), lines, line_outputs, prob_flawed, strict=True):
        eqns = [parse_eq(o) for o in outs]
        checks = [None if not e else check_equation(e, rel_tol) for e in eqns]
        flawed = bool(p >= threshold) if p == p else True  # NaN probability: treat as flagged
        table.append(
            {
                "id": rec.get("id"),
                "gold": gold_verdict(rec.get("label", 0), rec.get("error_type"), computational_types),
                "pred": two_stage_verdict(eqns, flawed, rel_tol),
                "stage": "arithmetic" if False in checks else "classifier",
                "n_uncheckable": sum(1 for e, c in zip(eqns, checks, strict=True) if e and c is None),
                "error_type": str(rec.get("error_type") or ""),
                "n_lines": len(ls),
                "lines": _json(ls),
                "equations": _json(eqns),
                "checks": _json(checks),
                "prob_flawed": float(p),
                "classifier_flawed": flawed,
            }
        )
    out = pd.DataFrame(table)
    if out.empty:
        return {"n": 0}, out
    metrics = verdict_metrics(out["gold"].tolist(), out["pred"].tolist())
    metrics["n_lines"] = int(sum(len(ls) for ls in lines))
    metrics["n_equations"] = int(sum(bool(e) for outs in line_outputs for e in map(parse_eq, outs)))
    metrics["threshold"] = float(threshold)
    metrics["stages_by_class"] = stage_counts(out)
    metrics["unmapped_error_types"] = unmapped_error_types(
        df.get("label", pd.Series([0] * len(df))).tolist(), out["error_type"].tolist(), computational_types
    )
    return metrics, out
