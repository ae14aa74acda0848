"""Evaluation metrics for the three fine-tunes: function calling, equation extraction, math verdicts.

Everything here is pure Python (numpy; scikit-learn imported lazily) and never raises on bad model
output: garbage, truncated or wrongly tagged text is scored as a miss.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from dagtune.data.split import fold_arabic
from dagtune.evaluation.safe_arith import ArithmeticCheckError, check_equation, safe_eval, sanitize
from dagtune.formats import parse_eq, parse_function_calls

# --------------------------------------------------------------------------------------------
# Text and value normalization
# --------------------------------------------------------------------------------------------

_NUMERIC_STR = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def normalize_arabic(text: str) -> str:
    """Unify alef variants, ى→ي, ة→ه (and the rest of the data's fold); drop tatweel and diacritics."""
    return fold_arabic(text)


def normalize_text(text: str, *, arabic: bool = False) -> str:
    """Strip, collapse whitespace, casefold; optionally apply ``normalize_arabic``."""
    text = " ".join(text.split()).casefold()
    return normalize_arabic(text) if arabic else text


def _canon_number(x: float) -> Hashable:
    f = float(x)
    if not math.isfinite(f):
        return repr(f)
    return int(f) if f.is_integer() else f  # 3, 3.0 and "3" all become 3


def normalize_value(value: Any, *, arabic: bool = False) -> Hashable:
    """Hashable canonical form of a JSON-like argument value, tagged by kind.

    Numeric strings become numbers ("3" == 3); strings are whitespace-collapsed and casefolded;
    booleans stay distinct from numbers (``True`` != ``1``) thanks to the kind tag.
    """
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", _canon_number(value))
    if isinstance(value, str):
        s = normalize_text(value, arabic=arabic)
        if _NUMERIC_STR.fullmatch(s):
            try:
                return ("num", _canon_number(float(s)))
            except (ValueError, OverflowError):
                pass
        return ("str", s)
    if isinstance(value, (list, tuple)):
        return ("list", tuple(normalize_value(v, arabic=arabic) for v in value))
    if isinstance(value, dict):
        items = ((str(k).strip(), normalize_value(v, arabic=arabic)) for k, v in value.items())
        return ("dict", tuple(sorted(items, key=lambda kv: kv[0])))
    return ("other", repr(value))


# --------------------------------------------------------------------------------------------
# Function calling
# --------------------------------------------------------------------------------------------


def _coerce_call(call: Any) -> dict[str, Any]:
    if isinstance(call, dict) and "function" in call and "name" not in call:
        call = call["function"]  # OpenAI style {"type": "function", "function": {...}}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError(f"expected call must have a string 'name': {call!r}")
    args = call.get("arguments") or {}
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError(f"expected call arguments must be an object: {args!r}")
    return {"name": call["name"].strip(), "arguments": args}


def coerce_expected_calls(expected: Any) -> list[dict[str, Any]]:
    """Gold calls as a list: None/[] → no call; one dict, a list of dicts, or FunctionGemma text.

    Raises ValueError on malformed gold data (a data bug, unlike malformed predictions).
    """
    if expected is None:
        return []
    if isinstance(expected, str):
        parsed = parse_function_calls(expected)
        if parsed is None:
            raise ValueError(f"expected call text does not parse: {expected!r}")
        return parsed
    if isinstance(expected, dict):
        return [_coerce_call(expected)]
    return [_coerce_call(c) for c in expected]


def _call_key(call: dict[str, Any], arabic: bool) -> Hashable:
    return (call["name"].strip(), normalize_value(call.get("arguments") or {}, arabic=arabic))


def _arg_keys(calls: list[dict[str, Any]]) -> Counter:
    # Keys are paired with the function name: the right key on the wrong tool is not a match.
    return Counter((c["name"].strip(), str(k).strip()) for c in calls for k in (c.get("arguments") or {}))


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    precision = tp / n_pred if n_pred else float(n_gold == 0)
    recall = tp / n_gold if n_gold else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score_function_call(prediction: str | None, expected: Any, *, arabic: bool = False) -> dict[str, Any]:
    """Per-example function-calling scores.

    ``expected``: None/[] for "no call", else a call dict, a list of calls (parallel; order-free)
    or FunctionGemma text.  Conventions: ``missed_call`` = a call was expected and no *valid* call
    came out (malformed output counts); ``false_call`` = no call expected and the model emitted call
    markup (valid or not).  Name/key fields are None on no-call examples.
    """
    gold = coerce_expected_calls(expected)
    parsed = parse_function_calls(prediction)
    parse_ok = parsed is not None
    pred = parsed or []
    positive = bool(gold)
    out: dict[str, Any] = {
        "parse_ok": parse_ok,
        "expected_call": positive,
        "predicted_call": (parsed is None and isinstance(prediction, str)) or bool(pred),
        "exact_match": parse_ok
        and Counter(_call_key(c, arabic) for c in pred) == Counter(_call_key(c, arabic) for c in gold),
        "missed_call": positive and not pred,
        "false_call": False,
        "name_correct": None,
        "arg_key_precision": None,
        "arg_key_recall": None,
        "arg_key_f1": None,
    }
    if positive:
        out["name_correct"] = bool(pred) and Counter(c["name"].strip() for c in pred) == Counter(
            c["name"] for c in gold
        )
        if pred:
            pk, gk = _arg_keys(pred), _arg_keys(gold)
            p, r, f = _prf(sum((pk & gk).values()), sum(pk.values()), sum(gk.values()))
        else:
            p = r = f = 0.0  # no usable call: a call without arguments must not score 1 here
        out.update(arg_key_precision=p, arg_key_recall=r, arg_key_f1=f)
    else:
        out["false_call"] = out["predicted_call"]
    return out


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else None


def _means(rows: list[dict[str, Any]], **fields: str) -> dict[str, float | None]:
    """{name: mean of rows[field]} for each name=field."""
    return {name: _mean(r[f] for r in rows) for name, f in fields.items()}


def _aggregate_fc(scored: list[dict[str, Any]]) -> dict[str, Any]:
    pos = [s for s in scored if s["expected_call"]]
    neg = [s for s in scored if not s["expected_call"]]
    return {
        "n": len(scored),
        "n_positive": len(pos),
        "n_negative": len(neg),
        "n_parse_fail": sum(not s["parse_ok"] for s in scored),
        "n_missed_call": sum(s["missed_call"] for s in pos),
        "n_false_call": sum(s["false_call"] for s in neg),
        **_means(scored, parse_ok_rate="parse_ok", exact_match="exact_match"),
        **_means(pos, tool_name_accuracy="name_correct", call_exact_match="exact_match"),
        **_means(pos, arg_key_precision="arg_key_precision", arg_key_recall="arg_key_recall"),
        **_means(pos, arg_key_f1="arg_key_f1", missed_call_rate="missed_call"),
        **_means(neg, false_call_rate="false_call"),
    }


def _grouped(
    rows: Sequence[dict[str, Any]], scored: list[Any], group_keys: Sequence[str], aggregate: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {"overall": aggregate(scored)}
    for key in group_keys:
        if not any(key in r for r in rows):
            continue  # grouping absent from this data set: no empty "by_" block
        groups: dict[str, list[Any]] = {}
        for row, s in zip(rows, scored, strict=True):
            groups.setdefault(str(row.get(key, "unknown")), []).append(s)
        out[f"by_{key}"] = {g: aggregate(v) for g, v in sorted(groups.items())}
    return out


def function_calling_metrics(
    rows: Sequence[dict[str, Any]],
    group_keys: Sequence[str] = ("dialect", "domain"),
    *,
    arabic: bool = False,
    pred_key: str = "prediction",
    expected_key: str = "expected",
) -> dict[str, Any]:
    """Aggregate ``score_function_call`` over rows ``{prediction, expected, dialect, domain, ...}``.

    Returns ``{"overall": {...}, "by_dialect": {value: {...}}, "by_domain": {...}}``.  Rates use
    their own denominators: name accuracy, key F1 and missed calls over rows expecting a call,
    false calls over rows expecting none; a rate with an empty denominator is None.
    """
    scored = [score_function_call(r.get(pred_key), r.get(expected_key), arabic=arabic) for r in rows]
    return _grouped(rows, scored, group_keys, _aggregate_fc)


# --------------------------------------------------------------------------------------------
# Equation extractor
# --------------------------------------------------------------------------------------------

_OP_SYMBOLS = {
    "Add": "+",
    "Sub": "-",
    "Mult": "*",
    "Div": "/",
    "Pow": "**",
    "Mod": "%",
    "USub": "u-",
    "UAdd": "u+",
}


def _tokens(expr: str) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """Numbers (rounded to 2 decimals) and operators of a sanitized expression, in reading order."""
    numbers: list[float] = []
    ops: list[str] = []

    def walk(node: ast.AST) -> None:  # in-order walk == left-to-right reading order
        if isinstance(node, ast.BinOp):
            walk(node.left)
            ops.append(_OP_SYMBOLS.get(type(node.op).__name__, "?"))
            walk(node.right)
        elif isinstance(node, ast.UnaryOp):
            ops.append(_OP_SYMBOLS.get(type(node.op).__name__, "?"))
            walk(node.operand)
        elif isinstance(node, ast.Constant):
            numbers.append(round(float(node.value), 2))

    walk(ast.parse(expr, mode="eval").body)
    return tuple(numbers), tuple(ops)


def _analyse_equation(eqn: str) -> tuple[tuple[float, float], tuple[Any, ...]] | None:
    """(lhs, rhs) values and per-side token tuples, or None if not exactly one '=' or unparseable."""
    if eqn.count("=") != 1:
        return None
    try:  # sanitize raises Uncheckable for unknowns (x=5): no arithmetic to compare
        sides = [sanitize(s) for s in eqn.split("=")]
        values = (safe_eval(sides[0]), safe_eval(sides[1]))
    except ArithmeticCheckError:
        return None
    return values, (_tokens(sides[0]), _tokens(sides[1]))


def _compact(eqn: str) -> str:
    return "".join(eqn.split())


def equation_score(pred_eqn: str | None, gold_eqn: str | None, rel_tol: float = 1e-5) -> float:
    """Rigorous 0/1 score for one extracted equation.

    1 when both are empty, or when the prediction has exactly one '=', both sides evaluate within
    ``rel_tol`` of the gold sides, and the numbers (rounded to 2 decimals) and operators appear in
    the same order as in the gold.  ``pred_eqn`` None (tag parse failure) scores 0.  A gold that is
    not a single evaluable equation falls back to whitespace-insensitive string equality.
    """
    if pred_eqn is None:
        return 0.0
    pred, gold = pred_eqn.strip(), (gold_eqn or "").strip()
    if not pred or not gold:
        return float(not pred and not gold)
    g = _analyse_equation(gold)
    if g is None:
        return float(_compact(pred) == _compact(gold))
    p = _analyse_equation(pred)
    if p is None:
        return 0.0
    values_ok = all(
        math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9) for a, b in zip(p[0], g[0], strict=True)
    )
    return float(values_ok and p[1] == g[1])


def _aggregate_extractor(scored: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "n": len(scored),
        "equation_score": _mean(s["score"] for s in scored),
        "exact_match": _mean(s["exact_match"] for s in scored),
        "tag_parse_failure_rate": _mean(s["tag_parse_failure"] for s in scored),
    }


def extractor_metrics(
    rows: Sequence[dict[str, Any]],
    *,
    pred_key: str = "prediction",
    gold_key: str = "gold",
    line_type_key: str = "line_type",
    rel_tol: float = 1e-5,
) -> dict[str, Any]:
    """Aggregate over rows ``{prediction: raw model text, gold: 'lhs=rhs' or '', line_type}``.

    ``line_type`` is correct|flawed|missing.  A gold given in ``<eq>`` tags is unwrapped.  Returns
    ``{"overall": {n, equation_score, exact_match, tag_parse_failure_rate}, "by_line_type": {...}}``.
    """
    scored = []
    for r in rows:
        pred = parse_eq(r.get(pred_key))
        gold_raw = r.get(gold_key) or ""
        gold = parse_eq(gold_raw) if "<eq>" in gold_raw else gold_raw.strip()
        gold = gold or ""
        scored.append(
            {
                "score": equation_score(pred, gold, rel_tol=rel_tol),
                "exact_match": pred is not None and _compact(pred) == _compact(gold),
                "tag_parse_failure": pred is None,
            }
        )
    return _grouped(rows, scored, (line_type_key,), _aggregate_extractor)


# --------------------------------------------------------------------------------------------
# Binary flawed-line classifier
# --------------------------------------------------------------------------------------------

CLASSIFIER_LABELS = ("correct", "flawed")


def _to_binary(y: Iterable[Any]) -> np.ndarray:
    def one(v: Any) -> int:
        if isinstance(v, str):
            if v.strip().lower() not in CLASSIFIER_LABELS:
                raise ValueError(f"unknown label {v!r}; expected one of {CLASSIFIER_LABELS}")
            return int(v.strip().lower() == "flawed")
        return int(bool(v))

    return np.array([one(v) for v in y], dtype=int)


def _prepare(y_true: Iterable[Any], prob: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    y = _to_binary(y_true)
    p = np.asarray(list(prob), dtype=float)
    if len(y) != len(p) or len(y) == 0:
        raise ValueError(f"y_true and prob must be non-empty and equally long ({len(y)} vs {len(p)})")
    # A NaN probability (broken forward pass) counts as maximally wrong rather than raising.
    bad = ~np.isfinite(p)
    p = np.where(bad, 1.0 - y, np.clip(p, 0.0, 1.0))
    return y, p


def _per_class(labels: Sequence[str], prec: Any, rec: Any, f1: Any, sup: Any) -> dict[str, dict[str, Any]]:
    """sklearn's precision_recall_fscore_support arrays as {label: {precision, recall, f1, support}}."""
    return {
        label: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(sup[i]),
        }
        for i, label in enumerate(labels)
    }


def classifier_metrics(
    y_true: Iterable[Any], prob_flawed: Iterable[float], threshold: float = 0.5
) -> dict[str, Any]:
    """Metrics for "flawed" (1) vs "correct" (0); predicted flawed when ``prob >= threshold``.

    ``confusion_matrix`` is ``[[tn, fp], [fn, tp]]`` (rows true, columns predicted, order correct,
    flawed); ``roc_auc`` is None when y_true holds one class only.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y, p = _prepare(y_true, prob_flawed)
    pred = (p >= threshold).astype(int)
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    return {
        "n": int(len(y)),
        "threshold": float(threshold),
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(np.mean(f1)),
        "roc_auc": float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else None,
        "per_class": _per_class(CLASSIFIER_LABELS, prec, rec, f1, sup),
        "labels": list(CLASSIFIER_LABELS),
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
    }


def choose_threshold(y_true: Iterable[Any], prob: Iterable[float], metric: str = "macro_f1") -> float:
    """Threshold maximizing ``metric`` (macro_f1 | accuracy | f1_flawed | balanced_accuracy) on validation data.

    Candidates are midpoints between consecutive distinct probabilities (plus "all flawed" and
    "none flawed"), so the threshold does not sit exactly on a validation score; ties go to the
    candidate closest to 0.5.  All candidates are scored at once with cumulative counts (O(n log n)).
    """
    y, p = _prepare(y_true, prob)
    u = np.unique(p)
    cands = np.concatenate([[u[0]], (u[:-1] + u[1:]) / 2, [np.nextafter(u[-1], np.inf)]])
    order = np.argsort(p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    pos_before = np.concatenate([[0], np.cumsum(y_sorted)])  # positives strictly below index i
    idx = np.searchsorted(p_sorted, cands, side="left")  # first index predicted flawed
    n, n_pos = len(y), int(y.sum())
    n_neg = n - n_pos
    tp = n_pos - pos_before[idx]
    pred_pos = n - idx
    fp = pred_pos - tp
    fn = n_pos - tp
    tn = n_neg - fp

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros(len(a), dtype=float), where=b > 0)

    f1_pos = ratio(2.0 * tp, 2.0 * tp + fp + fn)
    f1_neg = ratio(2.0 * tn, 2.0 * tn + fn + fp)
    scores = {
        "macro_f1": (f1_pos + f1_neg) / 2,
        "accuracy": (tp + tn) / n,
        "f1_flawed": f1_pos,
        "balanced_accuracy": (ratio(tp, np.full(len(tp), n_pos)) + ratio(tn, np.full(len(tn), n_neg))) / 2,
    }
    if metric not in scores:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(scores)}")
    s = scores[metric]
    best = np.flatnonzero(np.isclose(s, s.max(), rtol=0, atol=1e-12))
    return float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])


# --------------------------------------------------------------------------------------------
# Two-stage math verdict
# --------------------------------------------------------------------------------------------

VERDICT_LABELS = ("correct", "conceptual_error", "computational_error")

_FINAL_ANSWER = re.compile(
    r"""^\s*(?:
        \#{2,}                                            # #### 42
      | (?:final\s+)?answer\s*[:：=]                     # Answer: 42
      | (?:(?:so|therefore|thus|hence)\s*,?\s*)?the\s+(?:final\s+)?answer\s+is\b
      | \\boxed\{.*\}\s*\.?\s*$                           # a lone \boxed{42}
      | ال[اأإآ]جاب[ةه](?:\s+النهائي[ةه])?\s*(?:[:：=]|هي\b)   # الإجابة: 42 / الإجابة هي 42
      | الجواب(?:\s+النهائي)?\s*(?:[:：=]|هو\b)
    )""",
    re.IGNORECASE | re.VERBOSE,
)


def split_solution_lines(solution: str) -> list[str]:
    """Non-blank, stripped lines of a solution, without final-answer lines (``#### 42``, ``Answer: 42``...)."""
    return [line.strip() for line in solution.splitlines() if line.strip() and not _FINAL_ANSWER.match(line)]


def two_stage_verdict(
    line_equations: Sequence[str | None], classifier_says_flawed: bool, rel_tol: float = 1e-5
) -> str:
    """``computational_error`` if any extracted equation is arithmetically false, else
    ``conceptual_error`` if the classifier flags the solution, else ``correct``.

    Empty/None equations and uncheckable ones (``check_equation`` None: unknowns, unparseable) are
    skipped, never failures: the arithmetic stage only fires on evidence.  ``rel_tol`` is
    ``evaluate.rel_tol``, the same tolerance as the equation score.
    """
    if any(eqn and check_equation(eqn, rel_tol) is False for eqn in line_equations):
        return "computational_error"
    return "conceptual_error" if classifier_says_flawed else "correct"


def verdict_metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, Any]:
    """Accuracy, weighted and macro F1 over the three verdict classes, per-class scores, confusion matrix.

    Macro F1 always averages all three classes (a class absent from both lists scores 0), so runs
    stay comparable; a prediction outside the three labels simply counts as wrong.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise ValueError("y_true and y_pred must be non-empty and equally long")
    labels = list(VERDICT_LABELS)
    yt, yp = [str(v) for v in y_true], [str(v) for v in y_pred]
    prec, rec, f1, sup = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    total = sup.sum()
    return {
        "n": len(yt),
        "accuracy": float(np.mean([a == b for a, b in zip(yt, yp, strict=True)])),
        "macro_f1": float(np.mean(f1)),
        "weighted_f1": float((f1 * sup).sum() / total) if total else 0.0,
        "per_class": _per_class(labels, prec, rec, f1, sup),
        "labels": labels,
        "confusion_matrix": confusion_matrix(yt, yp, labels=labels).tolist(),
    }
