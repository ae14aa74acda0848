"""Content-addressed artifact store.

Every node writes into ``<root>/<node>/<key>/``. The key is the sha256 of the canonical JSON of the
node's inputs (name, code version, its config section, upstream artifact keys). A directory counts as
present only when its ``manifest.json`` exists; the manifest is written last inside a temporary
directory which is then renamed into place, so a killed run never leaves a half artifact that looks
complete. A file lock per key makes concurrent runs of the same config compute each key once.

The root is a local path today; everything goes through ``ArtifactStore`` so an fsspec backend can
replace the path operations later without touching the nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

MANIFEST = "manifest.json"
# Prefect keeps its task-cache record next to the artifact (see tasks/_node.py): deleting an artifact
# directory then also invalidates Prefect's cache entry for it.
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
        d = self.path(node, key)
        if (d / MANIFEST).is_file():
            return Artifact(node, key, str(d))
        return None

    def list_keys(self, node: str) -> list[str]:
        d = self.root / node
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if (p / MANIFEST).is_file())

    # -- writing ------------------------------------------------------------------------------
    @contextmanager
    def lock(self, node: str, key: str, timeout: float = -1) -> Iterator[None]:
        lp = self.lock_path(node, key)
        lp.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lp), timeout=timeout):
            yield

    def tmp_dir(self, node: str, key: str) -> Path:
        d = self.root / ".tmp" / f"{node}-{key}-{uuid.uuid4().hex[:8]}"
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
        """Hash the files, write the manifest last, then rename the temp dir into place."""
        files = []
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files.append(
                    {
                        "path": p.relative_to(tmp).as_posix(),
                        "sha256": sha256_file(p),
                        "size": p.stat().st_size,
                    }
                )
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
        tmp_manifest = tmp / (MANIFEST + ".part")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
        os.replace(tmp_manifest, tmp / MANIFEST)
        final = self.path(node, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a stale dir without manifest (killed run) or a forced rebuild
            trash = self.root / ".tmp" / f"trash-{node}-{key}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
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
                metrics = compute(tmp, scratch) or {}
                art = self.commit(node, key, tmp, inputs, metrics, started)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(scratch, ignore_errors=True)
            return art, True

    def clean_tmp(self, older_than_s: float = 24 * 3600) -> None:
        """Remove temp dirs of killed runs (they never have a manifest at the final path)."""
        d = self.root / ".tmp"
        if not d.is_dir():
            return
        now = time.time()
        for p in d.iterdir():
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
