"""Hand-computed expectations for every metric; bad model output must score as a miss, never raise."""

from __future__ import annotations

import numpy as np
import pytest

from dagtune.evaluation.metrics import (
    choose_threshold,
    classifier_metrics,
    equation_score,
    extractor_metrics,
    function_calling_metrics,
    normalize_arabic,
    normalize_value,
    score_function_call,
    split_solution_lines,
    two_stage_verdict,
    verdict_metrics,
)
from dagtune.formats import format_function_call, format_function_calls

# ------------------------------------------------------------------ normalization


@pytest.mark.parametrize(
    "raw,normalized",
    [
        ("أحمد", "احمد"),
        ("إسلام", "اسلام"),
        ("آمال", "امال"),
        ("ٱلله", "الله"),
        ("على", "علي"),
        ("مدرسة", "مدرسه"),
        ("مُحَمَّدٌ", "محمد"),
        ("كـتـاب", "كتاب"),
        ("Cairo", "Cairo"),
    ],
)
def test_normalize_arabic(raw: str, normalized: str) -> None:
    assert normalize_arabic(raw) == normalized


def test_normalize_value_rules() -> None:
    assert normalize_value("3") == normalize_value(3) == normalize_value(3.0)
    assert normalize_value(" 2.50 ") == normalize_value(2.5)
    assert normalize_value("  New   YORK ") == normalize_value("new york")
    assert normalize_value(True) != normalize_value(1)
    assert normalize_value("true") != normalize_value(True)
    assert normalize_value({"b": 1, "a": [1, "X"]}) == normalize_value({"a": ["1", "x"], "b": "1"})
    assert normalize_value("أحمد") != normalize_value("احمد")
    assert normalize_value("أحمد", arabic=True) == normalize_value("احمد", arabic=True)


# ------------------------------------------------------------------ function calling


def call(fn: str, /, **arguments: object) -> str:
    return format_function_call(fn, arguments)


def test_arabic_normalization_only_when_enabled() -> None:
    expected = {"name": "book_table", "arguments": {"name": "أحمد", "guests": 2}}
    pred = call("book_table", name="احمد", guests="2")
    assert score_function_call(pred, expected)["exact_match"] is False
    assert score_function_call(pred, expected, arabic=True)["exact_match"] is True
    # The name and keys still match either way; only the value comparison changes.
    assert score_function_call(pred, expected)["name_correct"] is True
    assert score_function_call(pred, expected)["arg_key_f1"] == 1.0


def test_arg_key_precision_recall_f1() -> None:
    expected = {"name": "weather", "arguments": {"city": "Cairo", "days": 3, "unit": "C"}}
    s = score_function_call(call("weather", city="Cairo", days=3, extra=1), expected)
    assert s["arg_key_precision"] == pytest.approx(2 / 3)
    assert s["arg_key_recall"] == pytest.approx(2 / 3)
    assert s["arg_key_f1"] == pytest.approx(2 / 3)
    assert s["name_correct"] is True and s["exact_match"] is False
    # Right keys on the wrong tool do not count.
    wrong_tool = score_function_call(call("forecast", city="Cairo", days=3, unit="C"), expected)
    assert wrong_tool["name_correct"] is False and wrong_tool["arg_key_f1"] == 0.0


def test_parallel_calls_are_order_free() -> None:
    a = {"name": "weather", "arguments": {"city": "Tokyo"}}
    b = {"name": "stock", "arguments": {"ticker": "GOOG"}}
    s = score_function_call(format_function_calls([b, a]), [a, b])
    assert s["exact_match"] is True and s["name_correct"] is True and s["arg_key_f1"] == 1.0
    only_one = score_function_call(format_function_calls([a]), [a, b])
    assert only_one["exact_match"] is False and only_one["name_correct"] is False
    assert only_one["arg_key_precision"] == 1.0 and only_one["arg_key_recall"] == 0.5


def test_no_argument_call_missed_scores_zero_keys() -> None:
    s = score_function_call("no call here", {"name": "ping", "arguments": {}})
    assert s["missed_call"] is True and s["arg_key_f1"] == 0.0
    ok = score_function_call(call("ping"), {"name": "ping", "arguments": {}})
    assert ok["exact_match"] is True and ok["arg_key_f1"] == 1.0


def test_expected_call_formats() -> None:
    pred = call("f", x=1)
    for expected in (
        {"name": "f", "arguments": {"x": 1}},
        {"name": "f", "arguments": '{"x": 1}'},
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
        [{"name": "f", "arguments": {"x": 1}}],
        pred,
    ):
        assert score_function_call(pred, expected)["exact_match"] is True


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        "",
        "<start_function_call>call:f{x:",
        "<start_function_call>call:f{x:1}<end_function_call> blah",
        "<eq>1=1</eq>",
        "<start_function_call>" + "[" * 5000,
        "\x00\uffff" * 100,
    ],
)
def test_garbage_is_a_miss_and_never_raises(garbage: str | None) -> None:
    pos = score_function_call(garbage, {"name": "f", "arguments": {"x": 1}})
    assert pos["exact_match"] is False and pos["missed_call"] is True and pos["name_correct"] is False
    neg = score_function_call(garbage, None)
    assert neg["missed_call"] is False
    # Malformed call markup where no call was expected is a false call.
    assert neg["false_call"] is (not neg["parse_ok"] and isinstance(garbage, str))


def _fc_rows() -> list[dict]:
    cairo = {"name": "get_weather", "arguments": {"city": "Cairo"}}
    return [
        {
            "dialect": "egy",
            "domain": "travel",
            "expected": cairo,
            "prediction": call("get_weather", city="Cairo"),
        },
        {
            "dialect": "egy",
            "domain": "travel",
            "expected": {"name": "get_weather", "arguments": {"city": "Cairo", "days": 3}},
            "prediction": call("get_weather", city="Cairo"),
        },
        {"dialect": "egy", "domain": "banking", "expected": None, "prediction": "Sorry, I can't."},
        {
            "dialect": "lev",
            "domain": "banking",
            "expected": {"name": "transfer", "arguments": {"amount": 100}},
            "prediction": "<start_function_call>call:transfer{amount:",
        },
        {"dialect": "lev", "domain": "banking", "expected": None, "prediction": call("transfer", amount=5)},
        {
            "dialect": "lev",
            "domain": "travel",
            "expected": {"name": "get_weather", "arguments": {"city": "Amman"}},
            "prediction": "It is sunny in Amman.",
        },
    ]


def test_function_calling_metrics_overall() -> None:
    m = function_calling_metrics(_fc_rows())["overall"]
    assert (m["n"], m["n_positive"], m["n_negative"]) == (6, 4, 2)
    assert (m["n_parse_fail"], m["n_missed_call"], m["n_false_call"]) == (1, 2, 1)
    assert m["parse_ok_rate"] == pytest.approx(5 / 6)
    assert m["tool_name_accuracy"] == pytest.approx(0.5)
    assert m["exact_match"] == pytest.approx(2 / 6)
    assert m["call_exact_match"] == pytest.approx(1 / 4)
    assert m["arg_key_f1"] == pytest.approx((1 + 2 / 3) / 4)
    assert m["missed_call_rate"] == pytest.approx(2 / 4)  # over positives
    assert m["false_call_rate"] == pytest.approx(1 / 2)  # over negatives


def test_function_calling_metrics_per_group() -> None:
    m = function_calling_metrics(_fc_rows())
    egy, lev = m["by_dialect"]["egy"], m["by_dialect"]["lev"]
    assert set(m["by_dialect"]) == {"egy", "lev"}
    assert (egy["tool_name_accuracy"], egy["missed_call_rate"], egy["false_call_rate"]) == (1.0, 0.0, 0.0)
    assert egy["exact_match"] == pytest.approx(2 / 3)
    assert egy["arg_key_f1"] == pytest.approx(5 / 6)
    assert (lev["tool_name_accuracy"], lev["missed_call_rate"], lev["false_call_rate"]) == (0.0, 1.0, 1.0)
    assert lev["parse_ok_rate"] == pytest.approx(2 / 3)
    travel, banking = m["by_domain"]["travel"], m["by_domain"]["banking"]
    assert travel["n_negative"] == 0 and travel["false_call_rate"] is None  # empty denominator
    assert travel["missed_call_rate"] == pytest.approx(1 / 3)
    assert banking["missed_call_rate"] == 1.0 and banking["false_call_rate"] == 0.5


def test_function_calling_metrics_skips_absent_group_keys() -> None:
    rows = [{"expected": None, "prediction": "hi"}]
    m = function_calling_metrics(rows)
    assert set(m) == {"overall"}
    assert m["overall"]["tool_name_accuracy"] is None and m["overall"]["false_call_rate"] == 0.0


# ------------------------------------------------------------------ extractor


@pytest.mark.parametrize(
    "pred,gold,score",
    [
        ("2+3=5", "2+3=5", 1.0),
        (" 2 + 3 = 5 ", "2+3=5", 1.0),
        ("3+2=5", "2+3=5", 0.0),  # same value and operators, numbers out of order
        ("2*2=4", "2+2=4", 0.0),  # same numbers and values, different operator
        ("2*3=6", "2+4=6", 0.0),  # same values, different numbers
        ("2+3=5.000001", "2+3=5", 1.0),  # within rel_tol, same at 2 decimals
        ("1.000001*2=2.000002", "1*2=2", 1.0),
        ("10/3=3.333", "10/3=3.3333", 0.0),  # same at 2 decimals, values beyond rel_tol
        ("2+3=5.1", "2+3=5", 0.0),
        ("4*5=21", "4*5=21", 1.0),  # a flawed line is extracted faithfully, wrong arithmetic and all
        ("4*5=20", "4*5=21", 0.0),
        ("2 × 3 = 6", "2*3=6", 1.0),  # both sides are sanitized
        ("$1,000 + $500 = $1,500", "1000+500=1500", 1.0),
        ("", "", 1.0),
        ("", None, 1.0),
        (None, "", 0.0),  # tag parse failure
        (None, "2+3=5", 0.0),
        ("", "2+3=5", 0.0),
        ("2+3=5", "", 0.0),
        ("2+3=5=5", "2+3=5", 0.0),  # exactly one '='
        ("2+3", "2+3=5", 0.0),
        ("__import__('os')=5", "2+3=5", 0.0),
        ("9**9**9=1", "2+3=5", 0.0),
        ("x = 5", "x=5", 1.0),  # non-arithmetic gold: string comparison fallback
        ("x = 6", "x=5", 0.0),
    ],
)
def test_equation_score(pred: str | None, gold: str | None, score: float) -> None:
    assert equation_score(pred, gold) == score


def test_extractor_metrics() -> None:
    rows = [
        {"line_type": "correct", "gold": "2+3=5", "prediction": "<eq>2+3=5</eq>"},
        {"line_type": "correct", "gold": "2+3=5", "prediction": "<eq>3+2=5</eq>"},
        {"line_type": "flawed", "gold": "4*5=21", "prediction": "<eq>4*5=21</eq><end_of_turn>"},
        {"line_type": "flawed", "gold": "4*5=21", "prediction": "4*5=21 (forgot the tags)"},
        {"line_type": "missing", "gold": "", "prediction": "<eq></eq>"},
        {"line_type": "missing", "gold": "<eq></eq>", "prediction": "<eq>5=5</eq>"},
    ]
    m = extractor_metrics(rows)
    overall = m["overall"]
    assert overall["n"] == 6
    assert overall["equation_score"] == pytest.approx(3 / 6)
    assert overall["exact_match"] == pytest.approx(3 / 6)
    assert overall["tag_parse_failure_rate"] == pytest.approx(1 / 6)
    by = m["by_line_type"]
    assert set(by) == {"correct", "flawed", "missing"}
    assert by["correct"]["equation_score"] == 0.5 and by["correct"]["tag_parse_failure_rate"] == 0.0
    assert by["flawed"]["equation_score"] == 0.5 and by["flawed"]["tag_parse_failure_rate"] == 0.5
    assert by["missing"]["equation_score"] == 0.5 and by["missing"]["n"] == 2


# ------------------------------------------------------------------ classifier

Y = [0, 0, 0, 1, 1, 1]
P = [0.05, 0.1, 0.2, 0.3, 0.6, 0.9]


def test_classifier_metrics_numbers() -> None:
    m = classifier_metrics(Y, P, threshold=0.5)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[3, 0], [1, 2]]
    assert m["per_class"]["flawed"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert m["per_class"]["correct"] == pytest.approx(
        {"precision": 0.75, "recall": 1.0, "f1": 6 / 7, "support": 3}
    )
    assert m["macro_f1"] == pytest.approx((0.8 + 6 / 7) / 2)
    assert m["roc_auc"] == pytest.approx(1.0)


def test_classifier_metrics_edge_cases() -> None:
    assert classifier_metrics([1, 1], [0.2, 0.9])["roc_auc"] is None
    strings = classifier_metrics(["correct", "flawed"], [0.1, 0.7])
    assert strings["accuracy"] == 1.0
    # A NaN probability counts as a wrong prediction instead of raising.
    nan = classifier_metrics([0, 1], [0.1, float("nan")])
    assert nan["accuracy"] == 0.5 and nan["confusion_matrix"] == [[1, 0], [1, 0]]
    with pytest.raises(ValueError):
        classifier_metrics([0, 1], [0.5])


def test_choose_threshold() -> None:
    assert choose_threshold(Y, P) == pytest.approx(0.25)  # midpoint of the separating gap
    assert choose_threshold(Y, P, metric="accuracy") == pytest.approx(0.25)
    assert classifier_metrics(Y, P, threshold=choose_threshold(Y, P))["accuracy"] == 1.0
    assert choose_threshold([0, 1], [0.2, 0.8]) == pytest.approx(0.5)  # ties go to 0.5
    with pytest.raises(ValueError):
        choose_threshold(Y, P, metric="auc")


def test_choose_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 300), 0, 1).round(2)  # rounded: many ties
    t = choose_threshold(y, p)
    best = max(classifier_metrics(y, p, threshold=c)["macro_f1"] for c in np.unique(p))
    assert classifier_metrics(y, p, threshold=t)["macro_f1"] == pytest.approx(best)


# ------------------------------------------------------------------ two-stage verdict


def test_split_solution_lines() -> None:
    solution = (
        "Natalia sold 48/2 = 24 clips in May.\n\n"
        "  She sold 48+24 = 72 clips altogether.  \n"
        "#### 72\n"
        "Answer: 72\n"
        "The answer is 72.\n"
        "So the final answer is 72\n"
        "الإجابة: ٧٢\n"
        "الاجابة النهائية: ٧٢\n"
        "الجواب هو ٧٢\n"
        "\\boxed{72}\n"
        "The answer lies in adding 2+2=4.\n"
    )
    assert split_solution_lines(solution) == [
        "Natalia sold 48/2 = 24 clips in May.",
        "She sold 48+24 = 72 clips altogether.",
        "The answer lies in adding 2+2=4.",
    ]


def test_two_stage_verdict() -> None:
    fine = ["48/2=24", None, "", "x = 5"]  # None/empty/unparseable are skipped
    assert two_stage_verdict(fine, classifier_says_flawed=False) == "correct"
    assert two_stage_verdict(fine, classifier_says_flawed=True) == "conceptual_error"
    assert two_stage_verdict(fine + ["48+24=73"], classifier_says_flawed=False) == "computational_error"
    assert two_stage_verdict(["1/0=5"], classifier_says_flawed=False) == "correct"
    assert two_stage_verdict([], classifier_says_flawed=True) == "conceptual_error"


def test_verdict_metrics() -> None:
    y_true = ["correct", "correct", "conceptual_error", "computational_error", "computational_error"]
    y_true += ["conceptual_error", "correct"]
    y_pred = ["correct", "conceptual_error", "conceptual_error", "computational_error", "correct"]
    y_pred += ["conceptual_error", "correct"]
    m = verdict_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["per_class"]["correct"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["conceptual_error"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["computational_error"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 0.8 + 2 * 2 / 3) / 7)
    assert m["labels"] == ["correct", "conceptual_error", "computational_error"]
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_verdict_metrics_counts_unknown_prediction_as_wrong() -> None:
    m = verdict_metrics(["correct", "correct"], ["correct", "garbage"])
    assert m["accuracy"] == 0.5
    assert m["per_class"]["correct"]["recall"] == 0.5
