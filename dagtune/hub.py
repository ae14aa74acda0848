"""Hub revisions: a hub dataset or model id resolved to the commit sha that enters the key and is loaded.

At plan time ``resolve_revision`` asks the hub (``HfApi().dataset_info`` / ``model_info`` with the
configured ``revision``, default ``main``) for the commit sha. Offline (``HF_HUB_OFFLINE``) or when the
hub cannot be reached, the last revision resolved on this machine is read from the local Hugging Face
cache (``<HF_HUB_CACHE>/<datasets|models>--org--name/refs/<revision>``, the file huggingface_hub writes
on download and this module writes after each resolution) and the log says so. A revision that is
already a full commit sha is used as is. The key holds the sha only, so it is the same online and
offline.

The loaders (``datasets.load_dataset``, ``snapshot_download``) take ``loaded_revision``: the sha this
process resolved last for that id, i.e. the one in the key just computed for the node that loads it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Literal

from dagtune.config import ConfigError

log = logging.getLogger("dagtune.hub")

RepoKind = Literal["dataset", "model"]
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
TIMEOUT_S = 10.0
# Last resolution per (kind, id, requested revision) in this process: what the loaders load.
_RESOLVED: dict[tuple[str, str, str], str] = {}


class HubRevisionError(ConfigError):
    """A configured hub id/revision that cannot be resolved (unknown, or offline with nothing cached)."""


def _refs_file(kind: RepoKind, repo_id: str, revision: str) -> Path:
    from huggingface_hub import constants

    folder = constants.REPO_ID_SEPARATOR.join([f"{kind}s", *repo_id.split("/")])
    return Path(constants.HF_HUB_CACHE) / folder / "refs" / revision


def cached_revision(kind: RepoKind, repo_id: str, revision: str) -> str | None:
    """The commit sha the local HF cache last recorded for ``revision`` of ``repo_id``, or None."""
    p = _refs_file(kind, repo_id, revision)
    sha = p.read_text().strip() if p.is_file() else ""
    return sha if SHA_RE.match(sha) else None


def _remember(kind: RepoKind, repo_id: str, revision: str, sha: str) -> None:
    """Record the resolution in the HF cache's refs (huggingface_hub's own format) for offline runs."""
    p = _refs_file(kind, repo_id, revision)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.is_file() or p.read_text().strip() != sha:
            tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
            tmp.write_text(sha)
            os.replace(tmp, p)
    except OSError as e:  # a read-only cache: the key is still right, only offline reuse is lost
        log.warning("hub: cannot record %s %s@%s in the HF cache (%s)", kind, repo_id, revision, e)


def _ask_hub(kind: RepoKind, repo_id: str, revision: str) -> str:
    """The sha from the hub API; raises ConnectionError when the hub cannot be reached."""
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.is_offline_mode():
        raise ConnectionError("HF_HUB_OFFLINE is set")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    info = api.dataset_info if kind == "dataset" else api.model_info
    try:
        sha = info(repo_id, revision=revision, timeout=TIMEOUT_S).sha
    except (OfflineModeIsEnabled, httpx.TransportError, TimeoutError) as e:
        raise ConnectionError(str(e) or type(e).__name__) from e
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", 0) if e.response is not None else 0
        if status >= 500 or status == 429:
            raise ConnectionError(f"hub answered {status}") from e
        raise
    if not sha or not SHA_RE.match(sha):
        raise ConnectionError(f"hub answered no commit sha for {repo_id}@{revision} (got {sha!r})")
    return sha


def resolve_revision(kind: RepoKind, repo_id: str, revision: str | None, where: str) -> str:
    """The commit sha of ``repo_id`` at ``revision`` (default main); ``where`` names the YAML path
    in errors. Online: asked from the hub and recorded in the HF cache; offline or unreachable: the
    cache's last record, with a warning."""
    requested = revision or "main"
    if SHA_RE.match(requested):
        _RESOLVED[(kind, repo_id, requested)] = requested
        return requested
    try:
        sha = _ask_hub(kind, repo_id, requested)
    except ConnectionError as e:
        sha = cached_revision(kind, repo_id, requested)
        if sha is None:
            raise HubRevisionError(
                f"{where}: cannot resolve hub {kind} {repo_id!r} at revision {requested!r}: the hub is not "
                f"reachable ({e}) and the local HF cache has no record of it; go online once or set "
                f"{where} to a commit sha that is in the cache"
            ) from None
        log.warning(
            "hub: %s %s@%s resolved from the local HF cache to %s (hub not reachable: %s)",
            kind,
            repo_id,
            requested,
            sha[:12],
            e,
        )
    except Exception as e:  # unknown repo or revision, gated repo: the config is wrong
        raise HubRevisionError(
            f"{where}: hub {kind} {repo_id!r} at revision {requested!r}: {type(e).__name__}: {e}"
        ) from None
    else:
        _remember(kind, repo_id, requested, sha)
        log.info("hub: %s %s@%s is commit %s", kind, repo_id, requested, sha[:12])
    _RESOLVED[(kind, repo_id, requested)] = sha
    return sha


def loaded_revision(kind: RepoKind, repo_id: str, revision: str | None, where: str) -> str:
    """The sha to load: the one this process resolved last for the key, else resolved now."""
    requested = revision or "main"
    return _RESOLVED.get((kind, repo_id, requested)) or resolve_revision(kind, repo_id, revision, where)
