"""stats.json and summary.md: what went in, what came out, what was dropped and why."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

# Per-split breakdowns worth counting, per task.
BREAKDOWNS = {
    "function_calling": ("has_call", "dialect", "domain", "target_name"),
    "extractor": ("type",),
    "classifier": ("label", "error_type"),
}


def counts(values: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(values).items(), key=lambda kv: str(kv[0]))}


def token_percentiles(n_tokens: pd.Series) -> dict[str, int]:
    if n_tokens.empty:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p = np.percentile(n_tokens.to_numpy(), [50, 90, 99])
    return {"p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(n_tokens.max())}


def split_stats(task: str, df: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": len(df)}
    for col in BREAKDOWNS[task]:
        out[f"by_{col}"] = counts(df[col].tolist())
    out["tokens"] = token_percentiles(df["n_tokens"])
    out["prompt_tokens"] = token_percentiles(df["n_prompt_tokens"])
    out["truncated"] = int(df["truncated"].sum())
    return out


def input_stats(task: str, examples: list[dict[str, Any]], rows_read: int) -> dict[str, Any]:
    """Counts over the accepted rows, before splitting and leakage removal."""
    out: dict[str, Any] = {"rows_read": rows_read}
    if task == "function_calling":
        with_call = sum(1 for e in examples if e["has_call"])
        out.update(
            rows_accepted=len(examples),
            with_call=with_call,
            negatives=len(examples) - with_call,
            dialects=counts(e["dialect"] for e in examples),
            domains=counts(e["domain"] for e in examples),
        )
    elif task == "extractor":
        out.update(rows_accepted=len(examples), by_type=counts(e["type"] for e in examples))
    else:
        out.update(
            rows_accepted=len({e["source"] for e in examples}),  # a pairs row yields two items
            items=len(examples),
            by_label=counts(e["label"] for e in examples),
            by_error_type=counts(e["error_type"] for e in examples if e["label"] == 1),
        )
    return out


# ------------------------------------------------------------------------------------------------
# summary.md
# ------------------------------------------------------------------------------------------------
def table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], cell: Callable[[Any], str] = str
) -> list[str]:
    """A markdown table (and a blank line): the data summary's and the evaluation report's."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return lines + [""]


def breakdown_table(task_stats: dict[str, Any], key: str) -> list[str]:
    splits = task_stats["splits"]
    values = sorted({v for s in splits.values() for v in s.get(key, {})})
    if not values:
        return []
    rows = [[v] + [splits[s].get(key, {}).get(v, 0) for s in splits] for v in values]
    return [f"**{key.removeprefix('by_')}**", ""] + table([key.removeprefix("by_")] + list(splits), rows)


def task_summary(task: str, st: dict[str, Any]) -> list[str]:
    inp, src = st["input"], st["source"]
    lines = [
        f"## {task}",
        "",
        f"Source: `{src['name']}` ({src['kind']}, format {src['format']}); tokenizer `{st['tokenizer']}`.",
        "",
    ]
    facts = [["rows read", inp["rows_read"]], ["rows accepted", inp["rows_accepted"]]]
    if task == "function_calling":
        facts += [
            ["rows with a call", inp["with_call"]],
            ["negatives (no call)", inp["negatives"]],
            [
                "dialects",
                f"{len(inp['dialects'])}: " + ", ".join(f"{k} {v}" for k, v in inp["dialects"].items()),
            ],
            ["domains", len(inp["domains"])],
            ["tools in catalog", st["catalog_tools"]],
        ]
    elif task == "classifier":
        facts += [["items (correct + flawed)", inp["items"]]]
    bad = st["bad_rows"]
    facts += [
        ["rows dropped", bad["dropped"]],
        ["kept with a warning", bad["kept_with_warning"]],
        ["leakage removed (exact / near)", f"{st['leakage']['exact']} / {st['leakage']['near']}"],
    ]
    lines += table(["", "count"], facts)
    if bad["dropped_by_reason"] or bad["kept_by_reason"]:
        rows = [[r, n, "dropped"] for r, n in bad["dropped_by_reason"].items()]
        rows += [[r, n, "kept (reported)"] for r, n in bad["kept_by_reason"].items()]
        lines += ["**bad rows** (details in `bad_rows.jsonl`)", ""] + table(
            ["reason", "rows", "action"], rows
        )
    splits = st["splits"]
    rows = [
        [
            s,
            v["rows"],
            v["tokens"]["p50"],
            v["tokens"]["p90"],
            v["tokens"]["p99"],
            v["tokens"]["max"],
            v["truncated"],
        ]
        for s, v in splits.items()
    ]
    lines += table(
        ["split", "rows", "tokens p50", "p90", "p99", "max", f"> max_length {st['max_length']}"], rows
    )
    for key in BREAKDOWNS[task]:
        if key != "target_name":
            lines += breakdown_table(st, f"by_{key}")
    return lines


def summary_markdown(stats: dict[str, Any]) -> str:
    lines = [
        "# prepare_data summary",
        "",
        f"Seed {stats['seed']}; validation {stats['val_fraction']}, "
        f"test {stats['test_fraction']}; near-duplicate threshold {stats['near_duplicate_threshold']} "
        "(character-trigram Jaccard); max_bad_fraction "
        f"{stats['max_bad_fraction']}.",
        "",
    ]
    for task, st in stats["tasks"].items():
        lines += task_summary(task, st)
    return "\n".join(lines)
