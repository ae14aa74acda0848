"""What the Prefect tasks call, kept free of Prefect so it is testable and reusable.

``run_task`` applies ``--only`` / ``--force`` and runs one node through the artifact store;
``cache_record_key`` gives Prefect's task cache the same content key; ``prepare_environment`` points
Prefect (home, local result storage) at the project's state directory before Prefect is imported.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from dagtune.config import PipelineConfig
from dagtune.pipeline import NODE_ORDER, NODES, NodeResult, node_inputs, run_node
from dagtune.store import PREFECT_RECORD, Artifact, ArtifactStore, content_key

log = logging.getLogger("dagtune")


class UpstreamMissing(RuntimeError):
    """--only skipped a node whose artifact does not exist yet."""


def _artifacts(upstream: dict[str, dict], root: Path) -> dict[str, Artifact]:
    # Results (and so Prefect's cache records) hold paths relative to the artifact root: a state dir
    # moved or copied elsewhere reads its own artifacts, never the original location's. A node that
    # --only skipped has no artifact.
    return {
        k: Artifact(v["node"], v["key"], str(root / v["path"])) for k, v in upstream.items() if v.get("path")
    }


def _relative(path: str | None, root: Path) -> str | None:
    return Path(path).relative_to(root).as_posix() if path else None


def node_key(name: str, cfg: PipelineConfig, upstream: dict[str, dict]) -> str:
    return content_key(node_inputs(name, cfg, {k: v["key"] for k, v in upstream.items()}))


def selected(name: str, only: list[str] | None) -> bool:
    return not only or name in only


def cache_record_key(
    name: str,
    cfg: PipelineConfig,
    upstream: dict[str, dict],
    force: list[str],
    only: list[str] | None = None,
) -> str | None:
    """Prefect cache key: a path under prefect_results_dir. None (no cache) when the node is forced, or
    not selected by ``only`` (a `skipped` result must never be replayed to a later run)."""
    if name in (force or []) or not selected(name, only):
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
    try:
        meta = json.loads(stored.read_bytes()).get("metadata") or {}
    except FileNotFoundError:
        return True
    except (OSError, ValueError, AttributeError):
        return False
    where = meta.get("storage_key")
    return where is None or Path(where).resolve() == stored.resolve()


def _record_names_elsewhere(stored: Path) -> bool:
    """A complete record whose storage_key is another location (it came with a copied or moved state
    dir). One that does not parse is left alone here: a concurrent run may be writing it, and
    ``cache_record_key`` checks it again before Prefect may use it."""
    try:
        meta = json.loads(stored.read_bytes()).get("metadata") or {}
        where = meta.get("storage_key")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(where, str) and Path(where).resolve() != stored.resolve()


def drop_foreign_records(cfg: PipelineConfig) -> list[str]:
    """Remove Prefect records that name another state dir: those of keys this run uses are replaced
    anyway (``cache_record_key``), but records of every other key (older configs, other profiles)
    came along with a copied state dir and would still point at the original. Returns them,
    relative to the results dir."""
    root = prefect_results_dir(cfg)
    dropped = []
    for stored in sorted(root.glob(f"*/*/{PREFECT_RECORD}")):
        if _record_names_elsewhere(stored):
            stored.unlink(missing_ok=True)
            dropped.append(stored.relative_to(root).as_posix())
    if dropped:
        log.info("prefect results: removed %d record(s) that name another state dir", len(dropped))
    return dropped


def prefect_results_dir(cfg: PipelineConfig) -> Path:
    """Prefect's result storage: beside the artifact store, never inside it."""
    return cfg.state_dir / "prefect-results"


def _position(name: str) -> str:
    return f"[{NODE_ORDER.index(name) + 1}/{len(NODE_ORDER)}]"


def _unselected_result(name: str, cfg: PipelineConfig, upstream: dict[str, dict]) -> dict[str, Any]:
    """--only left this node out: reuse its artifact when it exists, else it is `skipped`."""
    key = node_key(name, cfg, upstream)
    art = ArtifactStore(cfg.artifact_root).get(name, key)
    status = "cached" if art else "skipped"
    return {"name": name, "status": status, "seconds": 0.0, "key": key, "artifact": art.path if art else None}


def _check_upstream_built(name: str, upstream: dict[str, dict]) -> None:
    missing = [u for u, r in upstream.items() if u in NODES[name].upstream and not r.get("artifact")]
    if missing:
        raise UpstreamMissing(
            f"node {name} needs {missing}, which --only skipped and which are not built yet; "
            f"add them to --only"
        )


def _log_result(name: str, result: dict[str, Any]) -> None:
    took = "not selected and not built" if result["status"] == "skipped" else f"in {result['seconds']:.1f}s"
    log.info("%s node %s: %s %s (key %s)", _position(name), name, result["status"], took, result["key"][:12])
    waited = result.get("wait_seconds")
    if waited:
        log.info("node %s: waited %.1fs for a device slot (not in its seconds)", name, waited)
    if result.get("artifact"):
        from dagtune.report import _manifest_metrics, headline

        metrics = headline(name, _manifest_metrics(result["artifact"]))
        if metrics:
            log.info("node %s: %s", name, json.dumps(metrics, default=str))


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
    from dagtune.logs import ensure_dagtune_logger_level

    ensure_dagtune_logger_level()
    if not selected(name, only):
        result = _unselected_result(name, cfg, upstream)
    else:
        _check_upstream_built(name, upstream)
        log.info("%s node %s: started", _position(name), name)
        art, res = run_node(
            name,
            cfg,
            _artifacts(upstream, cfg.artifact_root),
            force=name in (force or []),
            flow_run={"id": flow_run_id, "url": flow_run_url},
        )
        result = res.to_dict()
    _log_result(name, result)
    rel = _relative(result["artifact"], cfg.artifact_root)
    return {**result, "artifact": rel, "node": name, "path": rel, "flow_run_id": flow_run_id}


def summarize(
    results: list[dict[str, Any]], flow_run_id: str | None, root: Path | None = None
) -> list[dict[str, Any]]:
    """Per-node rows for `dagtune run --json`. A result recorded by another flow run came from
    Prefect's task cache without the task running: it is `cached`. Artifact paths are resolved
    against ``root`` (results hold them relative to it)."""
    rows = []
    for r in results:
        status, seconds, wait = r["status"], r["seconds"], r.get("wait_seconds", 0.0)
        if flow_run_id and r.get("flow_run_id") and r["flow_run_id"] != flow_run_id:
            status, seconds, wait = "cached", 0.0, 0.0
        artifact = str(root / r["artifact"]) if root and r["artifact"] else r["artifact"]
        rows.append(NodeResult(r["name"], status, seconds, r["key"], artifact, wait_seconds=wait).to_dict())
    return rows


def _failure_status(row: dict[str, Any], started: float, forced: bool, picked: bool) -> tuple[str, float]:
    if not row["exists"]:
        return ("failed" if picked else "skipped"), 0.0
    timings = json.loads((Path(row["artifact"]) / "manifest.json").read_text()).get("timings", {})
    if timings.get("finished", 0.0) >= started:
        return "ran", float(timings.get("seconds", 0.0))
    # an older artifact of a node this run had to recompute: the recomputation did not finish
    return ("failed" if forced and picked else "cached"), 0.0


def failure_rows(
    cfg: PipelineConfig,
    started: float,
    only: list[str] | None = None,
    force: list[str] | None = None,
) -> list[dict[str, Any]]:
    """After a failed run: an artifact finished during this run is `ran` (with its build seconds), an older
    one `cached` unless the node was forced (then `failed`), a missing one `failed` (the failing node and
    what it blocked) or `skipped` (not selected by ``only``)."""
    from dagtune.pipeline import node_status

    rows = []
    for r in node_status(cfg):
        forced, picked = r["name"] in (force or []), selected(r["name"], only)
        status, seconds = _failure_status(r, started, forced, picked)
        rows.append(NodeResult(r["name"], status, seconds, r["key"], r["artifact"]).to_dict())
    return rows


def prepare_environment(cfg: PipelineConfig) -> None:
    """Point Prefect at the project's state dir (embedded default: ephemeral local server, SQLite under
    <state_dir>/prefect, results in <state_dir>/prefect-results), remove temp dirs of killed runs and
    Prefect records that came from another state dir.
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
    drop_foreign_records(cfg)
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry
    # The embedded server's first start (SQLite migrations) took over 20 s, Prefect's default wait, on
    # a loaded 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # ...and its SQLite writes hit "database is locked" after Prefect's 10 s connect timeout there.
    os.environ.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", "60")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    add_dagtune_to_prefect_logs(os.environ)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_dagtune_to_prefect_logs(env: MutableMapping[str, str]) -> None:
    """dagtune's records go to the flow run's logs in Prefect (the API handler on the `dagtune` logger);
    outside a run (the CLI before and after the flow) they are not an error."""
    extra = [x for x in env.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if x]
    if "dagtune" not in extra:
        env["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join([*extra, "dagtune"])
    env.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
