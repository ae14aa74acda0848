"""The ``prepare_data`` node: ``build(ctx)`` writes the artifact, ``key_inputs(cfg)`` extends its key.

Artifact layout::

    <out>/function_calling/{train,validation,test}.parquet  catalog.json
    <out>/extractor/{train,validation,test}.parquet
    <out>/classifier/{train,validation,test}.parquet
    <out>/stats.json  summary.md  bad_rows.jsonl
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagtune.data.errors import BadRowLog, DataError, bad_row_summary, log, write_bad_rows
from dagtune.data.io import MAX_ROW_CHARS, read_rows, resolve
from dagtune.data.tools import ToolCatalog, load_catalog
from dagtune.store import MANIFEST_FIELDS

TASKS = ("function_calling", "extractor", "classifier")
TASK_FORMATS = {
    "function_calling": ("mobile_actions", "flat"),
    "extractor": ("eqn_csv",),
    "classifier": ("pairs_csv", "labeled_csv"),
}
# Columns that identify a format (format=auto).
FORMAT_MARKERS = (
    ("mobile_actions", {"messages", "tools"}),
    ("flat", {"query_ar", "function_name"}),
    ("eqn_csv", {"line", "eqn", "type"}),
    ("pairs_csv", {"question", "correct_answer", "wrong_answer"}),
    ("labeled_csv", {"question", "solution", "label"}),
)


@dataclass
class LoadedTask:
    examples: list[dict[str, Any]]
    catalog: ToolCatalog | None
    name: str  # source path / id as configured, or "synthetic"
    fmt: str
    rows_read: int
    bad: BadRowLog
    # The user-named paths read, resolved once (symlinks followed): {"source": ..., "catalog": ...}.
    resolved: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def detect_format(task: str, columns: list[str], configured: str, name: str) -> str:
    fmt = configured
    if fmt == "auto":
        found = [f for f, marks in FORMAT_MARKERS if marks <= set(columns)]
        if not found:
            raise DataError(
                f"{name}: cannot tell the format from columns {sorted(columns)}; set source.format"
            )
        fmt = found[0]
    if fmt not in TASK_FORMATS[task]:
        raise DataError(f"{name}: format {fmt} is not a {task} format; allowed: {list(TASK_FORMATS[task])}")
    return fmt


def load_synthetic(task: str, tcfg: Any, seed: int) -> LoadedTask:
    from dagtune.data import synthetic

    n = tcfg.source.num_examples
    catalog = None
    if task == "function_calling":
        examples, catalog = synthetic.synthetic_function_calling(n, tcfg.negative_fraction, seed)
    elif task == "extractor":
        examples = synthetic.synthetic_extractor(n, seed)
    else:
        examples = synthetic.synthetic_classifier(n, seed)
    n_rows = len({e["source"] for e in examples})  # a classifier problem yields two items from one row
    return LoadedTask(examples, catalog, "synthetic", "synthetic", n_rows, BadRowLog(task, "synthetic"))


def load_task(
    task: str, tcfg: Any, seed: int, config_dir: Path, max_row_chars: int = MAX_ROW_CHARS
) -> LoadedTask:
    """Read and validate one task's source; bad rows are reported in the returned log."""
    from dagtune.data import function_calling as fc
    from dagtune.data import math_tasks

    if tcfg.source.kind == "synthetic":
        return load_synthetic(task, tcfg, seed)
    src = read_rows(tcfg.source, config_dir, task, max_row_chars)
    if not src.rows:  # every line unparseable: say so, rather than "cannot tell the format"
        src.bad.check_fraction(src.rows_read, 0.0)
    fmt = detect_format(task, src.columns, tcfg.source.format, src.name)
    catalog = None
    resolved = {"source": src.resolved} if src.resolved else {}
    if fmt == "mobile_actions":
        examples, catalog = fc.load_mobile_actions(src, tcfg.schema_mismatch)
    elif fmt == "flat":
        if not tcfg.source.catalog:
            raise DataError(f"{src.name}: format flat needs source.catalog (the tool schemas)")
        catalog_path = resolve(tcfg.source.catalog, config_dir)
        resolved["catalog"] = str(catalog_path)
        catalog = load_catalog(catalog_path)
        examples = fc.load_flat(src, catalog, tcfg.schema_mismatch)
    elif fmt == "eqn_csv":
        examples = math_tasks.load_eqn_rows(src)
    elif fmt == "pairs_csv":
        examples = math_tasks.load_pairs_rows(src)
    else:
        examples = math_tasks.load_labeled_rows(src)
    return LoadedTask(examples, catalog, src.name, fmt, src.rows_read, src.bad, resolved)


def make_ids_unique(examples: list[dict[str, Any]]) -> None:
    """Source ids may repeat (re-exported rows); the artifact's ids must not."""
    seen: Counter[str] = Counter()
    for ex in examples:
        seen[ex["id"]] += 1
        if seen[ex["id"]] > 1:
            ex["id"] = f"{ex['id']}#{seen[ex['id']]}"


# ------------------------------------------------------------------------------------------------
# per task: split, leakage, render
# ------------------------------------------------------------------------------------------------
# Stratification keys, most important first (see split.allocate).
STRATA: dict[str, Callable[[dict[str, Any]], tuple[str, ...]]] = {
    "function_calling": lambda r: ("call" if r["has_call"] else "no_call", r["dialect"]),
    "extractor": lambda r: (r["type"],),
    # label, then error type: the test split keeps the computational/conceptual mix the verdict scores
    "classifier": lambda r: (str(r["label"]), r["error_type"] or "none"),
}
LEAK_TEXT: dict[str, Callable[[dict[str, Any]], str]] = {
    "function_calling": lambda r: r["user"],
    "extractor": lambda r: r["line"],
    "classifier": lambda r: f"{r['question']}\n{r['solution']}",
}


def source_line(ex: dict[str, Any]) -> int:
    """Examples carry "name:line" in `source` (the line is after the last colon)."""
    tail = ex["source"].rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def check_splits(task: str, splits: dict[str, list], loaded: LoadedTask) -> None:
    for split, rows in splits.items():
        if not rows:
            raise DataError(
                f"{task}: split {split} has zero rows ({loaded.name}: {loaded.rows_read} rows read, "
                f"{len(loaded.examples)} accepted, after leakage removal); use more data or larger fractions"
            )


@dataclass
class SplitTask:
    loaded: LoadedTask
    splits: dict[str, list[dict[str, Any]]]
    leakage: dict[str, Any]


def split_task(task: str, cfg: Any, config_dir: Path) -> SplitTask:
    """Load, validate, split and remove leakage: everything that can reject the data, without a
    tokenizer, so bad data fails in seconds."""
    from dagtune.data.function_calling import add_distractors
    from dagtune.data.split import remove_leakage, split_stratified

    tcfg = getattr(cfg, task)
    loaded = load_task(task, tcfg, cfg.seed, config_dir, cfg.max_row_chars)
    loaded.bad.log_total()
    loaded.bad.check_fraction(loaded.rows_read, cfg.max_bad_fraction)
    if not loaded.examples:
        raise DataError(f"{loaded.name}: no usable rows for {task} ({loaded.rows_read} read, all bad)")
    make_ids_unique(loaded.examples)
    if task == "function_calling":
        add_distractors(loaded.examples, loaded.catalog, tcfg.distractor_tools, cfg.seed)
    splits = split_stratified(
        loaded.examples, STRATA[task], cfg.val_fraction, cfg.test_fraction, cfg.seed, task
    )
    splits, leakage = remove_leakage(splits, LEAK_TEXT[task], cfg.near_duplicate_threshold)
    check_splits(task, splits, loaded)
    return SplitTask(loaded, splits, leakage)


def render_task(
    task: str, cfg: Any, prepared: SplitTask, store: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(split frames, stats) rendered with the task's tokenizer."""
    from dagtune.data.render import render_split
    from dagtune.data.report import input_stats, split_stats
    from dagtune.models import load_tokenizer

    tcfg, loaded = getattr(cfg, task), prepared.loaded
    tok_name = getattr(cfg.tokenizers, task)
    tokenizer = load_tokenizer(tok_name, store)
    options = {
        "developer_prompt": getattr(tcfg, "developer_prompt", ""),
        "negative_reply": getattr(tcfg, "negative_reply", ""),
    }
    frames, hygiene = {}, {}
    for split, rows in prepared.splits.items():
        df, failed = render_split(task, tokenizer, rows, tcfg.max_length, options)
        for ex, why in failed:
            loaded.bad.add(source_line(ex), "unrenderable", why)
        frames[split], hygiene[split] = split_hygiene(df, cfg.drop_duplicates)
    loaded.bad.check_fraction(loaded.rows_read, cfg.max_bad_fraction)
    check_splits(task, {s: df.index.tolist() for s, df in frames.items()}, loaded)

    stats = {
        "source": {"name": loaded.name, "kind": tcfg.source.kind, "format": loaded.fmt},
        "tokenizer": tok_name,
        "max_length": tcfg.max_length,
        "input": input_stats(task, loaded.examples, loaded.rows_read),
        "bad_rows": bad_row_summary(loaded.bad),
        "leakage": prepared.leakage,
        "splits": {s: {**split_stats(task, df), **hygiene[s]} for s, df in frames.items()},
        "catalog_tools": len(loaded.catalog) if loaded.catalog else 0,
    }
    if loaded.catalog is not None:
        stats["catalog"] = loaded.catalog.tools
    return frames, stats


def split_hygiene(df: Any, drop_duplicates: bool) -> tuple[Any, dict[str, Any]]:
    """Count exact duplicates (same rendered text) and rows holding NUL bytes in one split; drop the
    duplicates (first one kept) unless told not to: a repeated row only weights itself up."""
    dup = df["text"].duplicated(keep="first")
    counts = {
        "duplicates": int(dup.sum()),
        "duplicates_dropped": bool(drop_duplicates),
        "rows_with_nul": int(df["text"].str.contains("\x00", regex=False).sum()),
    }
    if drop_duplicates and counts["duplicates"]:
        df = df[~dup].reset_index(drop=True)
    return df, counts


# ------------------------------------------------------------------------------------------------
# node entry points
# ------------------------------------------------------------------------------------------------
def flat_metrics(stats: dict[str, Any]) -> dict[str, int]:
    """Numbers only, flat keys: what the manifest and MLflow want."""
    out: dict[str, int] = {}
    for task, st in stats["tasks"].items():
        out[f"{task}_rows_read"] = st["input"]["rows_read"]
        out[f"{task}_rows_accepted"] = st["input"]["rows_accepted"]
        out[f"{task}_bad_dropped"] = st["bad_rows"]["dropped"]
        out[f"{task}_bad_kept"] = st["bad_rows"]["kept_with_warning"]
        out[f"{task}_leakage_exact"] = st["leakage"]["exact"]
        out[f"{task}_leakage_near"] = st["leakage"]["near"]
        for split, s in st["splits"].items():
            out[f"{task}_{split}_rows"] = s["rows"]
            out[f"{task}_{split}_truncated"] = s["truncated"]
            out[f"{task}_{split}_duplicates"] = s["duplicates"]
            out[f"{task}_{split}_rows_with_nul"] = s["rows_with_nul"]
    return out


def build(ctx: Any) -> dict[str, Any]:
    """Read, validate, split, dedupe and render all three tasks into ctx.out; return counts."""
    from dagtune.data.report import summary_markdown

    cfg = ctx.section
    config_dir = Path(ctx.settings.config_dir or ".")
    stats: dict[str, Any] = {
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "near_duplicate_threshold": cfg.near_duplicate_threshold,
        "max_bad_fraction": cfg.max_bad_fraction,
        "tasks": {},
    }
    results: dict[str, Any] = {}
    try:
        # Every task is loaded, validated and split before any is rendered: bad data fails fast.
        prepared = {task: split_task(task, cfg, config_dir) for task in TASKS}
        for task in TASKS:
            frames, task_stats = render_task(task, cfg, prepared[task], ctx.store)
            results[task] = frames
            catalog = task_stats.pop("catalog", None)
            if catalog is not None:
                results[f"{task}/catalog"] = catalog
            stats["tasks"][task] = task_stats
            log.info("prepare_data %s: %s", task, {s: len(df) for s, df in frames.items()})
    except DataError as e:
        if e.bad_rows is not None:  # the artifact is not written: keep the evidence in the scratch dir
            path = ctx.scratch / "bad_rows.jsonl"
            write_bad_rows(path, [e.bad_rows])
            e = DataError(f"{e} All bad rows: {path}", e.bad_rows)
        log.error("prepare_data failed: %s", e)
        raise e from None
    for task in TASKS:
        d = ctx.out / task
        d.mkdir(parents=True, exist_ok=True)
        for split, df in results[task].items():
            df.to_parquet(d / f"{split}.parquet", index=False)
        if f"{task}/catalog" in results:
            (d / "catalog.json").write_text(
                json.dumps(list(results[f"{task}/catalog"].values()), ensure_ascii=False, indent=1),
                encoding="utf-8",
            )
    write_bad_rows(ctx.out / "bad_rows.jsonl", [p.loaded.bad for p in prepared.values()])
    (ctx.out / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
    (ctx.out / "summary.md").write_text(summary_markdown(stats), encoding="utf-8")
    return {**flat_metrics(stats), MANIFEST_FIELDS: {"sources_resolved": sources_resolved(prepared)}}


def sources_resolved(prepared: dict[str, SplitTask]) -> dict[str, dict[str, str]]:
    """{task: {"source": path, "catalog": path}}: the files read, as resolved when read. Recorded in the
    manifest beside the key, not in it (the key holds their content hashes, so it stays the same when
    the data moves) and not in an artifact file (the dataset digest does not depend on paths either)."""
    return {task: p.loaded.resolved for task, p in prepared.items() if p.loaded.resolved}


def file_digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file in a directory (a dataset saved with save_to_disk)."""
    from dagtune.store import sha256_file

    if path.is_file():
        return {"sha256": sha256_file(path)}
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
        return {"dir_sha256": h.hexdigest()}
    # Not an error here: `plan`/`status` compute keys too; build() raises the DataError.
    return {"missing": str(path)}


def key_inputs(cfg: Any) -> dict[str, Any]:
    """What the section alone does not capture: source bytes and the tokenizers' identities."""
    from dagtune.hub import resolve_revision
    from dagtune.models import model_fingerprint
    from dagtune.store import ArtifactStore

    section = cfg.prepare_data
    config_dir = Path(cfg.config_dir or ".")
    sources: dict[str, Any] = {}
    for task in TASKS:
        src = getattr(section, task).source
        entry: dict[str, Any] = {}
        if src.kind == "file":
            entry["file"] = file_digest(resolve(src.path, config_dir))
        elif src.kind == "hf" and resolve(src.hf_id, config_dir).exists():
            entry["hf_local"] = file_digest(resolve(src.hf_id, config_dir))
        elif src.kind == "hf":  # a hub dataset: the commit its revision resolves to (dagtune.hub)
            where = f"prepare_data.{task}.source.revision"
            entry["hub"] = {
                "id": src.hf_id,
                "revision": resolve_revision("dataset", src.hf_id, src.revision, where),
            }
        if src.kind != "synthetic" and src.catalog:
            entry["catalog"] = file_digest(resolve(src.catalog, config_dir))
        sources[task] = entry
    store = ArtifactStore(cfg.artifact_root)
    tokenizers = {
        t: model_fingerprint(getattr(section.tokenizers, t), store, where=f"prepare_data.tokenizers.{t}")
        for t in TASKS
    }
    return {"sources": sources, "tokenizers": tokenizers}
