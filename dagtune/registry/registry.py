"""Model registry: idempotent versions, challenger/champion aliases, the promotion gate, rollback.

* A version is keyed by a digest of what it contains (sha256 over the registered artifacts' file
  hashes), stored as the version tag ``dagtune.digest``. ``register_version`` looks it up first
  (``search_model_versions`` with a tag filter) and returns the existing version instead of adding
  one, so rerunning the pipeline never duplicates a version.
* A new version gets the ``challenger`` alias; the gate (config ``register.models.<m>.gate``,
  statistics in ``dagtune.registry.gate``) decides whether ``champion`` moves to it when automatic
  promotion is on. The gate's outcome is
  written to the version last (``dagtune.gate_passed``): a run interrupted before that point re-gates
  on the rerun instead of leaving a version half-handled.
* ``promote`` / ``rollback`` move ``champion`` and record who, why and when on the version and in
  the registered model's ``dagtune.champion_history`` tag (a stack: rollback pops it).
* Versions are never deleted: nothing in this package calls a delete on a model version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dagtune.registry.gate import GateResult
from dagtune.registry.tracking import Tracker, numeric_leaves, safe_key

log = logging.getLogger("dagtune.registry")

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_DIGEST = "dagtune.digest"
TAG_ARTIFACTS = "dagtune.artifacts"  # JSON {role: {node, key, sha256}}
TAG_DATASET_DIGEST = "dagtune.dataset_digest"
EVAL_ARTIFACT = "eval_metrics/{model}.json"  # the full metrics.json block, in the version's run
TAG_TRAIN_SECONDS = "dagtune.train_seconds"
TAG_GATE_PASSED = "dagtune.gate_passed"
TAG_GATE_REASONS = "dagtune.gate_reasons"
TAG_GATE = "dagtune.gate"  # JSON: metric, bootstrap comparisons with base and champion, champion source
TAG_HISTORY = "dagtune.champion_history"  # registered-model tag: JSON list of events (a stack)
HISTORY_LIMIT = 200
REASON_CHARS = 500


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (unknown version, nothing to roll back to)."""


# ----------------------------------------------------------------------------------------------
# digests and tags
# ----------------------------------------------------------------------------------------------
def manifest_digest(manifest: Mapping[str, Any], prefix: str = "") -> str:
    """sha256 over (path, sha256) of a manifest's files, optionally only those under ``prefix``:
    identical bytes give the same digest whatever key or run produced them."""
    files = sorted(
        (f["path"], f["sha256"]) for f in manifest.get("files", []) if f["path"].startswith(prefix)
    )
    return hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()


def combined_digest(parts: Mapping[str, str]) -> str:
    """One digest for a version made of several artifacts: {role: digest} -> sha256."""
    return hashlib.sha256(json.dumps(dict(sorted(parts.items())), separators=(",", ":")).encode()).hexdigest()


def headline_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers at the top of a model's metrics block or of its ``overall`` block (no per-group,
    per-class or validation detail): what a version's tags show."""
    top = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    overall = metrics.get("overall") if isinstance(metrics.get("overall"), Mapping) else {}
    return {k: float(v) for k, v in numeric_leaves({**top, **overall}).items() if "." not in k}


def version_tags(
    *,
    artifacts: Mapping[str, Mapping[str, Any]],
    dataset_digest: str | None = None,
    eval_metrics: Mapping[str, Any] | None = None,
    train_seconds: float | None = None,
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The tags every version carries (lineage and headline numbers): artifact keys and sha256 (per
    role and as JSON), dataset digest, headline evaluation metrics, training time and the Prefect run
    that registered it. The full evaluation block is logged as an artifact (``log_eval_metrics``)."""
    from dagtune.registry.tracking import TAG_FLOW_RUN_ID, TAG_FLOW_RUN_URL

    tags: dict[str, str] = {TAG_ARTIFACTS: json.dumps(artifacts, sort_keys=True, default=str)}
    for role, info in artifacts.items():
        for field in ("key", "sha256"):
            if info.get(field):
                tags[safe_key(f"dagtune.artifact.{role}.{field}")] = str(info[field])
    if dataset_digest:
        tags[TAG_DATASET_DIGEST] = dataset_digest
    if eval_metrics is not None:  # headline numbers only; the full block is an artifact (EVAL_ARTIFACT)
        for k, v in headline_metrics(eval_metrics).items():
            tags[safe_key(f"eval.{k}")] = f"{v:.6g}"
    if train_seconds is not None:
        tags[TAG_TRAIN_SECONDS] = f"{float(train_seconds):.1f}"
    if flow_run_id:
        tags[TAG_FLOW_RUN_ID] = flow_run_id
    if flow_run_url:
        tags[TAG_FLOW_RUN_URL] = flow_run_url
    for k, v in (extra or {}).items():
        tags[safe_key(k)] = v if isinstance(v, str) else json.dumps(v, default=str)
    return tags


def log_eval_metrics(tracker: Tracker, run_id: str, model: str, metrics: Mapping[str, Any]) -> None:
    """The model's full evaluation block as a JSON artifact of the run its version comes from."""
    tracker.call(
        f"log {model} evaluation metrics",
        tracker.client.log_text,
        run_id,
        json.dumps(metrics, indent=2, sort_keys=True, default=str, ensure_ascii=False),
        EVAL_ARTIFACT.format(model=model),
    )


# ----------------------------------------------------------------------------------------------
# versions
# ----------------------------------------------------------------------------------------------
def _already_exists(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def ensure_registered_model(tracker: Tracker, name: str, description: str | None = None) -> None:
    def create() -> None:
        try:
            tracker.client.create_registered_model(name, description=description)
        except Exception as e:
            if not _already_exists(e):
                raise

    tracker.call(f"create registered model {name!r}", create)


def find_version_by_digest(tracker: Tracker, name: str, digest: str) -> Any | None:
    """The (oldest) version of ``name`` whose digest tag equals ``digest``, or None."""
    return tracker.call(f"search versions of {name!r}", _version_with_digest, tracker, name, digest)


def _version_with_digest(tracker: Tracker, name: str, digest: str) -> Any | None:
    """One search, no retries (for use inside a retried call)."""
    flt = f"name = '{_quote(name)}' AND tag.`{TAG_DIGEST}` = '{_quote(digest)}'"
    found = tracker.client.search_model_versions(flt)
    return min(found, key=lambda v: int(v.version)) if found else None


def _quote(s: str) -> str:
    return s.replace("'", "\\'")


def register_version(
    tracker: Tracker,
    name: str,
    model_uri: str,
    digest: str,
    tags: Mapping[str, str],
    *,
    run_id: str | None = None,
    model_id: str | None = None,
    description: str | None = None,
) -> tuple[Any, bool]:
    """Create a version of ``name`` for ``model_uri`` unless one with ``digest`` exists already:
    returns (ModelVersion, created). The digest and all tags are set in the creating call itself,
    so a version never exists without its digest."""
    ensure_registered_model(tracker, name)
    existing = find_version_by_digest(tracker, name, digest)
    if existing is not None:
        log.info("registry: %s already has version %s for digest %s", name, existing.version, digest[:12])
        return existing, False
    attempted = False

    def create_once() -> Any:
        # After a failed attempt the server may have created the version and only the reply was lost:
        # look the digest up before creating again, or the retry makes a duplicate (v1, v2, one digest).
        nonlocal attempted
        if attempted:
            found = _version_with_digest(tracker, name, digest)
            if found is not None:
                return found
        attempted = True
        return tracker.client.create_model_version(
            name=name,
            source=model_uri,
            run_id=run_id,
            tags={**tags, TAG_DIGEST: digest},
            description=description,
            model_id=model_id,
        )

    mv = tracker.call(f"create version of {name!r}", create_once)
    log.info("registry: %s version %s created (digest %s)", name, mv.version, digest[:12])
    return mv, True


def alias_version(tracker: Tracker, name: str, alias: str) -> Any | None:
    """The version an alias points at, or None. (Its ``.version`` is an int here but a str from
    other calls in MLflow 3: compare with str().)"""

    def get() -> Any | None:
        try:
            return tracker.client.get_model_version_by_alias(name, alias)
        except Exception as e:
            if _not_found(e):
                return None
            raise

    return tracker.call(f"get {name}@{alias}", get)


def set_challenger(tracker: Tracker, name: str, version: str | int) -> None:
    tracker.call(
        f"set {name}@{CHALLENGER}",
        tracker.client.set_registered_model_alias,
        name,
        CHALLENGER,
        str(version),
    )


# ----------------------------------------------------------------------------------------------
# the gate
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gate:
    """Mirror of config.PromotionGate, so this module can be used without the pipeline config."""

    metric: str = "exact_match"
    min_delta: float = 0.0
    max_group_drop: float = 0.05
    group_keys: tuple[str, ...] | None = None
    min_group_size: int = 0

    @classmethod
    def of(cls, gate: Any) -> Gate:
        if isinstance(gate, Gate):
            return gate
        keys = getattr(gate, "group_keys", None)
        return cls(
            metric=gate.metric,
            min_delta=float(gate.min_delta),
            max_group_drop=float(gate.max_group_drop),
            group_keys=tuple(keys) if keys is not None else None,
            min_group_size=int(getattr(gate, "min_group_size", 0) or 0),
        )


# ----------------------------------------------------------------------------------------------
# champion moves: promote, rollback, history
# ----------------------------------------------------------------------------------------------
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def champion_history(tracker: Tracker, name: str) -> list[dict[str, Any]]:
    rm = tracker.call(f"get registered model {name!r}", tracker.client.get_registered_model, name)
    raw = (rm.tags or {}).get(TAG_HISTORY)
    return json.loads(raw) if raw else []


def _champion_stack(history: list[dict[str, Any]]) -> list[str]:
    """Replay the events: promote pushes, rollback pops; the top is the champion."""
    stack: list[str] = []
    for ev in history:
        if ev["action"] == "promote":
            if not stack or stack[-1] != ev["version"]:
                stack.append(ev["version"])
        elif ev["action"] == "rollback" and stack:
            stack.pop()
    return stack


def _save_history(tracker: Tracker, name: str, history: list[dict[str, Any]]) -> None:
    # Keep the newest events; a trimmed history still replays to the same top of stack as long as
    # fewer than HISTORY_LIMIT rollbacks in a row are asked for.
    tracker.call(
        f"record champion history of {name!r}",
        tracker.client.set_registered_model_tag,
        name,
        TAG_HISTORY,
        json.dumps(history[-HISTORY_LIMIT:], ensure_ascii=False),
    )


def _get_version(tracker: Tracker, name: str, version: str | int) -> Any:
    def get() -> Any:
        try:
            return tracker.client.get_model_version(name, str(version))
        except Exception as e:
            if _not_found(e):
                raise RegistryError(f"{name} has no version {version}") from e
            raise

    return tracker.call(f"get {name} v{version}", get)


def promote(tracker: Tracker, name: str, version: str | int, who: str, why: str) -> dict[str, Any]:
    """Point ``champion`` at ``version`` (no gate: this is the human override), record the event."""
    version = str(_get_version(tracker, name, version).version)
    current = alias_version(tracker, name, CHAMPION)
    event = {
        "action": "promote",
        "version": version,
        "previous": str(current.version) if current is not None else None,
        "who": who,
        "why": why[:REASON_CHARS],
        "at": _now(),
    }
    c = tracker.client
    tracker.call(f"set {name}@{CHAMPION}", c.set_registered_model_alias, name, CHAMPION, version)
    challenger = alias_version(tracker, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        # a challenger that won is no longer a challenger
        tracker.call(f"clear {name}@{CHALLENGER}", c.delete_registered_model_alias, name, CHALLENGER)
    for k, v in (("promoted_by", who), ("promoted_reason", event["why"]), ("promoted_at", event["at"])):
        tracker.call(f"tag {name} v{version}", c.set_model_version_tag, name, version, f"dagtune.{k}", v)
    _save_history(tracker, name, champion_history(tracker, name) + [event])
    log.info("registry: %s@champion -> v%s (was %s) by %s: %s", name, version, event["previous"], who, why)
    return event


def rollback(tracker: Tracker, name: str, who: str, why: str) -> dict[str, Any]:
    """Move ``champion`` back to the champion before the current one; the current version stays
    registered (tagged as rolled back)."""
    current = alias_version(tracker, name, CHAMPION)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    history = champion_history(tracker, name)
    stack = _champion_stack(history)
    if stack and stack[-1] == str(current.version):
        stack.pop()
    if not stack:
        raise RegistryError(f"{name}: v{current.version} is the first champion; nothing to roll back to")
    target = stack[-1]
    event = {
        "action": "rollback",
        "version": target,
        "previous": str(current.version),
        "who": who,
        "why": why[:REASON_CHARS],
        "at": _now(),
    }
    c = tracker.client
    tracker.call(f"set {name}@{CHAMPION}", c.set_registered_model_alias, name, CHAMPION, target)
    old = str(current.version)
    for k, v in (
        ("rolled_back_by", who),
        ("rolled_back_reason", event["why"]),
        ("rolled_back_at", event["at"]),
    ):
        tracker.call(f"tag {name} v{old}", c.set_model_version_tag, name, old, f"dagtune.{k}", v)
    _save_history(tracker, name, history + [event])
    log.info("registry: %s@champion rolled back v%s -> v%s by %s: %s", name, old, target, who, why)
    return event


def gate_and_alias(
    tracker: Tracker,
    name: str,
    version: Any,
    decide: Callable[[Any], GateResult],
    *,
    auto_promote: bool,
    who: str = "dagtune (auto)",
) -> GateResult:
    """After registration: challenger alias, ``decide(champion_version_or_None)`` (see
    dagtune.registry.gate), promote when it passes and auto promotion is on. Runs once per version:
    the outcome is written on the version (tags and description, ``dagtune.gate_passed`` last) and a
    rerun returns it unchanged."""
    tags = version.tags or {}
    if TAG_GATE_PASSED in tags:
        return GateResult(
            tags[TAG_GATE_PASSED] == "true",
            json.loads(tags.get(TAG_GATE_REASONS) or "[]"),
            json.loads(tags.get(TAG_GATE) or "{}"),
        )
    v = str(version.version)
    champion = alias_version(tracker, name, CHAMPION)
    if champion is not None and str(champion.version) == v:
        return GateResult(True, ["already champion"])
    set_challenger(tracker, name, v)
    result = decide(champion)
    if result.passed and auto_promote:
        promote(tracker, name, v, who, "gate passed: " + "; ".join(result.reasons))
    elif result.passed:
        result.reasons.append("auto_promote is off: champion not moved")
    _record_gate(tracker, name, v, result)
    return result


def _record_gate(tracker: Tracker, name: str, v: str, result: GateResult) -> None:
    c = tracker.client
    outcome = "passed" if result.passed else "failed"
    description = f"promotion gate {outcome}:\n" + "\n".join(f"- {r}" for r in result.reasons)
    tracker.call(f"describe {name} v{v}", c.update_model_version, name, v, description=description[:5000])
    for key, value in (
        (TAG_GATE, json.dumps(result.details, default=str)),
        (TAG_GATE_REASONS, json.dumps(result.reasons, ensure_ascii=False)),
        (TAG_GATE_PASSED, str(result.passed).lower()),  # last: its presence means "gated"
    ):
        tracker.call(f"tag {name} v{v}", c.set_model_version_tag, name, v, key, value)


def list_versions(tracker: Tracker, name: str) -> list[Any]:
    found = tracker.call(
        f"search versions of {name!r}", tracker.client.search_model_versions, f"name = '{_quote(name)}'"
    )
    return sorted(found, key=lambda v: int(v.version))
