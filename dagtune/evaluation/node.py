"""The ``evaluate`` node: every fine-tune against its base model on the test split.

Upstream: ``prepare_data`` (the splits), ``train_function_calling`` / ``train_extractor`` (``merged/``
or ``adapter/``, ``train_log.jsonl``; the manifest's ``inputs.config.model.name`` is the base model)
and ``train_classifier`` (``dagtune.training.classifier.load_classifier``).

Steps: function calling and the extractor are generated for the fine-tune and (``compare_base``) the
base with the same decoding (``generate.py``); the classifier's threshold is chosen on validation and
applied to test; the two-stage verdict runs the fine-tuned extractor on every line of the classifier's
test solutions, checks each equation with the safe evaluator, and falls back to the classifier.

Outputs (``ctx.out``): ``metrics.json`` (what the promotion gate reads), ``predictions/*.parquet``
(one row per example and model), ``plots/*.png``, ``report.md``. Model output that does not parse is
a miss in the metrics, never an exception.

Gold verdicts: label 0 → ``correct``; label 1 → ``computational_error`` when its ``error_type`` is in
``evaluate.computational_error_types`` (the synthetic generator's ``arithmetic``: right operation,
wrong result), otherwise ``conceptual_error`` (synthetic ``wrong_operation`` and ``final_answer``: the
written equations are all true, only the reasoning or the stated answer is wrong). prepare_data stores
known error types by class (the origin's ``comp``/``concep`` become ``computational``/``conceptual``);
a flawed row with a type outside that vocabulary is scored as ``conceptual_error`` and counted in the
verdict's ``unmapped_error_types``. The verdict's ``stages_by_class`` says per gold class how many rows
the arithmetic stage decided, how many went to the classifier and how many had uncheckable equations.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from dagtune.data.split import read_split
from dagtune.evaluation import plots
from dagtune.evaluation.generate import Generator, resolve_device
from dagtune.evaluation.metrics import choose_threshold, classifier_metrics
from dagtune.evaluation.report import write_report
from dagtune.evaluation.tasks import (
    EXTRACTOR_DELTA_KEYS,
    ExtractorPrompt,
    deltas,
    extractor_evaluate,
    fc_delta_block,
    fc_evaluate,
    solution_lines,
    subsample,
    verdict_evaluate,
)
from dagtune.store import Artifact

log = logging.getLogger("dagtune.evaluation")

UPSTREAM = ("prepare_data", "train_function_calling", "train_extractor", "train_classifier")
TRAINING = ("train_function_calling", "train_extractor", "train_classifier")
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
# Column of the classifier splits fed to ``predict_proba`` (the rendered prompt, as in training).
CLASSIFIER_TEXT = "prompt"


class FlawedProbability:
    """Adapter over the trained classifier: ``predict_proba(texts) -> list[float]`` = P(flawed), whether
    the model returns that list or a (n, num_labels) array whose column 1 is flawed."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def predict_proba(self, texts: list[str]) -> list[float]:
        import numpy as np

        if not texts:
            return []
        p = np.asarray(self.model.predict_proba(list(texts)), dtype=float)
        return (p[:, 1] if p.ndim == 2 else p.reshape(-1)).tolist()


def load_classifier(artifact_dir: Path, device: str = "cpu") -> FlawedProbability:
    """The trained classifier of a ``train_classifier`` artifact, fed the ``prompt`` column."""
    from dagtune.training.classifier import load_classifier as _load

    loaded = _load(artifact_dir, device=device)
    return FlawedProbability(loaded[0] if isinstance(loaded, tuple) else loaded)


def base_model_name(art: Artifact) -> str:
    return art.manifest()["inputs"]["config"]["model"]["name"]


def fine_tuned_paths(art: Artifact) -> tuple[str, str | None, str]:
    """(model path, adapter path or None, base name): ``merged/`` when the training wrote it, else the
    base with ``adapter/`` merged on load."""
    merged = art.dir / "merged"
    if (merged / "config.json").is_file():
        return str(merged), None, base_model_name(art)
    adapter = art.dir / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return "", str(adapter), base_model_name(art)
    raise FileNotFoundError(f"{art.node} artifact {art.path} has neither merged/ nor adapter/")


def _resolve_base(name: str, store: Any, art: Artifact) -> str:
    """The base model at the hub commit its training artifact was keyed at (hub ids)."""
    from dagtune.models import base_revision, resolve_model

    return resolve_model(name, store, base_revision(art.manifest()))


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, key: str, t0: float) -> None:
        self.seconds[key] = round(self.seconds.get(key, 0.0) + time.time() - t0, 3)


def _generate_roles(
    art: Artifact,
    prompts: list[str],
    cfg: Any,
    device: str,
    store: Any,
    timer: _Timer,
    task: str,
    extra_prompts: list[str] | None = None,
) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]], list[Any]]:
    """Generations of the fine-tune and (``compare_base``) the base for ``prompts``, their decoding
    configs, and the fine-tune's generations for ``extra_prompts`` (the verdict lines) from the same
    loaded model."""
    model_path, adapter, base_name = fine_tuned_paths(art)
    base_path = _resolve_base(base_name, store, art)
    roles: dict[str, tuple[str, str | None]] = {"fine_tuned": (model_path or base_path, adapter)}
    if cfg.compare_base:
        roles["base"] = (base_path, None)
    gens: dict[str, list[Any]] = {}
    decoding: dict[str, dict[str, Any]] = {}
    extra: list[Any] = []
    for role, (path, adapter_path) in roles.items():
        t0 = time.time()
        g = Generator(path, adapter_path=adapter_path, device=device)
        timer.add(f"{task}.{role}.load", t0)
        try:
            t0 = time.time()
            gens[role] = g.generate(prompts, cfg.batch_size, cfg.max_new_tokens)
            timer.add(f"{task}.{role}.generate", t0)
            decoding[role] = {**g.decoding_config(cfg.batch_size, cfg.max_new_tokens), "model": path}
            if adapter_path:
                decoding[role]["adapter"] = adapter_path
            if role == "fine_tuned" and extra_prompts:
                t0 = time.time()
                extra = g.generate(extra_prompts, cfg.batch_size, cfg.max_new_tokens)
                timer.add("verdict.extractor.generate", t0)
        finally:
            g.close()
        log.info("evaluate %s/%s: %d generations", task, role, len(gens[role]))
    return gens, decoding, extra


def _with_generation_info(table: pd.DataFrame, role: str, gens: list[Any]) -> pd.DataFrame:
    table = table.copy()
    table.insert(0, "model", role)
    table["finished"] = [g.finished for g in gens]
    table["new_tokens"] = [g.new_tokens for g in gens]
    return table


def _summary(metrics: dict[str, Any], timer: _Timer) -> dict[str, Any]:
    """Flat numbers for the manifest (metrics.json holds everything)."""

    def get(*path: str) -> Any:
        cur: Any = metrics
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur

    out = {
        "fc_tool_name_accuracy": get("function_calling", "fine_tuned", "overall", "tool_name_accuracy"),
        "fc_tool_name_accuracy_base": get("function_calling", "base", "overall", "tool_name_accuracy"),
        "fc_exact_match": get("function_calling", "fine_tuned", "overall", "exact_match"),
        "fc_exact_match_base": get("function_calling", "base", "overall", "exact_match"),
        "fc_parse_ok_rate": get("function_calling", "fine_tuned", "overall", "parse_ok_rate"),
        "extractor_equation_score": get("extractor", "fine_tuned", "overall", "equation_score"),
        "extractor_equation_score_base": get("extractor", "base", "overall", "equation_score"),
        "classifier_macro_f1": get("classifier", "fine_tuned", "macro_f1"),
        "classifier_roc_auc": get("classifier", "fine_tuned", "roc_auc"),
        "classifier_threshold": get("classifier", "fine_tuned", "threshold"),
        "verdict_macro_f1": get("verdict", "macro_f1"),
        "verdict_weighted_f1": get("verdict", "weighted_f1"),
    }
    out["seconds_total"] = round(sum(timer.seconds.values()), 3)
    return out


def build(ctx: Any) -> dict[str, Any]:
    cfg = ctx.section
    missing = [u for u in UPSTREAM if u not in ctx.upstream]
    if missing:
        raise ValueError(f"evaluate needs upstream artifacts {missing}")
    device = resolve_device(ctx.runtime.device)
    data_dir = ctx.upstream["prepare_data"].dir
    out: Path = ctx.out
    pred_dir, plot_dir = out / "predictions", out / "plots"
    pred_dir.mkdir(parents=True, exist_ok=True)
    plot_dir.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    metrics: dict[str, Any] = {}
    decoding: dict[str, Any] = {}
    seed = cfg.seed

    # ---- data --------------------------------------------------------------------------------
    fc_df = subsample(read_split(data_dir, "function_calling", "test"), cfg.max_examples, seed)
    ex_df = subsample(read_split(data_dir, "extractor", "test"), cfg.max_examples, seed)
    cl_test = subsample(read_split(data_dir, "classifier", "test"), cfg.max_examples, seed)
    cl_val = subsample(read_split(data_dir, "classifier", "validation"), cfg.max_examples, seed)
    # The line → prompt renderer comes from the extractor's training rows (they are the most).
    ex_prompt = ExtractorPrompt.from_rows(
        pd.concat([read_split(data_dir, "extractor", s) for s in ("train", "test")], ignore_index=True)
    )
    lines = solution_lines(cl_test["solution"].tolist())
    flat_lines = [ln for ls in lines for ln in ls]

    # ---- function calling --------------------------------------------------------------------
    gens, decoding["function_calling"], _ = _generate_roles(
        ctx.upstream["train_function_calling"],
        fc_df["prompt"].tolist(),
        cfg,
        device,
        ctx.store,
        timer,
        "function_calling",
    )
    fc_block: dict[str, Any] = {}
    tables = []
    for role, g in gens.items():
        fc_block[role], table = fc_evaluate(fc_df, [x.text for x in g], arabic=cfg.arabic_normalization)
        tables.append(_with_generation_info(table, role, g))
    if "base" in fc_block:
        fc_block["delta"] = fc_delta_block(fc_block["fine_tuned"], fc_block["base"])
    metrics["function_calling"] = fc_block
    pd.concat(tables, ignore_index=True).to_parquet(pred_dir / "function_calling.parquet", index=False)

    # ---- extractor (+ the verdict's lines, same loaded fine-tune) ----------------------------
    gens, decoding["extractor"], line_gens = _generate_roles(
        ctx.upstream["train_extractor"],
        ex_df["prompt"].tolist(),
        cfg,
        device,
        ctx.store,
        timer,
        "extractor",
        extra_prompts=[ex_prompt(ln) for ln in flat_lines],
    )
    ex_block: dict[str, Any] = {}
    tables = []
    for role, g in gens.items():
        ex_block[role], table = extractor_evaluate(ex_df, [x.text for x in g], rel_tol=cfg.rel_tol)
        tables.append(_with_generation_info(table, role, g))
    if "base" in ex_block:
        ex_block["delta"] = deltas(
            ex_block["fine_tuned"]["overall"], ex_block["base"]["overall"], EXTRACTOR_DELTA_KEYS
        )
    metrics["extractor"] = ex_block
    pd.concat(tables, ignore_index=True).to_parquet(pred_dir / "extractor.parquet", index=False)

    # ---- classifier --------------------------------------------------------------------------
    t0 = time.time()
    clf = load_classifier(ctx.upstream["train_classifier"].dir, device)
    timer.add("classifier.load", t0)
    t0 = time.time()
    p_val = [float(p) for p in clf.predict_proba(cl_val[CLASSIFIER_TEXT].tolist())]
    p_test = [float(p) for p in clf.predict_proba(cl_test[CLASSIFIER_TEXT].tolist())]
    timer.add("classifier.predict", t0)
    del clf
    y_val, y_test = cl_val["label"].astype(int).tolist(), cl_test["label"].astype(int).tolist()
    if len(set(y_val)) == 2:
        threshold, source = choose_threshold(y_val, p_val, metric=cfg.threshold_metric), "validation"
    else:
        threshold, source = 0.5, "default (validation has one class)"
    cl_block = classifier_metrics(y_test, p_test, threshold) if y_test else {"n": 0, "threshold": threshold}
    cl_block.update(
        threshold_metric=cfg.threshold_metric,
        threshold_source=source,
        validation=classifier_metrics(y_val, p_val, threshold) if y_val else None,
    )
    metrics["classifier"] = {"fine_tuned": cl_block}
    pd.DataFrame(
        {
            "id": cl_test["id"],
            "label": y_test,
            "error_type": cl_test.get("error_type", pd.Series([""] * len(cl_test))).fillna(""),
            "prob_flawed": p_test,
            "pred": [int(p >= threshold) for p in p_test],
        }
    ).to_parquet(pred_dir / "classifier.parquet", index=False)

    # ---- two-stage verdict -------------------------------------------------------------------
    t0 = time.time()
    texts = [g.text for g in line_gens]
    line_outputs, k = [], 0
    for ls in lines:
        line_outputs.append(texts[k : k + len(ls)])
        k += len(ls)
    v_metrics, v_table = verdict_evaluate(
        cl_test, lines, line_outputs, p_test, threshold, cfg.computational_error_types, cfg.rel_tol
    )
    v_metrics["extractor_prompts"] = len(flat_lines)
    metrics["verdict"] = v_metrics
    v_table.to_parquet(pred_dir / "verdict.parquet", index=False)
    timer.add("verdict.score", t0)

    # ---- plots + report ----------------------------------------------------------------------
    t0 = time.time()
    written = _plots(metrics, ctx.upstream, plot_dir)
    timer.add("plots", t0)
    metrics["meta"] = {
        "device": device,
        "decoding": decoding,
        "max_examples": cfg.max_examples,
        "n_examples": {
            "function_calling": len(fc_df),
            "extractor": len(ex_df),
            "classifier_test": len(cl_test),
            "classifier_validation": len(cl_val),
            "verdict_solutions": len(cl_test),
            "verdict_lines": len(flat_lines),
        },
        "base_models": {
            t: base_model_name(ctx.upstream[t]) for t in ("train_function_calling", "train_extractor")
        },
        "seconds": timer.seconds,
        "plots": [p.relative_to(out).as_posix() for p in written],
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=_json_default))
    write_report(out / REPORT_FILE, metrics, [p.relative_to(out).as_posix() for p in written])
    return _summary(metrics, timer)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _plots(metrics: dict[str, Any], upstream: dict[str, Artifact], plot_dir: Path) -> list[Path]:
    written: list[Path] = []
    fc = metrics["function_calling"]
    models = {m: fc[m] for m in ("fine_tuned", "base") if m in fc}
    for group in ("dialect", "domain"):
        key = f"by_{group}"
        if all(key in b for b in models.values()):
            written.append(
                plots.group_bars_png(
                    {m: b[key] for m, b in models.items()},
                    ("tool_name_accuracy", "exact_match", "parse_ok_rate"),
                    f"Function calling by {group}",
                    plot_dir / f"fc_by_{group}.png",
                )
            )
    cl = metrics["classifier"]["fine_tuned"]
    if "confusion_matrix" in cl:
        written.append(
            plots.confusion_matrix_png(
                cl["confusion_matrix"],
                cl["labels"],
                f"Classifier (threshold {cl['threshold']:.3f})",
                plot_dir / "classifier_confusion.png",
            )
        )
    v = metrics["verdict"]
    if "confusion_matrix" in v:
        written.append(
            plots.confusion_matrix_png(
                v["confusion_matrix"], v["labels"], "Two-stage verdict", plot_dir / "verdict_confusion.png"
            )
        )
    logs = {t: plots.read_train_log(upstream[t].dir / "train_log.jsonl") for t in TRAINING if t in upstream}
    written.append(plots.loss_curves_png(logs, plot_dir / "train_loss.png"))
    return written
