"""`dagtune models`: what the registry holds, read generically from MLflow (versions, aliases, the
dagtune.* tags of each version, and any JSON history kept as a registered-model tag), so it keeps working
when the gate's own tags change."""

from __future__ import annotations

import json
from typing import Any


def _json_or_text(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v


def _version_row(v: Any, aliases: dict[str, list[str]]) -> dict[str, Any]:
    tags = {k: _json_or_text(t) for k, t in (v.tags or {}).items() if k.startswith("dagtune.")}
    return {
        "version": str(v.version),
        "aliases": aliases.get(str(v.version), []),
        "created": v.creation_timestamp,
        "run_id": v.run_id,
        "tags": tags,
    }


def model_summary(tracker: Any, name: str) -> dict[str, Any]:
    """One registered model: its versions with aliases and dagtune tags, and its history tags."""
    c = tracker.client
    found = tracker.call(f"search versions of {name!r}", c.search_model_versions, f"name = '{name}'")
    if not found:
        return {"name": name, "versions": [], "history": {}}
    rm = tracker.call(f"get registered model {name!r}", c.get_registered_model, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    history = {k: _json_or_text(t) for k, t in (rm.tags or {}).items() if isinstance(_json_or_text(t), list)}
    versions = sorted((_version_row(v, aliases) for v in found), key=lambda r: int(r["version"]))
    return {"name": name, "versions": versions, "history": history}


def format_summary(models: list[dict[str, Any]]) -> str:
    lines = []
    for m in models:
        lines.append(f"{m['name']}: {len(m['versions'])} version(s)")
        for v in m["versions"]:
            gate = v["tags"].get("dagtune.gate_passed", "-")
            alias = ",".join(v["aliases"]) or "-"
            lines.append(f"  v{v['version']:<4} aliases={alias:<22} gate_passed={gate}")
        for tag, events in m["history"].items():
            lines.append(f"  {tag}: {len(events)} event(s)")
            for e in events[-5:]:
                lines.append(f"    {json.dumps(e, default=str)}")
    return "\n".join(lines)
