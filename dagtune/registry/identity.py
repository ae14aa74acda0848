"""Registry digests from content only: the same model bytes give the same digest on any machine.

``adapter_config.json`` (PEFT) records the base model as the absolute path it was loaded from and
``target_modules`` in set order; a JSON file's digest here is taken over its canonical form with
path-valued references reduced to their last component and those lists sorted, so the same adapter
trained under another state directory is the same registered version. Files that describe a run
or the model rather than being it (``train_log.jsonl``, PEFT's ``README.md`` model card) are not part
of a version's identity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

PATH_KEYS = ("base_model_name_or_path", "_name_or_path", "name_or_path")
SORTED_LISTS = ("target_modules", "modules_to_save")
# Files that describe a run or the model rather than being it: timings, PEFT's generated model card
# (which repeats the absolute base-model path).
NON_MODEL_FILES = ("train_log.jsonl", "README.md")


def _is_path(value: str) -> bool:
    return PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()


def normalised_json(obj: Any) -> Any:
    """``obj`` with absolute path references replaced by their last component and set-like lists sorted."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if k in PATH_KEYS and isinstance(v, str) and _is_path(v):
                v = PureWindowsPath(v).name if "\\" in v else PurePosixPath(v).name
            elif k in SORTED_LISTS and isinstance(v, list) and all(isinstance(x, str) for x in v):
                v = sorted(v)
            out[k] = normalised_json(v)
        return out
    if isinstance(obj, list):
        return [normalised_json(x) for x in obj]
    return obj


def file_identity(root: Path, rel: str, sha256: str) -> str:
    """The digest a file contributes: its sha256, or for JSON the sha256 of its normalised form."""
    if not rel.endswith(".json"):
        return sha256
    try:
        data = json.loads((root / rel).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return sha256
    canonical = json.dumps(normalised_json(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def content_digest(manifest: Mapping[str, Any], root: Path, prefix: str = "") -> str:
    """sha256 over (path, identity) of the artifact's model files under ``prefix``."""
    files = sorted(
        (f["path"], file_identity(root, f["path"], f["sha256"]))
        for f in manifest.get("files", [])
        if f["path"].startswith(prefix) and Path(f["path"]).name not in NON_MODEL_FILES
    )
    return hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()
