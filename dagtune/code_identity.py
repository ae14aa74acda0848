"""What a node's code is, for its content key: source-file hashes and the library versions that change
its output.

Each node declares the source paths that implement it (``pipeline.NODES[...].code``: packages such as
``dagtune/training`` or single modules such as ``dagtune/formats.py``, relative to the project root)
and the libraries whose version changes its output (``.libraries``). The key then holds one sha256
per ``.py`` file (line endings normalised, so a Windows checkout keys like a Linux one) and one
version per library, so upgrading dagtune or a pinned library recomputes the nodes it touches and
nothing else; ``dagtune status`` names the file or library that moved.

``torch`` enters as major.minor (a patch release does not change numerics we depend on); unsloth and
bitsandbytes only count for a node trained on the unsloth backend.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

# The project root: every declared path is relative to it. Tests point it at a copy of the tree.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
MAJOR_MINOR = ("torch",)
UNSLOTH_ONLY = ("unsloth", "unsloth_zoo", "bitsandbytes")


def normalised_sha256(path: Path) -> str:
    """sha256 of a text file's bytes with CRLF/CR line endings turned into LF."""
    data = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return hashlib.sha256(data).hexdigest()


def source_files(declared: str, root: Path | None = None) -> list[Path]:
    """The ``.py`` files a declared path stands for (a package: every module under it, sorted)."""
    root = root or SOURCE_ROOT
    p = root / declared
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(q for q in p.rglob("*.py") if "__pycache__" not in q.parts)
    raise FileNotFoundError(f"node source path {declared!r} does not exist under {root}")


def source_hashes(declared: tuple[str, ...], root: Path | None = None) -> dict[str, str]:
    """{file path relative to the project root: normalised sha256} over every declared path."""
    root = root or SOURCE_ROOT
    out: dict[str, str] = {}
    for d in declared:
        for f in source_files(d, root):
            out[f.relative_to(root).as_posix()] = normalised_sha256(f)
    return dict(sorted(out.items()))


def library_version(name: str) -> str:
    """Installed version of a distribution ("absent" when not installed); torch as major.minor."""
    try:
        v = metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "absent"
    if name in MAJOR_MINOR:
        v = ".".join(v.split("+")[0].split(".")[:2])
    return v


def library_pins(libraries: tuple[str, ...], backend: str | None = None) -> dict[str, str]:
    """Versions of the libraries that change a node's output; the unsloth stack only on that backend."""
    names = [n for n in libraries if n not in UNSLOTH_ONLY or backend == "unsloth"]
    return {n: library_version(n) for n in sorted(names)}


def code_inputs(
    declared: tuple[str, ...], libraries: tuple[str, ...], backend: str | None = None
) -> dict[str, Any]:
    """The ``code`` entry of a node's key inputs."""
    return {"sources": source_hashes(declared), "libraries": library_pins(libraries, backend)}
