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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dagtune.data.split import read_split
from dagtune.evaluation import plots
from dagtune.evaluation.generate import TASK_STOP_STRINGS, Generator, resolve_device
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
    batch_size = cfg.batch_size if device == "cpu" else cfg.cuda_batch_size
    stops = TASK_STOP_STRINGS[task]
    for role, (path, adapter_path) in roles.items():
        t0 = time.time()
        g = Generator(
            path,
            adapter_path=adapter_path,
            device=device,
            max_auto_batch=cfg.cuda_max_batch_size,
            memory_fraction=cfg.cuda_memory_fraction,
        )
        timer.add(f"{task}.{role}.load", t0)
        try:
            t0 = time.time()
            gens[role] = g.generate(prompts, batch_size, cfg.max_new_tokens, stops)
            timer.add(f"{task}.{role}.generate", t0)
            decoding[role] = {**g.decoding_config(batch_size, cfg.max_new_tokens, stops), "model": path}
            if adapter_path:
                decoding[role]["adapter"] = adapter_path
            if role == "fine_tuned" and extra_prompts:
                t0 = time.time()
                extra = g.generate(extra_prompts, batch_size, cfg.max_new_tokens, stops)
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


@dataclass
class _Splits:
    fc: pd.DataFrame
    ex: pd.DataFrame
    cl_test: pd.DataFrame
    cl_val: pd.DataFrame
    ex_prompt: Any
    lines: list[list[str]]

    @property
    def flat_lines(self) -> list[str]:
        return [ln for ls in self.lines for ln in ls]


def _splits(data_dir: Path, cfg: Any) -> _Splits:
    """The test splits (subsampled to max_examples), the classifier's validation split, the solutions'
    lines, and the line -> prompt renderer (from the extractor's training rows: they are the most)."""
    n, seed = cfg.max_examples, cfg.seed
    cl_test = subsample(read_split(data_dir, "classifier", "test"), n, seed)
    ex_prompt = ExtractorPrompt.from_rows(
        pd.concat([read_split(data_dir, "extractor", s) for s in ("train", "test")], ignore_index=True)
    )
    return _Splits(
        fc=subsample(read_split(data_dir, "function_calling", "test"), n, seed),
        ex=subsample(read_split(data_dir, "extractor", "test"), n, seed),
        cl_test=cl_test,
        cl_val=subsample(read_split(data_dir, "classifier", "validation"), n, seed),
        ex_prompt=ex_prompt,
        lines=solution_lines(cl_test["solution"].tolist()),
    )


def _score_roles(gens: dict[str, Any], score: Any, pred_path: Path) -> dict[str, Any]:
    """Score each role's generations (fine_tuned, base), write the prediction table, return the blocks."""
    block: dict[str, Any] = {}
    tables = []
    for role, g in gens.items():
        block[role], table = score([x.text for x in g])
        tables.append(_with_generation_info(table, role, g))
    pd.concat(tables, ignore_index=True).to_parquet(pred_path, index=False)
    return block


def _function_calling(
    ctx: Any, sp: _Splits, device: str, timer: _Timer, decoding: dict, pred_dir: Path
) -> dict:
    cfg = ctx.section
    gens, decoding["function_calling"], _ = _generate_roles(
        ctx.upstream["train_function_calling"], sp.fc["prompt"].tolist(), cfg, device, ctx.store, timer,
        "function_calling",
    )  # fmt: skip
    score = lambda texts: fc_evaluate(sp.fc, texts, arabic=cfg.arabic_normalization)  # noqa: E731
    block = _score_roles(gens, score, pred_dir / "function_calling.parquet")
    if "base" in block:
        block["delta"] = fc_delta_block(block["fine_tuned"], block["base"])
    return block


def _extractor(ctx: Any, sp: _Splits, device: str, timer: _Timer, decoding: dict, pred_dir: Path) -> tuple:
    """The extractor's test block, and its generations on the verdict's solution lines (same loaded model)."""
    cfg = ctx.section
    gens, decoding["extractor"], line_gens = _generate_roles(
        ctx.upstream["train_extractor"], sp.ex["prompt"].tolist(), cfg, device, ctx.store, timer, "extractor",
        extra_prompts=[sp.ex_prompt(ln) for ln in sp.flat_lines],
    )  # fmt: skip
    score = lambda texts: extractor_evaluate(sp.ex, texts, rel_tol=cfg.rel_tol)  # noqa: E731
    block = _score_roles(gens, score, pred_dir / "extractor.parquet")
    if "base" in block:
        block["delta"] = deltas(
            block["fine_tuned"]["overall"], block["base"]["overall"], EXTRACTOR_DELTA_KEYS
        )
    return block, line_gens


def _classifier(
    ctx: Any, sp: _Splits, device: str, timer: _Timer, pred_dir: Path
) -> tuple[dict, list, float]:
    """P(flawed) on validation and test; the threshold chosen on validation; (block, test probs, threshold)."""
    cfg = ctx.section
    t0 = time.time()
    clf = load_classifier(ctx.upstream["train_classifier"].dir, device)
    timer.add("classifier.load", t0)
    t0 = time.time()
    p_val = [float(p) for p in clf.predict_proba(sp.cl_val[CLASSIFIER_TEXT].tolist())]
    p_test = [float(p) for p in clf.predict_proba(sp.cl_test[CLASSIFIER_TEXT].tolist())]
    timer.add("classifier.predict", t0)
    del clf
    y_val, y_test = sp.cl_val["label"].astype(int).tolist(), sp.cl_test["label"].astype(int).tolist()
    if len(set(y_val)) == 2:
        threshold, source = choose_threshold(y_val, p_val, metric=cfg.threshold_metric), "validation"
    else:
        threshold, source = 0.5, "default (validation has one class)"
    block = classifier_metrics(y_test, p_test, threshold) if y_test else {"n": 0, "threshold": threshold}
    block.update(
        threshold_metric=cfg.threshold_metric,
        threshold_source=source,
        validation=classifier_metrics(y_val, p_val, threshold) if y_val else None,
    )
    error_type = sp.cl_test.get("error_type", pd.Series([""] * len(sp.cl_test))).fillna("")
    pd.DataFrame(
        {"id": sp.cl_test["id"], "label": y_test, "error_type": error_type, "prob_flawed": p_test,
         "pred": [int(p >= threshold) for p in p_test]}
    ).to_parquet(pred_dir / "classifier.parquet", index=False)  # fmt: skip
    return {"fine_tuned": block}, p_test, threshold


def _verdict(ctx: Any, sp: _Splits, line_gens: list, p_test: list, threshold: float, pred_dir: Path) -> dict:
    """The two-stage verdict: the extractor's equation per solution line, then the classifier."""
    texts = [g.text for g in line_gens]
    line_outputs, k = [], 0
    for ls in sp.lines:
        line_outputs.append(texts[k : k + len(ls)])
        k += len(ls)
    v_metrics, v_table = verdict_evaluate(
        sp.cl_test,
        sp.lines,
        line_outputs,
        p_test,
        threshold,
        ctx.section.computational_error_types,
        ctx.section.rel_tol,
    )
    v_metrics["extractor_prompts"] = len(sp.flat_lines)
    v_table.to_parquet(pred_dir / "verdict.parquet", index=False)
    return v_metrics


def _meta(ctx: Any, sp: _Splits, device: str, decoding: dict, timer: _Timer, plots: list[str]) -> dict:
    return {
        "device": device,
        "decoding": decoding,
        "max_examples": ctx.section.max_examples,
        "n_examples": {
            "function_calling": len(sp.fc),
            "extractor": len(sp.ex),
            "classifier_test": len(sp.cl_test),
            "classifier_validation": len(sp.cl_val),
            "verdict_solutions": len(sp.cl_test),
            "verdict_lines": len(sp.flat_lines),
        },
        "base_models": {
            t: base_model_name(ctx.upstream[t]) for t in ("train_function_calling", "train_extractor")
        },
        "seconds": timer.seconds,
        "plots": plots,
    }


def build(ctx: Any) -> dict[str, Any]:
    missing = [u for u in UPSTREAM if u not in ctx.upstream]
    if missing:
        raise ValueError(f"evaluate needs upstream artifacts {missing}")
    device = resolve_device(ctx.runtime.device)
    out: Path = ctx.out
    pred_dir, plot_dir = out / "predictions", out / "plots"
    pred_dir.mkdir(parents=True, exist_ok=True)
    plot_dir.mkdir(parents=True, exist_ok=True)
    timer, decoding = _Timer(), {}
    sp = _splits(ctx.upstream["prepare_data"].dir, ctx.section)
    metrics: dict[str, Any] = {
        "function_calling": _function_calling(ctx, sp, device, timer, decoding, pred_dir)
    }
    metrics["extractor"], line_gens = _extractor(ctx, sp, device, timer, decoding, pred_dir)
    metrics["classifier"], p_test, threshold = _classifier(ctx, sp, device, timer, pred_dir)
    t0 = time.time()
    metrics["verdict"] = _verdict(ctx, sp, line_gens, p_test, threshold, pred_dir)
    timer.add("verdict.score", t0)
    t0 = time.time()
    written = [p.relative_to(out).as_posix() for p in _plots(metrics, ctx.upstream, plot_dir)]
    timer.add("plots", t0)
    metrics["meta"] = _meta(ctx, sp, device, decoding, timer, written)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=_json_default))
    write_report(out / REPORT_FILE, metrics, written)
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
