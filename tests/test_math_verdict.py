"""Issue 16: the two-stage math verdict on origin-style data (pairs_csv with comp/concep labels).

The pairs file is written here in the origin project's column layout; every solution line's equation
is what a perfect extractor returns (``ORACLE``), the classifier is perfect (probability = label), so
the verdict's errors can only come from the gold mapping and the arithmetic checker.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from dagtune.config import EvaluateConfig, PrepareDataConfig
from dagtune.data.errors import BadRowLog
from dagtune.data.io import read_file
from dagtune.data.math_tasks import canonical_error_type, load_eqn_rows, load_labeled_rows, load_pairs_rows
from dagtune.data.node import STRATA, split_task
from dagtune.data.split import SPLITS, split_stratified
from dagtune.evaluation.report import verdict_stage_lines
from dagtune.evaluation.tasks import gold_verdict, solution_lines, unmapped_error_types, verdict_evaluate

# (question, correct_answer, wrong_answer, error_type); each line's equation (as the origin's extractor
# writes it) follows the line after " || " and is cut off before the file is written.
ORIGIN_ROWS = [
    (
        "Ali saves 20 dollars a week. How much does he save in a year?",
        "He saves 20 a week for 52 weeks. || 20/week*52/year=1040/year\nThe answer is 1040.",
        "He saves 20 a week for 52 weeks, 1004. || 20/week*52/year=1004/year\nThe answer is 1004.",
        "comp",
    ),
    (
        "A car goes 20 miles per gallon. How many gallons for 600 miles?",
        "It needs 600 miles / 20 miles/gallon = 30 gallons. || 600 miles / 20 miles/gallon = 30 gallons",
        "It needs 600 * 20 = 12000 gallons. || 600 miles * 20 miles/gallon = 12000 gallons",
        "concep",
    ),
    (
        "A ride costs 0.20 per mile and Sam paid 90. How many miles did he ride?",
        "Let M be the miles: 0.20*M=90. || 0.20*M=90\nSo M = 90/0.20 = 450. || 90/0.20=450",
        "Let M be the miles: 0.20*M=90. || 0.20*M=90\nSo M = 90*0.20 = 19. || 90*0.20=19",
        "comp",
    ),
    (
        "Buses seat 50. How many buses are full with 180 students?",
        "Full buses: 180//50 = 3. || 180//50=3",
        "Full buses: 180//50 = 4. || 180//50=4",
        "comp",
    ),
    (
        "A ticket is 1.50 and Mia has 100. How many tickets can she buy and what do they cost?",
        "She buys 100/1.5 = 66.67 tickets. || 100/1.5=66.67\nCheck: 66.67*1.50 = 100. || 66.67*1.50=100",
        "She buys 100+1.50 = 101.50 tickets. || 100+1.50=101.50",
        "concep",
    ),
    (
        "12 of 48 apples are red. What fraction is red?",
        "12/48 = 0.25 of them are red. || 12/48=0.25",
        "12/48 = 0.2 of them are red. || 12/48=0.2",
        "comp",
    ),
    (
        "80% of 100 people are adults. How many are children?",
        "80% of them are adults, so 100 - 20 = 80 adults and 20 children. || "
        "80% of them are adults, so 100 - 20 = 80",
        "80% of 100 = 80 children. || 80% of 100 = 80",
        "concep",
    ),
    (
        "The pre-state fee is 30 and tax is 6. What is the total?",
        "The pre-state fee is $30+$6=$36. || The pre-state fee is $30+$6=$36",
        "The pre-state fee is $30+$6=$35. || The pre-state fee is $30+$6=$35",
        "comp",
    ),
    (
        "Cats and wolves: 2 legs per cat... How many cats are there if cats have 24 legs?",
        "24/2 = 12 cats. || 24/2=12",
        "2c+4w=70 and 2c=24. || 2c+4w=70\nSo there are 24 cats. || 2c=24",
        "concep",
    ),
    (
        "A house cost 450000 and 200000 is paid. How much is left?",
        "450000-200000 = 250000 left. || 450000-200000=250000",
        "450000-200000 = 249999 left. || 450000-200000=249999",
        "comp",
    ),
    (
        "Two lots cost 246000 and 180000. What is the total?",
        "246000+180000 = 426000. || 246000+180000=426000",
        "246000+180000 = 425998. || 246000+180000=425998",
        "comp",
    ),
    (
        "A number plus 5 is 10. What is the number?",
        "10-5 = 5. || 10-5=5",
        "x+5=10, so x = 10+5 = 15. || x+5=10\nThe number is 10+5=15. || 10+5=15",
        "concep",
    ),
]
# The error types as evaluate.computational_error_types listed them before issue 16: today's default
# without the abbreviations issue 16 added ("comp", "calc").
OLD_COMPUTATIONAL = [t for t in EvaluateConfig().computational_error_types if t not in ("comp", "calc")]


def write_origin_pairs(path: Path, extra: list[tuple[str, str, str, str]] = ()) -> dict[str, str]:
    """Write the pairs file; return line -> equation (the perfect extractor's answers)."""
    oracle: dict[str, str] = {}

    def strip(solution: str) -> str:
        out = []
        for line in solution.split("\n"):
            text, _, eqn = line.partition(" || ")
            oracle[text.strip()] = eqn.strip()
            out.append(text)
        return "\n".join(out)

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "correct_answer", "wrong_answer", "error_type"])
        for q, good, bad, et in [*ORIGIN_ROWS, *extra]:
            w.writerow([q, strip(good), strip(bad), et])
    return oracle


def verdict_on(
    items: list[dict], oracle: dict[str, str], computational: list[str]
) -> tuple[dict, pd.DataFrame]:
    df = pd.DataFrame(items)
    lines = solution_lines(df["solution"].tolist())
    outs = [[f"<eq>{oracle.get(line, '')}</eq>" for line in ls] for ls in lines]
    perfect = [float(x) for x in df["label"]]
    return verdict_evaluate(df, lines, outs, perfect, 0.5, computational, EvaluateConfig().rel_tol)


def load_pairs(path: Path) -> tuple[list[dict], BadRowLog]:
    src = read_file(str(path), path.parent, BadRowLog("classifier", path.name))
    return load_pairs_rows(src), src.bad


# ---------------------------------------------------------------- label vocabulary


@pytest.mark.parametrize(
    "value,expected",
    [
        ("comp", "computational"),
        ("Computational", "computational"),
        ("calc", "computational"),
        ("calculation", "computational"),
        ("arithmetic", "computational"),
        ("Arithmetic Error", "computational"),
        ("concep", "conceptual"),
        ("conceptual", "conceptual"),
        ("logic", "conceptual"),
        ("reasoning", "conceptual"),
        ("wrong-operation", "conceptual"),
        ("final_answer", "conceptual"),
        ("typo", None),
        ("", None),
    ],
)
def test_error_type_vocabulary(value: str, expected: str | None) -> None:
    assert canonical_error_type(value) == expected


def test_unknown_error_types_are_kept_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    write_origin_pairs(path, extra=[("Q extra", "1+1=2", "1+1=3", "typo"), ("Q none", "2+2=4", "2+2=5", "")])
    items, bad = load_pairs(path)
    flawed = {i["question"]: i["error_type"] for i in items if i["label"] == 1}
    assert flawed["Ali saves 20 dollars a week. How much does he save in a year?"] == "computational"
    assert flawed["A number plus 5 is 10. What is the number?"] == "conceptual"
    assert flawed["Q extra"] == "typo" and flawed["Q none"] == "unspecified"  # kept as written
    assert [(r.line, r.reason, r.action) for r in bad.rows] == [
        (21, "unknown error_type", "kept"),  # physical lines: earlier answers span two lines
        (22, "no error_type", "kept"),
    ]
    assert "'typo'" in bad.rows[0].detail
    assert bad.counts("kept") == {"no error_type": 1, "unknown error_type": 1} and not bad.dropped

    labeled = tmp_path / "labeled.csv"
    labeled.write_text("question,solution,label,error_type\nQ,S,1,concep\nQ,T,1,oops\nQ,U,0,\n")
    src = read_file(str(labeled), tmp_path, BadRowLog("classifier", "labeled.csv"))
    assert [i["error_type"] for i in load_labeled_rows(src)] == ["conceptual", "oops", ""]
    assert [(r.line, r.reason) for r in src.bad.rows] == [(3, "unknown error_type")]


def test_eqn_rows_whose_type_contradicts_the_arithmetic_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "lines.csv"
    path.write_text(
        "line,eqn,type\n"
        "He pays 2+2=4.,2+2=4,correct\n"
        "He pays 2+2=4.,2+2=4,flawed\n"  # line 3: flawed but true
        "He pays 2+2=5.,2+2=5,correct\n"  # line 4: correct but false
        "He saves 20*52=1004.,20*52=1004,flawed\n"
        "Let M be 0.20*M=90.,0.20*M=90,flawed\n"  # uncheckable: not reported
        "No equation.,,missing\n"
    )
    src = read_file(str(path), tmp_path, BadRowLog("extractor", "lines.csv"))
    rows = load_eqn_rows(src)
    assert len(rows) == 6  # kept
    assert [(r.line, r.reason, r.action) for r in src.bad.rows] == [
        (3, "type disagrees with arithmetic", "kept"),
        (4, "type disagrees with arithmetic", "kept"),
    ]
    assert "flawed but the equation holds" in src.bad.rows[0].detail


def test_classifier_splits_are_stratified_by_label_and_error_type() -> None:
    items = []
    for i in range(60):
        et = "computational" if i % 4 == 0 else "conceptual"  # 15 computational, 45 conceptual
        group = f"q{i}"
        items += [
            {"id": f"{i}c", "group": group, "label": 0, "error_type": ""},
            {"id": f"{i}f", "group": group, "label": 1, "error_type": et},
        ]
    splits = split_stratified(items, STRATA["classifier"], 0.2, 0.2, seed=0, task="classifier")
    for name in SPLITS:
        types = [r["error_type"] for r in splits[name] if r["label"] == 1]
        share = types.count("computational") / len(types)
        assert abs(share - 0.25) <= 1 / len(types), (name, share)  # in proportion, to one group


# ---------------------------------------------------------------- the verdict end to end


def test_origin_style_pairs_verdict_end_to_end(tmp_path: Path) -> None:
    """prepare_data's loading and splitting, then the verdict with a perfect classifier and extractor."""
    path = tmp_path / "pairs.csv"
    oracle = write_origin_pairs(path)
    cfg = PrepareDataConfig.model_validate({"classifier": {"source": {"kind": "file", "path": str(path)}}})
    prepared = split_task("classifier", cfg, tmp_path)
    assert prepared.loaded.fmt == "pairs_csv" and not prepared.loaded.bad.rows
    items = prepared.loaded.examples
    assert sum(len(v) for v in prepared.splits.values()) + prepared.leakage["exact"] + prepared.leakage[
        "near"
    ] == len(items)

    metrics, table = verdict_on(items, oracle, EvaluateConfig().computational_error_types)
    assert metrics["n"] == 24 and metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    assert metrics["per_class"]["computational_error"]["support"] == 7
    assert metrics["unmapped_error_types"] == {}
    assert metrics["stages_by_class"] == {
        "computational_error": {
            "n": 7,
            "arithmetic": 7,
            "classifier": 0,
            "rows_with_uncheckable": 1,  # 0.20*M=90 beside the false 90*0.20=19
            "uncheckable_equations": 1,
        },
        "conceptual_error": {
            "n": 5,
            "arithmetic": 0,
            "classifier": 5,
            "rows_with_uncheckable": 2,  # 2c+4w=70, 2c=24 and x+5=10
            "uncheckable_equations": 3,
        },
        "correct": {
            "n": 12,
            "arithmetic": 0,
            "classifier": 12,
            "rows_with_uncheckable": 1,
            "uncheckable_equations": 1,
        },
    }
    report = "\n".join(verdict_stage_lines(metrics))
    assert "| computational_error | 7 | 7 | 0 | 1 | 1 |" in report
    json.dumps(metrics)  # metrics.json must be able to hold it


def test_raw_comp_labels_are_never_silently_conceptual(tmp_path: Path) -> None:
    """Rows that bypass prepare_data's mapping (raw ``comp``) under the old type list: the verdict scores
    them conceptual, and says so in ``unmapped_error_types``; the current default list maps them."""
    oracle = write_origin_pairs(tmp_path / "pairs.csv")
    items, _ = load_pairs(tmp_path / "pairs.csv")
    raw = {r[0]: r[3] for r in ORIGIN_ROWS}
    for item in items:
        if item["label"] == 1:
            item["error_type"] = raw[item["question"]]
    old, _ = verdict_on(items, oracle, OLD_COMPUTATIONAL)
    assert old["per_class"]["computational_error"]["support"] == 0
    assert old["unmapped_error_types"] == {"comp": 7}
    assert old["accuracy"] == pytest.approx(17 / 24)
    assert "`comp` 7" in "\n".join(verdict_stage_lines(old))
    new, _ = verdict_on(items, oracle, EvaluateConfig().computational_error_types)
    assert new["accuracy"] == 1.0 and new["unmapped_error_types"] == {}
    assert gold_verdict(1, "comp", OLD_COMPUTATIONAL) == "conceptual_error"
    assert unmapped_error_types([1, 1, 0], ["concep", "comp", ""], OLD_COMPUTATIONAL) == {"comp": 1}
