"""Content-addressed artifact store.

Every node writes into ``<root>/<node>/<key>/``. The key is the sha256 of the canonical JSON of the
node's inputs (name, code version, its config section, upstream artifact keys). A directory counts as
present only when its ``manifest.json`` parses and every file it lists still matches: the manifest is
written last inside a temporary directory which is then fsynced and renamed into place, so a killed run
never leaves a half artifact that looks complete. On reuse every listed file is checked against the
manifest (size always; sha256 for small files, and for large ones whenever size or mtime moved), so a
corrupt or deleted file is never served: the artifact is moved aside with a logged reason and rebuilt.
A file lock per key (flock, seen by every host mounting the root) makes concurrent runs of the same
config compute each key once, on one machine or several.

The root is a mounted path (local disk or a shared filesystem that honours flock and rename across
hosts); docs/scaling.md lists which do, and what an object-store (fsspec URL) root would need.
Everything goes through ``ArtifactStore``, so such a backend would not touch the nodes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from dagtune.redact import redact

MANIFEST = "manifest.json"
# Files up to this size are re-hashed on every reuse; larger ones (merged weights, GGUF) only when their
# size or mtime differs from the manifest, which a copy without -p or any in-place write changes.
ALWAYS_HASH_BYTES = 32 << 20
# A node's metrics may carry this key: its value (a dict) becomes top-level manifest fields, recorded
# with the artifact but not part of its key (e.g. prepare_data's resolved source paths).
MANIFEST_FIELDS = "manifest_fields"
log = logging.getLogger("dagtune")
# Name of Prefect's task-cache record, kept under <state_dir>/prefect-results/<node>/<key>/ (outside
# the artifact root); the runner hands Prefect its key only while the artifact verifies.
PREFECT_RECORD = "prefect-result"
TRACKED_LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "unsloth",
    "bitsandbytes",
    "llama_cpp_python",
    "gguf",
    "mlflow",
    "prefect",
)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same inputs always give the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(inputs).encode("utf-8")).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


class ArtifactError(RuntimeError):
    """A build produced something an artifact may not hold."""


@dataclass(frozen=True)
class Artifact:
    """A reference to a finished artifact: what nodes pass to each other (never models in memory)."""

    node: str
    key: str
    path: str

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / MANIFEST).read_text())

    def files(self) -> list[str]:
        """The relative paths the manifest lists: the artifact's content (nothing else in the dir)."""
        return [f["path"] for f in self.manifest()["files"]]


def read_manifest(d: Path) -> dict[str, Any] | None:
    """The manifest of an artifact dir, or None when it is missing, empty, truncated or not a manifest
    (a run killed while writing it, a disk-full write): such a dir is "not built", never a crash."""
    try:
        m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("files"), list):
        return None
    return m


def _file_problem(d: Path, entry: dict[str, Any]) -> str | None:
    """Why one manifest entry does not match the file on disk, or None when it does."""
    rel = entry.get("path")
    if not isinstance(rel, str) or rel.startswith("/") or ".." in Path(rel).parts:
        return f"bad manifest entry {rel!r}"
    p = d / rel
    try:
        st = p.lstat()
    except OSError:
        return f"{rel}: missing"
    if not os.path.isfile(p) or p.is_symlink():
        return f"{rel}: not a regular file"
    if st.st_size != entry.get("size"):
        return f"{rel}: size {st.st_size} != manifest {entry.get('size')}"
    same_mtime = entry.get("mtime_ns") == st.st_mtime_ns
    if same_mtime and st.st_size > ALWAYS_HASH_BYTES:
        return None
    if sha256_file(p) != entry.get("sha256"):
        return f"{rel}: sha256 differs from the manifest"
    if not same_mtime and isinstance(entry.get("mtime_ns"), int):
        # Content verified (a copied store): restore the recorded mtime so the fast path holds again.
        with _ignore_oserror():
            os.utime(p, ns=(st.st_atime_ns, entry["mtime_ns"]))
    return None


@contextmanager
def _ignore_oserror() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


def artifact_problem(d: Path) -> str | None:
    """None when ``d`` is a complete, intact artifact; otherwise why it is not (for logs and status)."""
    m = read_manifest(d)
    if m is None:
        return "no readable manifest" if (d / MANIFEST).exists() else "not built"
    for entry in m["files"]:
        problem = _file_problem(d, entry) if isinstance(entry, dict) else "bad manifest entry"
        if problem:
            return problem
    return _symlink_inside(d)


def _symlink_inside(d: Path) -> str | None:
    """Artifacts hold no links (commit refuses them): one found later was planted."""
    for base, dirs, files in os.walk(d):
        for name in dirs + files:
            if os.path.islink(os.path.join(base, name)):
                return f"{Path(base, name).relative_to(d)}: symlink inside the artifact"
    return None


def fsync_tree(d: Path) -> None:
    """Flush every file and directory under ``d`` (and ``d``) to disk, so the rename that publishes it
    can never point at content still in the page cache after a power loss."""
    for p in sorted(d.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_file() and not p.is_symlink():
            _fsync_path(p, os.O_RDONLY)
        elif p.is_dir() and not p.is_symlink():
            _fsync_path(p, os.O_RDONLY | os.O_DIRECTORY)
    _fsync_path(d, os.O_RDONLY | os.O_DIRECTORY)


def _fsync_path(p: Path, flags: int) -> None:
    fd = os.open(p, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "key": self.key, "path": self.path}


class ArtifactStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    # -- layout -------------------------------------------------------------------------------
    def path(self, node: str, key: str) -> Path:
        return self.root / node / key

    def lock_path(self, node: str, key: str) -> Path:
        return self.root / ".locks" / f"{node}-{key}.lock"

    def get(self, node: str, key: str) -> Artifact | None:
        """The verified artifact, or None. A dir that fails verification is moved aside (into
        ``.tmp``, which also drops Prefect's cache record inside it) so the key is rebuilt."""
        d = self.path(node, key)
        if not d.exists():
            return None
        problem = artifact_problem(d)
        if problem is None:
            return Artifact(node, key, str(d))
        if problem != "not built":
            log.warning("artifact %s/%s is not reused (%s): it will be rebuilt", node, key[:12], problem)
            self.quarantine(node, key)
        return None

    def quarantine(self, node: str, key: str) -> None:
        trash = self.root / ".tmp" / f"corrupt-{node}-{key}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        with _ignore_oserror():  # another process may have moved or rebuilt it first
            os.replace(self.path(node, key), trash)

    def list_keys(self, node: str) -> list[str]:
        d = self.root / node
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if read_manifest(p) is not None)

    # -- writing ------------------------------------------------------------------------------
    @contextmanager
    def lock(self, node: str, key: str, timeout: float = -1) -> Iterator[None]:
        lock = self._acquire(self.lock_path(node, key), timeout)
        try:
            yield
        finally:
            lock.release()

    def _acquire(self, path: Path, timeout: float) -> FileLock:
        """Take the flock(2) lock on ``path``, which every host mounting the root sees (docs/scaling.md).
        No soft-lock fallback: its marker file would outlive a crashed holder and block the key."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=timeout, fallback_to_soft=False)
        try:
            lock.acquire()
        except OSError as e:  # filelock's Timeout is an OSError too, without an errno
            if e.errno == errno.ENOSYS:
                raise ArtifactError(
                    f"artifact root {self.root}: its filesystem has no flock(2) locks, which the store "
                    "needs so that runs sharing it compute each key once (docs/scaling.md)"
                ) from e
            raise
        return lock

    def _key_unlocked(self, node_key: str) -> bool:
        """Nobody, on any host sharing the root, holds the lock of ``<node>-<key>`` right now."""
        try:
            lock = self._acquire(self.root / ".locks" / f"{node_key}.lock", timeout=0)
        except Timeout:
            return False
        lock.release()
        return True

    def tmp_dir(self, node: str, key: str) -> Path:
        # The owner's pid in the name lets clean_tmp remove what a killed run left, and only that.
        d = self.root / ".tmp" / f"{node}-{key}-p{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def commit(
        self,
        node: str,
        key: str,
        tmp: Path,
        inputs: dict[str, Any],
        metrics: dict[str, Any],
        started: float,
        extra: dict[str, Any] | None = None,
    ) -> Artifact:
        """Hash the files, write the manifest last, then rename the temp dir into place. ``extra``: the
        node's own top-level manifest fields (``MANIFEST_FIELDS``), not part of the key."""
        files = []
        for p in sorted(tmp.rglob("*")):
            if p.is_symlink():
                # An artifact holds its own bytes: a link would let a reuse or an upload read (and a
                # manifest vouch for) whatever the link points at later.
                raise ArtifactError(f"node {node} wrote a symlink into its artifact: {p.relative_to(tmp)}")
            if p.is_file():
                st = p.stat()
                files.append(
                    {
                        "path": p.relative_to(tmp).as_posix(),
                        "sha256": sha256_file(p),
                        "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns,
                    }
                )
        clash = sorted(set(extra or {}) & _CORE_FIELDS)
        if clash:
            raise ArtifactError(f"node {node}: manifest fields {clash} are the store's own")
        manifest = {
            "node": node,
            "key": key,
            "inputs": inputs,
            "files": files,
            "metrics": metrics,
            "libraries": library_versions(),
            "timings": {
                "started": started,
                "finished": time.time(),
                "seconds": round(time.time() - started, 3),
            },
            "host": platform.node(),
            **(extra or {}),
        }
        manifest = redact(manifest)  # no credentials in any manifest, whatever a node put in it
        tmp_manifest = tmp / (MANIFEST + ".part")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
        os.replace(tmp_manifest, tmp / MANIFEST)
        fsync_tree(tmp)
        final = self.path(node, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a stale dir without manifest (killed run) or a forced rebuild
            trash = self.root / ".tmp" / f"trash-{node}-{key}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_path(final.parent, os.O_RDONLY | os.O_DIRECTORY)  # the rename itself is durable
        return Artifact(node, key, str(final))

    def build(
        self,
        node: str,
        inputs: dict[str, Any],
        compute: Callable[[Path, Path], dict[str, Any] | None],
        force: bool = False,
    ) -> tuple[Artifact, bool]:
        """The one write path: return (artifact, ran). ``compute(out_dir, scratch_dir)`` writes the files
        and returns metrics; it runs only when no manifest exists for the key (or ``force``), under the
        key's lock, in a temp dir renamed into place after the manifest is written. ``scratch`` survives
        a killed attempt (checkpoints) and is removed after a successful commit."""
        key = content_key(inputs)
        hit = self.get(node, key)
        if hit and not force:
            return hit, False
        with self.lock(node, key):
            hit = self.get(node, key)  # another run may have finished it while we waited
            if hit and not force:
                return hit, False
            tmp = self.tmp_dir(node, key)
            scratch = self.root / ".scratch" / f"{node}-{key}"
            scratch.mkdir(parents=True, exist_ok=True)
            started = time.time()
            try:
                metrics = _metrics_of(node, compute(tmp, scratch))
                extra = metrics.pop(MANIFEST_FIELDS, None)
                art = self.commit(node, key, tmp, inputs, metrics, started, extra)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(scratch, ignore_errors=True)
            return art, True

    def clean_tmp(self, older_than_s: float = 24 * 3600) -> list[str]:
        """Remove what killed runs left in ``.tmp``: build dirs whose owner process is gone (its pid
        is in the name) and whose key lock is free, and anything else there (moved-aside damaged
        artifacts, older names) once older than ``older_than_s``. Returns the names removed.

        The lock check is what makes this safe on a root shared by several hosts: a pid is only
        meaningful on its own host, while a build anywhere holds its key's lock until it commits."""
        d = self.root / ".tmp"
        if not d.is_dir():
            return []
        removed, now = [], time.time()
        for p in d.iterdir():
            owner = _owner_pid(p.name)
            try:
                if owner:
                    stale = not _alive(owner) and self._key_unlocked(p.name.rsplit("-", 2)[0])
                else:
                    stale = now - p.lstat().st_mtime > older_than_s
            except OSError:
                continue
            if stale:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        if removed:
            log.info("artifact store: removed %d temp dir(s) left by killed runs", len(removed))
        return removed


_CORE_FIELDS = frozenset(("node", "key", "inputs", "files", "metrics", "libraries", "timings", "host"))


def _metrics_of(node: str, result: Any) -> dict[str, Any]:
    """A node's build returns its metrics (a mapping) or None; anything else is a bug in the node."""
    if result is None:
        return {}
    if not isinstance(result, Mapping):
        raise TypeError(
            f"node {node}'s build returned {type(result).__name__}, not a metrics mapping or None"
        )
    return dict(result)


def _owner_pid(name: str) -> int | None:
    parts = name.rsplit("-", 2)
    if len(parts) == 3 and parts[1].startswith("p") and parts[1][1:].isdigit():
        return int(parts[1][1:])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
