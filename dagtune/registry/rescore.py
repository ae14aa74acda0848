"""Scores for the gate: the challenger's and its base's from this run's ``evaluate`` artifact, and the
champion's on the same test rows under the same evaluation config.

The champion is found through its registry tags (``dagtune.artifacts``: the training node and key
its version was made from) and scored, in this order:

1. from an ``evaluate`` artifact in the store that evaluated exactly that training key on the same
   ``prepare_data`` key, with the same evaluate config and evaluation code (its predictions are the
   champion's scores on these rows: nothing to recompute);
2. by running the evaluation functions again on the champion's training artifact (``merged/`` or
   ``adapter/``; the classifier through the registered loader) on this run's test rows, with this
   run's evaluate config;
3. otherwise it is unavailable, and the gate says why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dagtune.registry.gate import LABEL_METRICS, TaskScores, majority_baseline
from dagtune.store import Artifact, ArtifactStore

log = logging.getLogger("dagtune.registry")

TRAIN_NODE = {
    "function_calling": "train_function_calling",
    "extractor": "train_extractor",
    "classifier": "train_classifier",
}
PREDICTIONS = "predictions/{task}.parquet"


class Unavailable(Exception):  # noqa: N818 - reads as "champion scores unavailable: why"
    """The champion cannot be scored on the same rows and config; the message says why."""


@dataclass(frozen=True)
class Scored:
    scores: TaskScores
    metrics: Mapping[str, Any] | None  # the metrics.json-style block (for the group checks)
    source: str


# ----------------------------------------------------------------------------------------------
# from a predictions table
# ----------------------------------------------------------------------------------------------
def scores_from_table(table: Any, metric: str) -> TaskScores:
    """Per-example scores of one model from an evaluate predictions table (one row per example)."""
    ids = tuple(str(i) for i in table["id"])
    if metric in LABEL_METRICS:
        if not {"label", "pred"} <= set(table.columns):
            raise Unavailable(f"predictions have no label/pred columns for {metric}")
        values = np.stack([table["label"].astype(float), table["pred"].astype(float)], axis=1)
    else:
        if metric not in table.columns:
            raise Unavailable(f"predictions have no per-example column {metric!r}")
        values = np.array([np.nan if v is None else float(v) for v in table[metric]], dtype=float)
    return TaskScores(metric, ids, values)


def _predictions(evaluate: Artifact, task: str) -> Any:
    import pandas as pd

    p = evaluate.dir / PREDICTIONS.format(task=task)
    if not p.is_file():
        raise Unavailable(f"evaluate artifact {evaluate.key[:12]} has no {p.name}")
    return pd.read_parquet(p)


def _role(table: Any, role: str) -> Any:
    if "model" not in table.columns:  # the classifier's table holds the fine-tune only
        return table if role == "fine_tuned" else None
    sub = table[table["model"] == role].reset_index(drop=True)
    return sub if len(sub) else None


def _metrics_block(evaluate: Artifact, task: str, role: str) -> Mapping[str, Any] | None:
    p = evaluate.dir / "metrics.json"
    if not p.is_file():
        return None
    return (json.loads(p.read_text()).get(task) or {}).get(role)


def run_scores(evaluate: Artifact, task: str, metric: str) -> tuple[Scored | None, Scored | None]:
    """(challenger = this run's fine-tune, its base or the classifier's majority baseline)."""
    try:
        table = _predictions(evaluate, task)
        challenger = scores_from_table(_role(table, "fine_tuned"), metric)
    except Unavailable as e:
        log.warning("gate: %s: %s", task, e)
        return None, None
    ft = Scored(challenger, _metrics_block(evaluate, task, "fine_tuned"), f"evaluate {evaluate.key[:12]}")
    if task == "classifier":
        return ft, Scored(majority_baseline(challenger), None, "majority-class baseline")
    base_table = _role(table, "base")
    if base_table is None:
        return ft, None
    base = Scored(scores_from_table(base_table, metric), _metrics_block(evaluate, task, "base"), "base")
    return ft, base


# ----------------------------------------------------------------------------------------------
# the champion
# ----------------------------------------------------------------------------------------------
def champion_training_key(version: Any, task: str) -> str:
    """The training artifact key a registered version was made from (its ``dagtune.artifacts`` tag)."""
    raw = (version.tags or {}).get("dagtune.artifacts")
    if not raw:
        raise Unavailable("its version has no dagtune.artifacts tag")
    roles = json.loads(raw)
    node = TRAIN_NODE[task]
    keys = {info.get("key") for info in roles.values() if info.get("node") == node}
    if len(keys) != 1:
        raise Unavailable(f"its dagtune.artifacts tag names no single {node} key")
    return keys.pop()


def _same_conditions(candidate: Mapping[str, Any], current: Mapping[str, Any], node: str) -> bool:
    ci, cu = candidate.get("inputs", {}), current.get("inputs", {})
    return (
        ci.get("config") == cu.get("config")
        and (ci.get("code") or {}).get("sources") == (cu.get("code") or {}).get("sources")
        and (ci.get("upstream") or {}).get("prepare_data") == (cu.get("upstream") or {}).get("prepare_data")
        and node in (ci.get("upstream") or {})
    )


def _from_earlier_evaluate(
    store: ArtifactStore, evaluate: Artifact, task: str, train_key: str, metric: str
) -> Scored | None:
    node, current = TRAIN_NODE[task], evaluate.manifest()
    for key in store.list_keys("evaluate"):
        art = store.get("evaluate", key)
        if art is None or key == evaluate.key:
            continue
        m = art.manifest()
        if _same_conditions(m, current, node) and m["inputs"]["upstream"][node] == train_key:
            table = _role(_predictions(art, task), "fine_tuned")
            source = f"its predictions in evaluate {key[:12]} (same rows, config and code)"
            return Scored(scores_from_table(table, metric), _metrics_block(art, task, "fine_tuned"), source)
    return None


def champion_scores(
    store: ArtifactStore,
    evaluate: Artifact,
    data: Artifact,
    task: str,
    version: Any,
    metric: str,
    rescore: Any,
) -> Scored:
    """The champion's scores on this run's test rows (see module docstring); raises Unavailable.
    ``rescore(train_artifact, data, evaluate_config, task, metric) -> Scored`` re-runs evaluation."""
    train_key = champion_training_key(version, task)
    train = store.get(TRAIN_NODE[task], train_key)
    if train is None:
        raise Unavailable(f"its training artifact {TRAIN_NODE[task]}/{train_key[:12]} is not in the store")
    earlier = _from_earlier_evaluate(store, evaluate, task, train_key, metric)
    if earlier is not None:
        return earlier
    eval_config = evaluate.manifest()["inputs"]["config"]
    return rescore(train, data, eval_config, task, metric)


# ----------------------------------------------------------------------------------------------
# re-running the evaluation functions on the champion's training artifact
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rescorer:
    """Runs evaluate's own functions for one model on the test split, with evaluate's config."""

    store: ArtifactStore
    device: str
    classifier_loader: str

    def __call__(
        self, train: Artifact, data: Artifact, eval_config: Mapping[str, Any], task: str, metric: str
    ) -> Scored:
        from dagtune.config import EvaluateConfig

        cfg = EvaluateConfig.model_validate(dict(eval_config))
        if task == "classifier":
            table, block = self._classifier(train, data.dir, cfg)
        else:
            table, block = self._generative(train, data.dir, cfg, task)
        source = f"re-scored from {train.node}/{train.key[:12]} on this run's test rows"
        log.info("gate: champion %s %s", task, source)
        return Scored(scores_from_table(table, metric), block, source)

    def _generative(self, train: Artifact, data_dir: Path, cfg: Any, task: str) -> tuple[Any, Any]:
        from dagtune.evaluation.generate import Generator
        from dagtune.evaluation.node import fine_tuned_paths, read_split
        from dagtune.evaluation.tasks import extractor_evaluate, fc_evaluate, subsample
        from dagtune.models import base_revision, resolve_model

        df = subsample(read_split(data_dir, task, "test"), cfg.max_examples, cfg.seed)
        model_path, adapter, base_name = fine_tuned_paths(train)
        path = model_path or resolve_model(base_name, self.store, base_revision(train.manifest()))
        g = Generator(path, adapter_path=adapter, device=self.device)
        try:
            texts = [x.text for x in g.generate(df["prompt"].tolist(), cfg.batch_size, cfg.max_new_tokens)]
        finally:
            g.close()
        if task == "function_calling":
            block, table = fc_evaluate(df, texts, arabic=cfg.arabic_normalization)
        else:
            block, table = extractor_evaluate(df, texts, rel_tol=cfg.rel_tol)
        return table, block

    def _classifier(self, train: Artifact, data_dir: Path, cfg: Any) -> tuple[Any, Any]:
        import pandas as pd

        from dagtune.evaluation.metrics import choose_threshold, classifier_metrics
        from dagtune.evaluation.node import CLASSIFIER_TEXT, FlawedProbability, read_split
        from dagtune.evaluation.tasks import subsample
        from dagtune.registry.models import import_string, load_on_device

        test = subsample(read_split(data_dir, "classifier", "test"), cfg.max_examples, cfg.seed)
        val = subsample(read_split(data_dir, "classifier", "validation"), cfg.max_examples, cfg.seed)
        loaded = load_on_device(import_string(self.classifier_loader), train.dir, self.device)
        clf = FlawedProbability(loaded[0] if isinstance(loaded, tuple) else loaded)
        p_val = clf.predict_proba(val[CLASSIFIER_TEXT].tolist())
        p_test = clf.predict_proba(test[CLASSIFIER_TEXT].tolist())
        y_val, y_test = val["label"].astype(int).tolist(), test["label"].astype(int).tolist()
        threshold = (
            choose_threshold(y_val, p_val, metric=cfg.threshold_metric) if len(set(y_val)) == 2 else 0.5
        )
        table = pd.DataFrame(
            {"id": test["id"], "label": y_test, "pred": [int(p >= threshold) for p in p_test]}
        )
        return table, classifier_metrics(y_test, p_test, threshold)
