"""Why a node is not built: its planned key inputs against the newest artifact of the same node.

Each difference is classified by where it sits in the inputs (see ``pipeline.node_inputs``):

* ``data``     -- ``extra``: source file bytes, hub revisions, base-model/tokenizer identities;
* ``code``     -- ``code`` (a source file or a library version) or the node's ``version``;
* ``config``   -- the node's own config section (``config``) or the resolved device/backend;
* ``upstream`` -- an upstream node's key (that node is rebuilt, so this one is too);
* ``missing``  -- the node was never built in this store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagtune.store import ArtifactStore

KINDS = ("missing", "data", "code", "config", "upstream")
RUNTIME_EXTRA = ("device", "backend")  # extra inputs that come from the runtime section, not data


def newest_manifest(store: ArtifactStore, node: str) -> dict[str, Any] | None:
    """The manifest of the node's most recently finished artifact, or None."""
    from dagtune.store import read_manifest

    best: dict[str, Any] | None = None
    for key in store.list_keys(node):
        m = read_manifest(store.path(node, key))  # inputs only: no verification (status is read-only)
        if m is None or not isinstance(m.get("timings"), dict):
            continue
        if best is None or m["timings"]["finished"] > best["timings"]["finished"]:
            best = m
    return best


def changed_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two JSON-like trees (added and removed keys too)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(path)
            else:
                out.extend(changed_paths(old[k], new[k], path))
        return out
    return [] if old == new else [prefix or "<root>"]


def _kind(path: str) -> str:
    top, _, rest = path.partition(".")
    if top in ("code", "version"):
        return "code"
    if top == "config":
        return "config"
    if top == "upstream":
        return "upstream"
    if top == "extra":
        return "config" if rest.split(".")[0] in RUNTIME_EXTRA else "data"
    return "config"


def _detail(path: str) -> str:
    """Shorter wording for status: 'code.sources.dagtune/training/sft.py' -> 'dagtune/training/sft.py'."""
    for prefix in ("code.sources.", "code.libraries.", "extra.", "config.", "upstream."):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def rebuild_reasons(planned: Mapping[str, Any], newest: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """[{kind, changed: [paths]}] in KINDS order; [{"kind": "missing"}] when there is no artifact."""
    if newest is None:
        return [{"kind": "missing", "changed": []}]
    by_kind: dict[str, list[str]] = {}
    for path in changed_paths(newest.get("inputs", {}), planned):
        by_kind.setdefault(_kind(path), []).append(_detail(path))
    return [{"kind": k, "changed": by_kind[k]} for k in KINDS if k in by_kind]


def why_not_built(store: ArtifactStore, node: str, planned: Mapping[str, Any]) -> list[dict[str, Any]]:
    return rebuild_reasons(planned, newest_manifest(store, node))


def describe(reasons: list[dict[str, Any]], max_items: int = 3) -> str:
    """One line for the CLI: 'code (dagtune/training/sft.py); upstream (prepare_data)'."""
    parts = []
    for r in reasons:
        items = r["changed"]
        shown = ", ".join(items[:max_items]) + (
            f", +{len(items) - max_items} more" if len(items) > max_items else ""
        )
        parts.append(f"{r['kind']} ({shown})" if items else r["kind"])
    return "; ".join(parts)
