"""The promotion gate's statistics: per-example scores, a paired bootstrap, and the decision.

A challenger is promoted only when

1. it beats its own base on the headline metric: the lower bound of the 95% paired-bootstrap interval
   of the improvement (challenger - base) is above ``min_delta``, for the first version too (a
   fine-tune not clearly better than its base is registered but never promoted); the classifier, whose
   base has no trained head, is compared with the majority-class baseline on the same rows;
2. there is no champion yet, or the champion was scored on the *same test rows under the same
   evaluation config* (``dagtune.registry.rescore``) and the lower bound of the 95% paired-bootstrap
   interval of the improvement (challenger - champion) is above ``min_delta``;
3. no per-dialect / per-domain group of the headline metric drops by more than ``max_group_drop``.

When the champion cannot be scored that way, the gate fails and says why: it never promotes on
numbers computed under another config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
LABEL_METRICS = ("macro_f1", "accuracy", "balanced_accuracy", "f1_flawed")
_EPS = 1e-12


@dataclass(frozen=True)
class TaskScores:
    """One model's scores on a task's test rows: ``values`` per example (NaN where the metric does
    not apply to a row, e.g. tool-name accuracy on a no-call request) or, for label metrics, the
    (gold, predicted) label pairs."""

    metric: str
    ids: tuple[str, ...]
    values: np.ndarray  # shape (n,) for mean metrics; (n, 2) [gold, pred] for label metrics

    @property
    def n(self) -> int:
        return len(self.ids)

    def stats(self, idx: np.ndarray) -> np.ndarray:
        """The metric on each row of resampled indices ``idx`` (shape (B, n)) -> shape (B,)."""
        if self.metric in LABEL_METRICS:
            return label_metric(self.values[idx, 0], self.values[idx, 1], self.metric)
        with np.errstate(invalid="ignore"):
            return np.nanmean(self.values[idx], axis=-1)

    def value(self) -> float:
        return float(self.stats(np.arange(self.n)[None, :])[0])

    def aligned(self, ids: tuple[str, ...]) -> TaskScores:
        """These scores in the row order of ``ids`` (which must be the same set of rows)."""
        pos = {i: k for k, i in enumerate(self.ids)}
        return TaskScores(self.metric, ids, self.values[[pos[i] for i in ids]])


def label_metric(gold: np.ndarray, pred: np.ndarray, metric: str) -> np.ndarray:
    """Vectorised classification metrics over the last axis (1 = flawed, 0 = correct)."""
    gold, pred = gold.astype(bool), pred.astype(bool)
    tp = (gold & pred).sum(-1)
    tn = (~gold & ~pred).sum(-1)
    fp = (~gold & pred).sum(-1)
    fn = (gold & ~pred).sum(-1)
    n = gold.shape[-1]
    if metric == "accuracy":
        return (tp + tn) / n

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros(a.shape, dtype=float), where=b > 0)

    f1_flawed = ratio(2 * tp, 2 * tp + fp + fn)
    if metric == "f1_flawed":
        return f1_flawed
    if metric == "balanced_accuracy":
        return (ratio(tp, tp + fn) + ratio(tn, tn + fp)) / 2
    return (f1_flawed + ratio(2 * tn, 2 * tn + fn + fp)) / 2


def paired_bootstrap(
    challenger: TaskScores,
    reference: TaskScores,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
    """Improvement challenger - reference on the same rows, with its 95% percentile interval from
    ``resamples`` paired resamples of the rows (fixed seed: the same inputs give the same interval)."""
    ref = reference.aligned(challenger.ids)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, challenger.n, size=(resamples, challenger.n))
    diffs = challenger.stats(idx) - ref.stats(idx)
    diffs = diffs[~np.isnan(diffs)]
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha]) if diffs.size else (np.nan, np.nan)
    return {
        "challenger": challenger.value(),
        "reference": ref.value(),
        "delta": challenger.value() - ref.value(),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n": challenger.n,
        "resamples": resamples,
        "seed": seed,
    }


def majority_baseline(scores: TaskScores) -> TaskScores:
    """Label metrics only: the constant prediction of the rows' most frequent gold label."""
    gold = scores.values[:, 0]
    majority = float(np.round(gold.mean() + _EPS)) if gold.size else 0.0
    return TaskScores(scores.metric, scores.ids, np.stack([gold, np.full_like(gold, majority)], axis=1))


# ----------------------------------------------------------------------------------------------
# per-group drops (from the metrics.json blocks of the challenger and the re-scored champion)
# ----------------------------------------------------------------------------------------------
def lookup(metrics: Mapping[str, Any], metric: str) -> float | None:
    """A metric at the top level, under ``overall`` (evaluation's grouped layout) or at a dotted path."""
    for candidate in (metrics, metrics.get("overall")):
        if isinstance(candidate, Mapping):
            node: Any = candidate
            for part in metric.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            if isinstance(node, int | float) and not isinstance(node, bool):
                return float(node)
    return None


def _groups(metrics: Mapping[str, Any], keys: tuple[str, ...] | None) -> dict[str, Mapping[str, Any]]:
    names = keys if keys is not None else tuple(k for k in metrics if k.startswith("by_"))
    return {k: metrics[k] for k in names if isinstance(metrics.get(k), Mapping)}


def _group_value(entry: Any, metric: str) -> tuple[float | None, int | None]:
    if isinstance(entry, int | float) and not isinstance(entry, bool):
        return float(entry), None
    if isinstance(entry, Mapping):
        n = entry.get("n")
        return lookup(entry, metric), int(n) if isinstance(n, int | float) else None
    return None, None


def group_drops(
    challenger: Mapping[str, Any], champion: Mapping[str, Any], gate: Any
) -> tuple[bool, list[str]]:
    """No group value (per dialect, per domain, ...) may drop by more than max_group_drop; a group
    the champion was measured on but the challenger was not fails (the comparison cannot be made);
    groups under min_group_size examples are not checked."""
    ok, reasons = True, []
    new_groups = _groups(challenger, gate.group_keys)
    for key, old_groups in _groups(champion, gate.group_keys).items():
        for group, old_entry in old_groups.items():
            old_v, old_n = _group_value(old_entry, gate.metric)
            if old_v is None or (old_n is not None and old_n < gate.min_group_size):
                continue
            new_v, new_n = _group_value(new_groups.get(key, {}).get(group), gate.metric)
            if new_v is None:
                ok = False
                reasons.append(f"{key}[{group}]: challenger has no {gate.metric}")
                continue
            if new_n is not None and new_n < gate.min_group_size:
                continue
            if old_v - new_v > gate.max_group_drop + _EPS:
                ok = False
                reasons.append(
                    f"{key}[{group}] {gate.metric} dropped {old_v - new_v:.4f} "
                    f"({old_v:.4f} -> {new_v:.4f}) > max_group_drop {gate.max_group_drop:g}"
                )
    return ok, reasons


# ----------------------------------------------------------------------------------------------
# the decision
# ----------------------------------------------------------------------------------------------
@dataclass
class Evidence:
    """What the gate decides on, for one model: scores of the challenger, its base and (when there
    is one) the champion, on the same rows; metrics blocks for the group checks."""

    challenger: TaskScores | None
    base: TaskScores | None
    base_kind: str = "base model"  # or "majority-class baseline"
    champion_version: str | None = None
    champion: TaskScores | None = None
    champion_source: str = ""  # how the champion was scored, or why it could not be
    challenger_metrics: Mapping[str, Any] | None = None
    champion_metrics: Mapping[str, Any] | None = None


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    details: dict[str, Any] = field(default_factory=dict)


def _fmt(c: Mapping[str, float]) -> str:
    return f"{c['delta']:+.4f} (95% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], n={c['n']})"


def _vs_base(ev: Evidence, gate: Any) -> tuple[bool, str, dict[str, Any] | None]:
    # The same rule as against the champion: a point estimate above the base is not enough, the
    # interval's lower bound must clear min_delta (a CI of [-0.136, +0.236] once promoted a classifier).
    if ev.base is None:
        return False, f"no {ev.base_kind} scores on the test rows: cannot check that it beats its base", None
    c = paired_bootstrap(ev.challenger, ev.base)  # type: ignore[arg-type]
    won = c["ci_low"] > gate.min_delta + _EPS
    verdict = "beats" if won else "does not beat"
    rel = "above" if won else "not above"
    text = (
        f"{gate.metric} {c['challenger']:.4f} {verdict} its {ev.base_kind} {c['reference']:.4f}: "
        f"{_fmt(c)}; lower bound {rel} min_delta {gate.min_delta:g}"
    )
    return won, text, c


def _vs_champion(ev: Evidence, gate: Any) -> tuple[bool, str, dict[str, Any] | None]:
    if ev.champion is None:
        return (
            False,
            f"champion v{ev.champion_version} could not be re-scored on the same test rows and "
            f"evaluation config ({ev.champion_source}); not promoted automatically: compare by hand, "
            "then `dagtune promote`",
            None,
        )
    if set(ev.champion.ids) != set(ev.challenger.ids):  # type: ignore[union-attr]
        return False, f"champion v{ev.champion_version} was scored on other rows; not promoted", None
    c = paired_bootstrap(ev.challenger, ev.champion)  # type: ignore[arg-type]
    ok = c["ci_low"] > gate.min_delta + _EPS
    rel = "above" if ok else "not above"
    text = (
        f"{gate.metric} vs champion v{ev.champion_version} ({ev.champion_source}): {_fmt(c)}; "
        f"lower bound {rel} min_delta {gate.min_delta:g}"
    )
    return ok, text, c


def decide(ev: Evidence, gate: Any) -> GateResult:
    """Apply the three rules of the module docstring; every rule's outcome is in ``reasons``."""
    details: dict[str, Any] = {"metric": gate.metric, "min_delta": gate.min_delta}
    if ev.challenger is None or ev.challenger.n == 0:
        return GateResult(False, [f"challenger has no per-example {gate.metric} scores"], details)
    ok_base, why_base, details["vs_base"] = _vs_base(ev, gate)
    reasons = [why_base]
    if ev.champion_version is None:
        reasons.append("no champion yet")
        return GateResult(ok_base, reasons, details)
    details["champion_version"] = ev.champion_version
    details["champion_source"] = ev.champion_source
    ok_champ, why_champ, details["vs_champion"] = _vs_champion(ev, gate)
    reasons.append(why_champ)
    ok_groups = True
    if ev.challenger_metrics is not None and ev.champion_metrics is not None:
        ok_groups, group_reasons = group_drops(ev.challenger_metrics, ev.champion_metrics, gate)
        reasons.extend(group_reasons)
    return GateResult(ok_base and ok_champ and ok_groups, reasons, details)
