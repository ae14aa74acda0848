"""`dagtune gc`: remove artifacts nothing needs any more.

Kept: every artifact the last N runs used (``<state_dir>/runs.jsonl``, one line per `dagtune run`),
the current config's plan, and every artifact a registered model version references (its
``dagtune.artifacts`` tag), for the DAG's nodes and the retired ones (``RETIRED_NODES``). The registry
must answer: without it nothing is deleted. Each deleted key also loses its scratch dir, lock file and
Prefect record; temp dirs of killed runs go too. An artifact whose key lock is held (a run is building
or reading it) is skipped.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from dagtune.store import ArtifactStore, dir_size

RUNS_FILE = "runs.jsonl"


def record_run(state_dir: Path, profile: str, ok: bool, keys: dict[str, str]) -> None:
    """Append this run's node keys (what gc keeps for the last N runs)."""
    line = {"finished": round(time.time(), 3), "profile": profile, "ok": ok, "keys": keys}
    with open(Path(state_dir) / RUNS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def recent_run_keys(state_dir: Path, last: int) -> set[tuple[str, str]]:
    path = Path(state_dir) / RUNS_FILE
    if not path.is_file() or last <= 0:
        return set()
    runs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a run killed mid-line
            continue
        if isinstance(rec, dict) and isinstance(rec.get("keys"), dict):
            runs.append(rec["keys"])
    return {(n, k) for keys in runs[-last:] for n, k in keys.items() if isinstance(k, str)}


def registered_keys(cfg: Any) -> set[tuple[str, str]]:
    """(node, key) of every artifact a registered version references. Raises when the registry
    cannot be read (RegistryUnavailable): gc then deletes nothing."""
    from dagtune.registry import registry as reg
    from dagtune.registry.node import tracker_for

    tracker = tracker_for(cfg)
    out = set()
    for rm in cfg.register.models.values():
        for v in reg.list_versions(tracker, rm.name):
            parts = json.loads((v.tags or {}).get(reg.TAG_ARTIFACTS) or "{}")
            out |= {(p["node"], p["key"]) for p in parts.values() if isinstance(p, dict) and "key" in p}
    return out


def collect(cfg: Any, keep_runs: int, dry_run: bool = False) -> dict[str, Any]:
    """Delete what is not kept; returns what was (or, dry_run, would be) deleted."""
    from filelock import FileLock, Timeout

    from dagtune.pipeline import NODE_ORDER, RETIRED_NODES, plan

    store = ArtifactStore(cfg.artifact_root)
    keep = recent_run_keys(cfg.state_dir, keep_runs) | registered_keys(cfg)
    keep |= {(n, p["key"]) for n, p in plan(cfg).items()}
    deleted, skipped, freed = [], [], 0
    for node in (*NODE_ORDER, *RETIRED_NODES):
        d = store.root / node
        for key_dir in sorted(d.iterdir()) if d.is_dir() else []:
            if (node, key_dir.name) in keep:
                continue
            size = dir_size(key_dir)
            if dry_run:
                deleted.append(f"{node}/{key_dir.name}")
                freed += size
                continue
            try:
                with FileLock(str(store.lock_path(node, key_dir.name)), timeout=0):
                    _remove_key(store, cfg.state_dir, node, key_dir.name)
            except Timeout:
                skipped.append(f"{node}/{key_dir.name}")
                continue
            store.lock_path(node, key_dir.name).unlink(missing_ok=True)
            deleted.append(f"{node}/{key_dir.name}")
            freed += size
    tmp = [] if dry_run else store.clean_tmp()
    return {"deleted": deleted, "skipped_busy": skipped, "bytes_freed": freed, "tmp_removed": tmp}


def _remove_key(store: ArtifactStore, state_dir: Path, node: str, key: str) -> None:
    # Renamed out of the store first: the key stops being "built" at once, whatever rmtree meets.
    trash = store.root / ".tmp" / f"gc-{node}-{key}-{uuid.uuid4().hex[:8]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    store.path(node, key).rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(store.root / ".scratch" / f"{node}-{key}", ignore_errors=True)
    shutil.rmtree(Path(state_dir) / "prefect-results" / node / key, ignore_errors=True)
