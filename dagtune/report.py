"""What a run shows an operator: headline metrics per node, and the run summary published as Prefect
artifacts (a markdown report and a table). Built from the node results and the artifacts' own files
(evaluate's metrics.json, register's registered.json); publishing is the caller's (tasks/report.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dagtune.registry.tracking import redact_uri

# Per node, the manifest metrics worth a line in the run log (others stay in the manifest).
HEADLINE_KEYS: dict[str, tuple[str, ...]] = {
    "prepare_data": ("function_calling_train_rows", "extractor_train_rows", "classifier_train_rows"),
    "train_function_calling": ("steps", "train_loss_last", "val_loss", "train_seconds"),
    "train_extractor": ("steps", "train_loss_last", "val_loss", "train_seconds"),
    "train_classifier": ("steps", "train_loss_last", "val_macro_f1", "train_seconds"),
}
TASK_KEYS = {"function_calling": "fc_", "extractor": "extractor_", "classifier": "classifier_"}


def _short(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v


def _evaluate_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: _short(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "seconds_total"}


def _register_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("version", "gate_passed", "champion")
    return {m: {k: r.get(k) for k in keys if k in r} for m, r in metrics.items() if isinstance(r, dict)}


def _gguf_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for model, files in metrics.items():
        for quant, f in (files if isinstance(files, dict) else {}).items():
            if isinstance(f, dict):
                out[f"{model}_{quant}_top1"] = _short(f.get("parity", {}).get("top1_agreement"))
    return out


def headline(node: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a node's manifest metrics that the run log and the table show."""
    from dagtune.pipeline import NODES

    special = {"evaluate": _evaluate_headline, "register": _register_headline, "convert_gguf": _gguf_headline}
    section = NODES[node].section_name  # the two exports share one section, and its headline
    if section in special:
        return special[section](metrics)
    return {k: _short(metrics[k]) for k in HEADLINE_KEYS.get(node, ()) if k in metrics}


def _manifest_metrics(artifact: str | None) -> dict[str, Any]:
    if not artifact:
        return {}
    p = Path(artifact) / "manifest.json"
    return json.loads(p.read_text()).get("metrics", {}) if p.is_file() else {}


def _read_json(artifact: str | None, name: str) -> dict[str, Any] | None:
    p = Path(artifact, name) if artifact else None
    return json.loads(p.read_text()) if p and p.is_file() else None


def with_artifact_root(results: list[dict[str, Any]], root: Path | None) -> list[dict[str, Any]]:
    """Node results hold artifact paths relative to the artifact root (a state dir can move): resolve
    them for reading."""
    if root is None:
        return results
    return [
        {**r, "artifact": str(Path(root) / r["artifact"]) if r.get("artifact") else None} for r in results
    ]


def metric_rows(results: list[dict[str, Any]], root: Path | None = None) -> list[dict[str, Any]]:
    """The table artifact: one row per (node, metric) of the headline metrics."""
    rows = []
    for r in with_artifact_root(results, root):
        for k, v in headline(r["name"], _manifest_metrics(r.get("artifact"))).items():
            rows.append(
                {"node": r["name"], "metric": k, "value": json.dumps(v) if isinstance(v, dict) else v}
            )
    return rows


def _node_table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| node | status | seconds | key |", "|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | `{r['key'][:12]}` |")
    return lines


def _task_pairs(overall: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(task, metric, fine-tuned, base) for every metric evaluate reports with a base counterpart."""
    out = []
    for task, prefix in TASK_KEYS.items():
        for k, v in overall.items():
            if k.startswith(prefix) and not k.endswith("_base"):
                out.append((task, k[len(prefix) :], v, overall.get(f"{k}_base")))
    return out


def _eval_section(results: list[dict[str, Any]]) -> list[str]:
    ev = next((r for r in results if r["name"] == "evaluate"), None)
    metrics = _manifest_metrics(ev.get("artifact")) if ev else {}
    if not metrics:
        return ["_evaluate has no artifact in this run._"]
    lines = ["| task | metric | fine-tuned | base |", "|---|---|---:|---:|"]
    for task, metric, ft, base in _task_pairs(metrics):
        base_s = "–" if base is None else f"{base:.4f}"
        lines.append(f"| {task} | {metric} | {ft:.4f} | {base_s} |")
    return lines


def _model_link(tracking_uri: str, name: str, version: str) -> str:
    if not tracking_uri.startswith("http"):
        return f"{name} v{version}"
    return f"[{name} v{version}]({tracking_uri.rstrip('/')}/#/models/{quote(name)}/versions/{version})"


def _registry_section(results: list[dict[str, Any]], tracking_uri: str) -> list[str]:
    reg = next((r for r in results if r["name"] == "register"), None)
    registered = _read_json(reg.get("artifact") if reg else None, "registered.json")
    if not registered:
        return ["_register has no artifact in this run._"]
    lines = [f"MLflow parent run: `{registered.get('parent_run_id')}` ({tracking_uri})", ""]
    lines += ["| model | version | gate | champion | reasons |", "|---|---|---|---|---|"]
    for model, m in (registered.get("models") or {}).items():
        gate = {True: "passed", False: "held"}.get(m.get("gate_passed"), "–")
        reasons = "; ".join(m.get("gate_reasons") or []) or "–"
        link = _model_link(tracking_uri, m.get("name", model), str(m.get("version")))
        lines.append(f"| {model} | {link} | {gate} | v{m.get('champion')} | {reasons} |")
    return lines


def run_markdown(
    results: list[dict[str, Any]], profile: str, tracking_uri: str, root: Path | None = None
) -> str:
    """The run's markdown artifact: node table, fine-tuned vs base, gate decisions, MLflow links."""
    results = with_artifact_root(results, root)
    parts = [f"# dagtune run (profile `{profile}`)", "", "## Nodes", *_node_table(results)]
    parts += ["", "## Fine-tuned vs base (test split)", *_eval_section(results)]
    uri = redact_uri(tracking_uri)
    parts += ["", "## Registry and promotion gate", *_registry_section(results, uri)]
    return "\n".join(parts) + "\n"
