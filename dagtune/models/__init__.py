"""Base models behind one API: project-built tiny models, local directories and hub ids.

* a tiny name (``tiny-functiongemma``, ``tiny-gemma3``, ``tiny-phi3``) is built once into the artifact
  store (node ``base_models``) and resolves to that directory;
* an existing local directory resolves to its absolute path;
* anything else is a hub id, resolved to a commit sha (``dagtune.hub``; ``revision`` picks the branch,
  tag or sha, default main) and downloaded as that snapshot, whose local directory is what loads.

``model_fingerprint`` is what content keys use for "which base model": it never loads a model, so
``plan``/``status`` stay cheap. Heavy imports (torch, transformers) happen inside functions only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from dagtune.models.tiny import SPECS, TINY_VERSION, build_tiny
from dagtune.store import Artifact, ArtifactStore, content_key

NODE = "base_models"
TINY_MODELS: tuple[str, ...] = tuple(SPECS)

# Files whose bytes define a local model directory's config and tokenizer.
_FINGERPRINT_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
# Weight files: only names and sizes are hashed (reading gigabytes per plan would be too slow).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

__all__ = [
    "NODE",
    "TINY_MODELS",
    "base_revision",
    "TINY_VERSION",
    "build_tiny",
    "ensure_tiny",
    "is_tiny",
    "load_tokenizer",
    "model_fingerprint",
    "reference_model",
    "resolve_model",
    "tiny_inputs",
]


def is_tiny(name: str) -> bool:
    return name in SPECS


def reference_model(name: str) -> str:
    """The real model a tiny one stands in for (other names unchanged)."""
    return SPECS[name].reference if is_tiny(name) else name


def tiny_inputs(name: str) -> dict[str, Any]:
    """Content-key inputs of a tiny model's artifact."""
    if not is_tiny(name):
        raise ValueError(f"{name!r} is not a tiny model; known: {list(TINY_MODELS)}")
    return {"node": NODE, "name": name, "version": TINY_VERSION}


def ensure_tiny(name: str, store: ArtifactStore) -> tuple[Artifact, bool]:
    """Build tiny model ``name`` into the store unless it is there: (artifact, built_now)."""
    inputs = tiny_inputs(name)

    def build(out: Path, scratch: Path) -> dict[str, Any]:
        return build_tiny(name, out)

    return store.build(NODE, inputs, build)


def _local_dir(name: str) -> Path | None:
    p = Path(name).expanduser()
    return p.resolve() if p.is_dir() else None


# Files of hub model repos that no loader here reads (other frameworks, original checkpoints, GGUF).
_SNAPSHOT_IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.tflite", "original/*"]


def resolve_model(name: str, store: ArtifactStore, revision: str | None = None) -> str:
    """What to pass to ``from_pretrained``: the tiny model's store directory, a local directory's
    absolute path, or the local snapshot of a hub model at the commit its key holds."""
    if is_tiny(name):
        art, _ = ensure_tiny(name, store)
        return str(art.dir)
    local = _local_dir(name)
    if local is not None:
        return str(local)
    from huggingface_hub import snapshot_download

    from dagtune.hub import loaded_revision

    sha = loaded_revision("model", name, revision, f"model {name}")
    return snapshot_download(name, revision=sha, ignore_patterns=_SNAPSHOT_IGNORE)


def load_tokenizer(name: str, store: ArtifactStore, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name, store, revision))


def _dir_digest(d: Path) -> str:
    h = hashlib.sha256()
    for fname in _FINGERPRINT_FILES:
        p = d / fname
        if p.is_file():
            h.update(f"file {fname} {p.stat().st_size}\n".encode())
            h.update(p.read_bytes())
    for p in sorted(d.iterdir()):
        if p.is_file() and (p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json")):
            h.update(f"weights {p.name} {p.stat().st_size}\n".encode())
    return h.hexdigest()


def model_fingerprint(
    name: str, store: ArtifactStore, revision: str | None = None, where: str = ""
) -> dict[str, str]:
    """Identity of a base model for content keys (nothing is built or loaded).

    tiny: its artifact key (which covers the builder code and templates); local directory: sha256 over
    config, generation config and tokenizer files plus weight file names and sizes (not the path, so a
    moved copy keeps its key); hub id: the id and the commit sha ``revision`` resolves to (``where``
    names the config path in errors)."""
    if is_tiny(name):
        return {"tiny": name, "artifact_key": content_key(tiny_inputs(name))}
    local = _local_dir(name)
    if local is not None:
        return {"local_sha256": _dir_digest(local)}
    from dagtune.hub import resolve_revision

    return {"hub_id": name, "revision": resolve_revision("model", name, revision, where or f"model {name}")}


def base_revision(train_manifest: dict[str, Any]) -> str | None:
    """The hub commit a training artifact's base model was keyed (and loaded) at, or None."""
    model = (train_manifest.get("inputs", {}).get("extra") or {}).get("model") or {}
    return model.get("revision")
