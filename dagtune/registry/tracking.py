"""MLflow tracking: connection with retries, one parent run per pipeline run, one child run per node.

Everything goes through :class:`Tracker`, which owns an explicit ``MlflowClient`` and retries every
call that fails because the server is unreachable (exponential backoff, configurable count), then
raises :class:`RegistryUnavailable` naming the URI. MLflow's own HTTP retry loop is turned down to
zero retries (unless the environment sets it) so our count is the one that applies: MLflow's default
(7 retries, factor 2) would otherwise spend minutes inside each of our attempts.

Nothing here deletes anything in MLflow, and nothing here touches the artifact store: a failed
registration leaves the pipeline's artifacts cached, so a rerun only re-registers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dagtune.redact import redact, redact_uri, split_credentials

log = logging.getLogger("dagtune.registry")
T = TypeVar("T")

# Run tags. mlflow.source.git.commit is MLflow's own key: the UI shows it on the run page.
TAG_FLOW_RUN_ID = "prefect.flow_run_id"
TAG_FLOW_RUN_URL = "prefect.flow_run_url"
TAG_CONFIG_HASH = "dagtune.config_hash"
TAG_PROFILE = "dagtune.profile"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "dagtune.git_dirty"
TAG_NODE = "dagtune.node"
TAG_ARTIFACT_KEY = "dagtune.artifact_key"
TAG_PARENT = "mlflow.parentRunId"  # how MLflow nests runs in the UI
TAG_RUN_KIND = "dagtune.run_kind"  # "pipeline" | "node"

# Files of a node artifact worth showing in the run: reports, plots, stats. Model weights are not
# logged as run artifacts (they go in as logged models, see models.py).
REPORT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".csv", ".png", ".svg", ".html", ".yaml", ".yml")
MAX_REPORT_BYTES = 5 * 1024 * 1024
MODEL_DIR_MARKERS = ("config.json", "adapter_config.json", "tokenizer_config.json")
MODEL_FILES = frozenset(
    {
        "config.json",
        "adapter_config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
    }
)
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = 1000  # MLflow's limit on metrics per log_batch call


class RegistryUnavailable(RuntimeError):
    """The tracking server could not be reached after the configured retries."""

    def __init__(self, uri: str, what: str, attempts: int, cause: BaseException):
        self.uri, self.what, self.attempts, self.cause = uri, what, attempts, cause
        super().__init__(
            f"MLflow tracking server {redact_uri(uri)} unreachable: {what} failed after {attempts} "
            f"attempt(s): {type(cause).__name__}: {str(cause)[:300]}. Pipeline artifacts are cached; "
            f"rerun once the server is back (set MLFLOW_TRACKING_URI to change it)."
        )


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 4  # attempts after the first
    backoff_s: float = 1.0  # first wait; doubles each retry
    max_backoff_s: float = 30.0

    def delays(self) -> list[float]:
        return [min(self.backoff_s * 2**i, self.max_backoff_s) for i in range(self.retries)]


# Substrings of errors that mean "could not talk to the backend" rather than "the request was wrong".
_TRANSIENT_MARKERS = (
    "failed with exception",  # rest_utils wraps requests' ConnectionError this way
    "failed with timeout",
    "max retries exceeded",
    "connection refused",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "temporarily unavailable",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
    "database is locked",  # SQLite under concurrent writers
)
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "SERVICE_UNDER_MAINTENANCE", "REQUEST_LIMIT_EXCEEDED"}


def is_unavailable(exc: BaseException) -> bool:
    """True for connection/timeout/5xx failures (worth a retry), False for real errors (bad name,
    missing version, validation) which must surface at once."""
    import requests

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if getattr(e, "error_code", None) in _TRANSIENT_CODES:
            return True
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int) and status >= 500:
            return True
        msg = str(e).lower()
        if any(m in msg for m in _TRANSIENT_MARKERS):
            return True
        e = e.__cause__ or e.__context__
    return False


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    uri: str,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; on an unreachable backend wait and retry per ``policy``, then raise
    RegistryUnavailable. Other errors propagate unchanged on the first attempt."""
    delays = policy.delays()
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except Exception as e:
            if not is_unavailable(e):
                raise
            if attempt == len(delays):
                raise RegistryUnavailable(uri, what, attempt + 1, e) from e
            log.warning(
                "MLflow %s: %s failed (%s); retry %d/%d in %.1fs",
                redact_uri(uri),
                what,
                type(e).__name__,
                attempt + 1,
                len(delays),
                delays[attempt],
            )
            sleep(delays[attempt])
    raise AssertionError("unreachable")  # pragma: no cover


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def local_artifact_root(uri: str, state_dir: Path | None) -> str | None:
    """Artifact location for new experiments on an embedded (SQLite/file) store.

    Without it MLflow puts artifacts under ``./mlruns`` of whatever directory the process runs in.
    A server picks its own (``--artifacts-destination``): None."""
    if not is_local_store(uri):
        return None
    if state_dir is not None:
        root = Path(state_dir) / "mlartifacts"
    elif uri.startswith("sqlite:///"):
        root = Path(uri[len("sqlite:///") :]).parent / "mlartifacts"
    else:
        return None
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve().as_uri()


@dataclass
class Tracker:
    """An MLflow client bound to one URI, with the retry policy applied to every call."""

    uri: str
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    artifact_location: str | None = None  # for experiments created on an embedded store
    client: Any = None  # mlflow.MlflowClient; Any so importing this module stays cheap

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return with_retries(lambda: fn(*args, **kwargs), what=what, uri=self.uri, policy=self.policy)

    def experiment_id(self, name: str) -> str:
        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            return self.client.create_experiment(name, artifact_location=self.artifact_location)

        return self.call(f"get or create experiment {name!r}", get_or_create)


def _credentials_to_env(uri: str) -> str:
    """Move ``user:password@`` out of the URI into MLflow's basic-auth variables: MLflow prints and
    stores its tracking URI ("View run ... at:" lines, run metadata), so that URI must be clean."""
    clean, user, password = split_credentials(uri)
    if user is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:  # nothing later (children included) sees the secret
        os.environ["MLFLOW_TRACKING_URI"] = clean
    return clean


# What MLflow's migrations report on a schema that a killed first initialisation left half-built.
_HALF_BUILT = (
    "duplicate column",
    "already exists",
    "no such table",
    "no such column",
    "alembic",
    "interrupted",
)


def _init_sqlite(path: Path) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)


def ensure_sqlite_store(path: Path) -> None:
    """Create an MLflow SQLite store so that a kill can never leave it half-built: the schema is built
    in a temp file (about 2 s of migrations) which is renamed into place only when complete. A store
    left half-built by an older version is detected; without any run in it, it is moved aside and
    rebuilt, otherwise the error says what to do."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".init.lock"):
        if path.exists():
            _check_schema(path)
            return
        _init_sqlite_atomically(path)


def _check_schema(path: Path) -> None:
    try:
        stray = _stray_migration_tables(path)  # read-only: a broken store is not migrated further
        if stray:
            raise RuntimeError(f"interrupted migration left table(s) {stray}")
        _init_sqlite(path)
    except Exception as e:
        if not any(m in str(e).lower() for m in _HALF_BUILT):
            raise
        if _holds_runs(path):
            raise RuntimeError(
                f"MLflow store {path} has a broken schema ({str(e).splitlines()[0][:200]}) and holds runs: "
                "not touched. "
                f"Back it up and repair it with `mlflow db upgrade sqlite:///{path}`, or move it away."
            ) from None
        aside = path.with_name(f"{path.name}.half-built-{int(time.time())}")
        os.replace(path, aside)
        _forget_engine(f"sqlite:///{path}")
        why = str(e).splitlines()[0][:200]
        log.warning("MLflow store %s was half-built (%s); moved to %s and rebuilt", path, why, aside)
        _init_sqlite_atomically(path)


def _forget_engine(uri: str) -> None:
    """MLflow caches one SQLAlchemy engine per URI; its pooled connections would keep reading the
    moved-aside file."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for store in (SqlAlchemyStore, RegistryStore):
        engine = getattr(store, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()


def _init_sqlite_atomically(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.init-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    _init_sqlite(tmp)
    os.replace(tmp, path)


def _stray_migration_tables(path: Path) -> list[str]:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            q = "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '\\_alembic\\_tmp\\_%' ESCAPE '\\'"
            return [r[0] for r in db.execute(q)]
    except sqlite3.Error:
        return []


def _holds_runs(path: Path) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    except sqlite3.Error:  # no runs table: nothing was ever recorded
        return False


def connect(
    uri: str,
    policy: RetryPolicy | None = None,
    state_dir: Path | None = None,
) -> Tracker:
    """Point MLflow (client and fluent API, which ``log_model`` needs) at ``uri`` and check that it
    answers, retrying with backoff. Raises RegistryUnavailable when it never does."""
    import mlflow
    from mlflow import MlflowClient

    policy = policy or RetryPolicy()
    uri = _credentials_to_env(uri)
    if uri.startswith("sqlite:///"):
        ensure_sqlite_store(Path(uri[len("sqlite:///") :]))
    if not is_local_store(uri):
        # Our loop does the retrying; see the module docstring.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    tracker = Tracker(
        uri=uri,
        policy=policy,
        artifact_location=local_artifact_root(uri, state_dir),
        client=MlflowClient(tracking_uri=uri, registry_uri=uri),
    )
    tracker.call("connect", tracker.client.search_experiments, max_results=1)
    return tracker


# ----------------------------------------------------------------------------------------------
# flattening: config sections -> params, metrics.json -> metrics
# ----------------------------------------------------------------------------------------------
_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")


def safe_key(key: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / : space`` in param/metric/tag keys."""
    return _BAD_KEY_CHARS.sub("_", key)[:250]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj} if prefix else {}


def to_params(section: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in flatten(section).items():
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
        out[safe_key(k)] = redact(text)[:MAX_PARAM_CHARS]
    return out


def numeric_leaves(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers only: None rates, strings and lists (confusion matrices) are not metrics."""
    out = {}
    for k, v in flatten(metrics).items():
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, int | float) and math.isfinite(v):
            out[safe_key(k)] = float(v)
    return out


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------
def git_commit(cwd: Path | None = None) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty) of the repo at ``cwd``, or (None, None) outside git / without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return head or None, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def pipeline_tags(
    *,
    flow_run_id: str | None,
    flow_run_url: str | None,
    config_hash: str,
    profile: str,
    repo_dir: Path | None = None,
) -> dict[str, str]:
    commit, dirty = git_commit(repo_dir)
    tags = {
        TAG_RUN_KIND: "pipeline",
        TAG_CONFIG_HASH: config_hash,
        TAG_PROFILE: profile or "<base>",
    }
    if flow_run_id:
        tags[TAG_FLOW_RUN_ID] = flow_run_id
    if flow_run_url:
        tags[TAG_FLOW_RUN_URL] = flow_run_url
    if commit:
        tags[TAG_GIT_COMMIT] = commit
        tags[TAG_GIT_DIRTY] = str(dirty).lower()
    return tags


@contextmanager
def parent_run(
    tracker: Tracker,
    experiment: str,
    *,
    run_name: str,
    tags: Mapping[str, str],
) -> Iterator[str]:
    """One MLflow run per pipeline run; yields its id and ends it FINISHED, or FAILED on an error
    (best effort: when the server is gone the run simply stays RUNNING)."""
    exp_id = tracker.experiment_id(experiment)
    if tags.get(TAG_CONFIG_HASH):
        tracker.call("fail stale runs", fail_stale_runs, tracker, exp_id, tags[TAG_CONFIG_HASH])
    run = tracker.call(
        "create parent run", tracker.client.create_run, exp_id, run_name=run_name, tags=dict(tags)
    )
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException:
        _end(tracker, run_id, "FAILED")
        try:  # and the node runs still open under it (models never logged): no RUNNING run remains
            for child in tracker.client.search_runs(
                [exp_id], f"tags.`{TAG_PARENT}` = '{run_id}' AND attributes.status = 'RUNNING'"
            ):
                tracker.client.set_terminated(child.info.run_id, "FAILED")
        except Exception as e:  # the server is gone: the next registration of this config does it
            log.warning("could not mark the node runs of %s FAILED: %s", run_id, e)
        raise
    tracker.call("finish parent run", tracker.client.set_terminated, run_id, "FINISHED")


def fail_stale_runs(tracker: Tracker, experiment_id: str, config_hash: str, keep: str = "") -> int:
    """Mark FAILED the RUNNING pipeline runs of this config (and their RUNNING children) left by a
    registration killed or cut off from the server. Safe: the register node holds its key's lock, so
    no other live registration of the same config exists."""
    flt = f"tags.`{TAG_CONFIG_HASH}` = '{config_hash}' AND attributes.status = 'RUNNING'"
    stale = [r.info.run_id for r in tracker.client.search_runs([experiment_id], flt) if r.info.run_id != keep]
    for run_id in list(stale):
        children = tracker.client.search_runs(
            [experiment_id], f"tags.`{TAG_PARENT}` = '{run_id}' AND attributes.status = 'RUNNING'"
        )
        stale += [c.info.run_id for c in children]
    for run_id in stale:
        tracker.client.set_terminated(run_id, "FAILED")
    if stale:
        log.warning("MLflow: %d run(s) left RUNNING by an interrupted registration marked FAILED", len(stale))
    return len(stale)


def log_model_retrying(
    tracker: Tracker, what: str, experiment_id: str, run_id: str, fn: Callable[[], T]
) -> T:
    """``fn()`` logs models into ``run_id``; retried like every call on transient failures. Before a
    retry, the models the failed attempt created under the run are deleted, so no orphan survives
    (the run is fresh: everything logged into it comes from an attempt of this call)."""
    attempts = 0

    def attempt() -> T:
        nonlocal attempts
        if attempts:
            _delete_run_models(tracker, experiment_id, run_id)
        attempts += 1
        return fn()

    return tracker.call(what, attempt)


def _delete_run_models(tracker: Tracker, experiment_id: str, run_id: str) -> None:
    found = tracker.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    for m in found:
        tracker.client.delete_logged_model(m.model_id)
        log.info("MLflow: deleted model %s of a failed attempt", m.model_id)


def _end(tracker: Tracker, run_id: str, status: str) -> None:
    try:
        tracker.client.set_terminated(run_id, status)
    except Exception as e:  # already failing: do not hide the original error
        log.warning("could not mark run %s %s: %s", run_id, status, e)


def _is_model_dir(d: Path) -> bool:
    return any((d / m).is_file() for m in MODEL_DIR_MARKERS) or any(d.glob("*.safetensors"))


def report_files(artifact_dir: Path, max_bytes: int = MAX_REPORT_BYTES) -> list[Path]:
    """Small human-readable files of an artifact dir (reports, plots, stats, the manifest), without
    model directories (adapter/, merged/: they are logged models) or tokenizer/model config files."""
    from dagtune.store import MANIFEST, read_manifest

    # Only the regular files the manifest lists (and the manifest): nothing else that sits in the dir,
    # and never a link's target, goes to MLflow.
    manifest = read_manifest(artifact_dir)
    listed = {f.get("path") for f in manifest["files"] if isinstance(f, dict)} if manifest else set()
    listed.add(MANIFEST)
    out = []
    skip: dict[Path, bool] = {}
    for p in sorted(artifact_dir.rglob("*")):
        if p.relative_to(artifact_dir).as_posix() not in listed or p.is_symlink() or not p.is_file():
            continue
        if p.suffix.lower() not in REPORT_SUFFIXES or p.stat().st_size > max_bytes:
            continue
        if p.name in MODEL_FILES:
            continue
        parents = p.relative_to(artifact_dir).parents  # innermost first, ends with "."
        if any(skip.setdefault(d, _is_model_dir(artifact_dir / d)) for d in parents if d != Path(".")):
            continue
        out.append(p)
    return out


def _step_metric_batches(records: Iterable[Mapping[str, Any]]) -> Iterator[list[Any]]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch: list[Any] = []
    for i, rec in enumerate(records):
        step = int(rec.get("step", i))
        for k, v in numeric_leaves({k: v for k, v in rec.items() if k != "step"}).items():
            batch.append(Metric(k, v, now, step))
            if len(batch) == BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def child_run(
    tracker: Tracker,
    parent_run_id: str,
    node: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    artifacts_dir: Path | None = None,
    step_metrics: Iterable[Mapping[str, Any]] | None = None,
    tags: Mapping[str, str] | None = None,
    finish: bool = True,
) -> str:
    """A run nested under the pipeline run for one node: its config section as params, its numeric
    metrics, its report files as artifacts and its training curve (records with ``step``) as step
    metrics. ``finish=False`` leaves it RUNNING so models can be logged into it (see models.py)."""
    from mlflow.entities import Metric, Param

    parent = tracker.call("get parent run", tracker.client.get_run, parent_run_id)
    run_tags = {TAG_PARENT: parent_run_id, TAG_NODE: node, TAG_RUN_KIND: "node", **(tags or {})}
    run = tracker.call(
        f"create run for {node}",
        tracker.client.create_run,
        parent.info.experiment_id,
        run_name=node,
        tags=run_tags,
    )
    run_id = run.info.run_id
    c = tracker.client
    now = int(time.time() * 1000)
    plist = [Param(k, v) for k, v in to_params(params or {}).items()]
    for i in range(0, len(plist), 100):  # MLflow's limit on params per batch
        tracker.call(f"log params of {node}", c.log_batch, run_id, params=plist[i : i + 100])
    mlist = [Metric(k, v, now, 0) for k, v in numeric_leaves(metrics or {}).items()]
    for i in range(0, len(mlist), BATCH):
        tracker.call(f"log metrics of {node}", c.log_batch, run_id, metrics=mlist[i : i + BATCH])
    for batch in _step_metric_batches(step_metrics or []):
        tracker.call(f"log step metrics of {node}", c.log_batch, run_id, metrics=batch)
    if artifacts_dir is not None:
        for p in report_files(Path(artifacts_dir)):
            rel = p.parent.relative_to(artifacts_dir).as_posix()
            tracker.call(
                f"log artifact {p.name} of {node}",
                c.log_artifact,
                run_id,
                str(p),
                None if rel == "." else rel,
            )
    if finish:
        tracker.call(f"finish run of {node}", c.set_terminated, run_id, "FINISHED")
    return run_id


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Training logs (one JSON object per line); unreadable lines are skipped, not fatal."""
    from dagtune.jsonl import read_records

    return read_records(path)
