"""What the Prefect tasks call, kept free of Prefect so it is testable and reusable.

``run_task`` applies ``--only`` / ``--force`` and runs one node through the artifact store;
``cache_record_key`` gives Prefect's task cache the same content key; ``prepare_environment`` points
Prefect (home, local result storage) at the project's state directory before Prefect is imported.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from dagtune.config import PipelineConfig
from dagtune.pipeline import node_inputs, run_node
from dagtune.store import PREFECT_RECORD, Artifact, ArtifactStore, content_key

log = logging.getLogger("dagtune")


class UpstreamMissing(RuntimeError):
    """--only skipped a node whose artifact does not exist yet."""


def _artifacts(upstream: dict[str, dict], root: Path) -> dict[str, Artifact]:
    # Results (and so Prefect's cache records) hold paths relative to the artifact root: a state dir
    # moved or copied elsewhere reads its own artifacts, never the original location's.
    return {k: Artifact(v["node"], v["key"], str(root / v["path"])) for k, v in upstream.items()}


def _relative(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def node_key(name: str, cfg: PipelineConfig, upstream: dict[str, dict]) -> str:
    return content_key(node_inputs(name, cfg, {k: v["key"] for k, v in upstream.items()}))


def cache_record_key(
    name: str, cfg: PipelineConfig, upstream: dict[str, dict], force: list[str]
) -> str | None:
    """Prefect cache key: a path under prefect_results_dir; None (no cache) when the node is forced."""
    if name in (force or []):
        return None
    key = node_key(name, cfg, upstream)
    record = f"{name}/{key}/{PREFECT_RECORD}"
    stored = prefect_results_dir(cfg) / record
    # Prefect serves its record only while the artifact is there and intact (verified here; a damaged
    # one is moved aside) and while the record belongs to this state dir: otherwise the record goes,
    # the task runs (reusing the artifact, or rebuilding it) and Prefect writes a fresh one.
    if ArtifactStore(cfg.artifact_root).get(name, key) is None or not _record_is_local(stored):
        stored.unlink(missing_ok=True)
    return record


def _record_is_local(stored: Path) -> bool:
    """Prefect writes its record's own absolute path into it (metadata.storage_key) and writes there
    again on a cache hit: a record copied with a moved state dir would recreate the old location."""
    import json

    try:
        meta = json.loads(stored.read_bytes()).get("metadata") or {}
    except FileNotFoundError:
        return True
    except (OSError, ValueError, AttributeError):
        return False
    where = meta.get("storage_key")
    return where is None or Path(where) == stored.resolve()


def prefect_results_dir(cfg: PipelineConfig) -> Path:
    """Prefect's result storage: beside the artifact store, never inside it."""
    return cfg.state_dir / "prefect-results"


def run_task(
    name: str,
    cfg: PipelineConfig,
    upstream: dict[str, dict],
    only: list[str] | None = None,
    force: list[str] | None = None,
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
) -> dict[str, Any]:
    """Run (or reuse) one node; returns a JSON-able result with the artifact reference."""
    if only and name not in only:
        key = node_key(name, cfg, upstream)
        art = ArtifactStore(cfg.artifact_root).get(name, key)
        if art is None:
            raise UpstreamMissing(
                f"node {name} is not selected by --only and has no artifact for key {key[:12]}; "
                f"run it first or add it to --only"
            )
        result = {"name": name, "status": "cached", "seconds": 0.0, "key": key, "artifact": art.path}
    else:
        art, res = run_node(
            name,
            cfg,
            _artifacts(upstream, cfg.artifact_root),
            force=name in (force or []),
            flow_run={"id": flow_run_id, "url": flow_run_url},
        )
        result = res.to_dict()
    log.info("node %s: %s in %.1fs (%s)", name, result["status"], result["seconds"], result["key"][:12])
    rel = _relative(art.path, cfg.artifact_root)
    return {**result, "artifact": rel, "node": name, "path": rel, "flow_run_id": flow_run_id}


def _row(name: str, status: str, seconds: float, key: str, artifact: str | None) -> dict[str, Any]:
    return {"name": name, "status": status, "seconds": seconds, "key": key, "artifact": artifact}


def summarize(
    results: list[dict[str, Any]], flow_run_id: str | None, root: Path | None = None
) -> list[dict[str, Any]]:
    """Per-node rows for `dagtune run --json`. A result recorded by another flow run came from
    Prefect's task cache without the task running: it is `cached`. Artifact paths are resolved
    against ``root`` (results hold them relative to it)."""
    rows = []
    for r in results:
        status, seconds = r["status"], r["seconds"]
        if flow_run_id and r.get("flow_run_id") and r["flow_run_id"] != flow_run_id:
            status, seconds = "cached", 0.0
        artifact = str(root / r["artifact"]) if root and r["artifact"] else r["artifact"]
        rows.append(_row(r["name"], status, seconds, r["key"], artifact))
    return rows


def failure_rows(cfg: PipelineConfig, started: float) -> list[dict[str, Any]]:
    """After a failed run: an artifact finished during this run is `ran`, an older one `cached`, a
    missing one `failed` (the failing node and what it blocked)."""
    import time

    from dagtune.pipeline import node_status

    rows = []
    for r in node_status(cfg):
        status = "failed"
        if r["exists"]:
            status = "ran" if time.time() - r["age_seconds"] >= started else "cached"
        rows.append(_row(r["name"], status, 0.0, r["key"], r["artifact"]))
    return rows


def prepare_environment(cfg: PipelineConfig) -> None:
    """Point Prefect at the project's state dir (embedded default: ephemeral local server, SQLite under
    <state_dir>/prefect, results in <state_dir>/prefect-results) and remove temp dirs of killed runs.
    Must run before Prefect is imported; an explicit PREFECT_API_URL / PREFECT_HOME in the
    environment wins."""
    state = cfg.state_dir
    state.mkdir(parents=True, exist_ok=True)
    cfg.artifact_root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    # Prefect's records and result files live beside the store, never inside it (the artifact root
    # holds artifacts only); they hold paths relative to the artifact root.
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(prefect_results_dir(cfg))
    ArtifactStore(cfg.artifact_root).clean_tmp()
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
