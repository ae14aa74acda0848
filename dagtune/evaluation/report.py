"""``report.md`` of the evaluate node: tables from metrics.json and links to the PNG plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dagtune.data.report import table as md_table

FC_COLUMNS = (
    "parse_ok_rate",
    "tool_name_accuracy",
    "exact_match",
    "arg_key_f1",
    "missed_call_rate",
    "false_call_rate",
)
EXTRACTOR_COLUMNS = ("equation_score", "exact_match", "tag_parse_failure_rate")


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def signed(v: Any) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return md_table(header, rows, cell=lambda c: c if isinstance(c, str) else fmt(c))


def _compare(block: dict[str, Any], columns: Sequence[str], delta: dict[str, Any] | None) -> list[str]:
    rows = []
    for model in ("fine_tuned", "base"):
        if model in block:
            o = block[model]["overall"]
            rows.append([model, o.get("n"), *[o.get(c) for c in columns]])
    if delta:
        rows.append(["delta (ft - base)", "", *[signed(delta.get(c)) for c in columns]])
    return table(["model", "n", *columns], rows)


def _groups(block: dict[str, Any], group: str, columns: Sequence[str]) -> list[str]:
    key = f"by_{group}"
    ft = block.get("fine_tuned", {}).get(key)
    if not ft:
        return []
    base = block.get("base", {}).get(key, {})
    rows = []
    for name, m in ft.items():
        b = base.get(name, {})
        row = [name, m.get("n")]
        for c in columns:
            row += [m.get(c), b.get(c) if b else None]
        rows.append(row)
    header = [group, "n"] + [f"{c} {side}" for c in columns for side in ("ft", "base")]
    return [f"#### By {group}", "", *table(header, rows)]


def verdict_stage_lines(v: dict[str, Any]) -> list[str]:
    """Which stage decided each gold class, and how many equations the checker could not judge."""
    stages = v.get("stages_by_class") or {}
    lines: list[str] = []
    if stages:
        lines += ["Stages per gold class (uncheckable: unknowns or text the checker cannot parse):", ""]
        lines += table(
            [
                "gold class",
                "n",
                "arithmetic decided",
                "to classifier",
                "rows w/ uncheckable",
                "uncheckable eqns",
            ],
            [
                [
                    k,
                    x["n"],
                    x["arithmetic"],
                    x["classifier"],
                    x["rows_with_uncheckable"],
                    x["uncheckable_equations"],
                ]
                for k, x in stages.items()
            ],
        )
    unmapped = v.get("unmapped_error_types") or {}
    if unmapped:
        lines += [
            "Flawed rows whose error_type is outside the vocabulary, scored as conceptual_error: "
            + ", ".join(f"`{k}` {n}" for k, n in unmapped.items()),
            "",
        ]
    return lines


def _images(plot_paths: Sequence[str], alt: str, *suffixes: str) -> list[str]:
    return [f"![{alt or Path(p).stem}]({p})" for p in plot_paths if p.endswith(suffixes)]


def _header(meta: dict[str, Any]) -> list[str]:
    lines = ["# Evaluation report", ""]
    n = meta.get("n_examples", {})
    if n:
        cap = f" (capped at {meta['max_examples']} per task)" if meta.get("max_examples") else ""
        lines += ["Test examples: " + ", ".join(f"{k} {v}" for k, v in n.items()) + cap, ""]
    if meta.get("base_models"):
        lines += ["Base models: " + ", ".join(f"{k}: `{v}`" for k, v in meta["base_models"].items()), ""]
    return lines


def _generative(metrics: dict[str, Any], plot_paths: Sequence[str]) -> list[str]:
    fc = metrics.get("function_calling", {})
    lines = ["## Function calling", "", *_compare(fc, FC_COLUMNS, fc.get("delta"))]
    for group in ("dialect", "domain"):
        lines += _groups(fc, group, ("tool_name_accuracy", "exact_match"))
    for p in _images(plot_paths, "", "fc_by_dialect.png", "fc_by_domain.png"):
        lines += [p, ""]
    ex = metrics.get("extractor", {})
    lines += ["## Equation extractor", "", *_compare(ex, EXTRACTOR_COLUMNS, ex.get("delta"))]
    return lines + _groups(ex, "line_type", EXTRACTOR_COLUMNS)


def _per_class_table(per_class: dict[str, Any]) -> list[str]:
    rows = [[k, x["precision"], x["recall"], x["f1"], x["support"]] for k, x in per_class.items()]
    return table(["class", "precision", "recall", "f1", "support"], rows)


def _classifier(cl: dict[str, Any] | None, plot_paths: Sequence[str]) -> list[str]:
    if not (cl and cl.get("n")):
        return []
    return [
        "## Classifier",
        "",
        f"Threshold {cl['threshold']:.4f} (maximizes {cl.get('threshold_metric')} on "
        f"{cl.get('threshold_source')}), applied to test.",
        "",
        *table(
            ["n", "accuracy", "macro_f1", "roc_auc"],
            [[cl["n"], cl["accuracy"], cl["macro_f1"], cl["roc_auc"]]],
        ),
        *_per_class_table(cl["per_class"]),
        *_images(plot_paths, "classifier confusion", "classifier_confusion.png"),
        "",
    ]


def _verdict(v: dict[str, Any], plot_paths: Sequence[str]) -> list[str]:
    lines = ["## Two-stage math verdict", ""]
    if not v.get("n"):
        return lines + ["No solutions to judge.", ""]
    return lines + [
        f"{v['n']} solutions, {v.get('n_lines')} lines, {v.get('n_equations')} extracted equations. "
        "Any false equation gives computational_error, else the classifier decides "
        "(correct / conceptual_error).",
        "",
        *table(
            ["n", "accuracy", "macro_f1", "weighted_f1"],
            [[v["n"], v["accuracy"], v["macro_f1"], v["weighted_f1"]]],
        ),
        *_per_class_table(v["per_class"]),
        *verdict_stage_lines(v),
        *_images(plot_paths, "verdict confusion", "verdict_confusion.png"),
        "",
    ]


def write_report(path: Path, metrics: dict[str, Any], plot_paths: Sequence[str]) -> Path:
    meta = metrics.get("meta", {})
    lines = _header(meta) + _generative(metrics, plot_paths)
    lines += _classifier(metrics.get("classifier", {}).get("fine_tuned"), plot_paths)
    lines += _verdict(metrics.get("verdict", {}), plot_paths)
    lines += ["## Training loss", "", *_images(plot_paths, "training loss", "train_loss.png"), ""]
    if meta.get("seconds"):
        lines += ["## Timings (s)", ""]
        lines += table(["step", "seconds"], [[k, v] for k, v in meta["seconds"].items()])
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
