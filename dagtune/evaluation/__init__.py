"""Pure evaluation logic: safe arithmetic, equation checks and the metrics for all three fine-tunes."""

from dagtune.evaluation.metrics import (
    CLASSIFIER_LABELS,
    VERDICT_LABELS,
    choose_threshold,
    classifier_metrics,
    coerce_expected_calls,
    equation_score,
    extractor_metrics,
    function_calling_metrics,
    normalize_arabic,
    normalize_text,
    normalize_value,
    score_function_call,
    split_solution_lines,
    two_stage_verdict,
    verdict_metrics,
)
from dagtune.evaluation.safe_arith import (
    ArithmeticCheckError,
    UnsafeExpression,
    check_equation,
    safe_eval,
    sanitize,
)

__all__ = [
    "CLASSIFIER_LABELS",
    "VERDICT_LABELS",
    "ArithmeticCheckError",
    "UnsafeExpression",
    "check_equation",
    "choose_threshold",
    "classifier_metrics",
    "coerce_expected_calls",
    "equation_score",
    "extractor_metrics",
    "function_calling_metrics",
    "normalize_arabic",
    "normalize_text",
    "normalize_value",
    "safe_eval",
    "sanitize",
    "score_function_call",
    "split_solution_lines",
    "two_stage_verdict",
    "verdict_metrics",
]
