"""Hub sources and models are keyed by the commit their revision resolves to: a small stand-in for the
hub API on 127.0.0.1 (HF_ENDPOINT) answers the same JSON endpoints huggingface_hub calls."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import unquote, urlparse

import pytest

from dagtune import hub
from dagtune.config import load_config
from dagtune.pipeline import plan

SHA_A = "a" * 40
SHA_B = "b" * 40
DATASET = "someone/arabic-actions"
MODEL = "someone/base-270m"


class FakeHub:
    """{(kind, repo_id, revision): sha}; GET /api/{kind}s/{id}/revision/{rev} -> {"id", "sha"}."""

    def __init__(self) -> None:
        self.refs: dict[tuple[str, str, str], str] = {}
        self.calls: list[str] = []


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    state = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            path = unquote(urlparse(self.path).path)
            state.calls.append(path)
            parts = path.strip("/").split("/")  # api, datasets|models, org, name, revision, rev
            if len(parts) >= 6 and parts[0] == "api" and parts[4] == "revision":
                kind, repo, rev = parts[1][:-1], "/".join(parts[2:4]), "/".join(parts[5:])
                sha = state.refs.get((kind, repo, rev))
                if sha:
                    body = json.dumps({"id": repo, "sha": sha, "private": False}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub, "_RESOLVED", {})
    yield state
    server.shutdown()
    server.server_close()


def hub_config(**model_overrides):
    """The tiny profile with function calling read from a hub dataset and trained on a hub model."""
    return load_config(
        overrides={
            "prepare_data": {
                "function_calling": {"source": {"kind": "hf", "hf_id": DATASET, "format": "mobile_actions"}}
            },
            "train_function_calling": {"model": {"name": MODEL, **model_overrides}},
        }
    )


def test_a_dataset_revision_change_changes_the_key(fake_hub, state_dir):
    fake_hub.refs[("dataset", DATASET, "main")] = SHA_A
    fake_hub.refs[("model", MODEL, "main")] = SHA_A
    first = plan(hub_config())
    source = first["prepare_data"]["inputs"]["extra"]["sources"]["function_calling"]
    assert source == {"hub": {"id": DATASET, "revision": SHA_A}}
    assert f"/api/datasets/{DATASET}/revision/main" in fake_hub.calls

    fake_hub.refs[("dataset", DATASET, "main")] = SHA_B  # someone pushed to the dataset
    second = plan(hub_config())
    assert second["prepare_data"]["key"] != first["prepare_data"]["key"]
    assert second["train_function_calling"]["key"] != first["train_function_calling"]["key"]  # upstream
    assert hub.loaded_revision("dataset", DATASET, None, "x") == SHA_B  # what load_dataset gets


def test_a_model_revision_change_changes_only_that_training_key(fake_hub, state_dir):
    fake_hub.refs[("dataset", DATASET, "main")] = SHA_A
    fake_hub.refs[("model", MODEL, "main")] = SHA_A
    fake_hub.refs[("model", MODEL, "v2")] = SHA_B
    main = plan(hub_config())
    assert main["train_function_calling"]["inputs"]["extra"]["model"] == {"hub_id": MODEL, "revision": SHA_A}
    v2 = plan(hub_config(revision="v2"))
    assert v2["train_function_calling"]["inputs"]["extra"]["model"]["revision"] == SHA_B
    moved = {n for n in main if main[n]["key"] != v2[n]["key"]}
    assert "prepare_data" not in moved and "train_extractor" not in moved
    assert "train_function_calling" in moved
    # a full sha is used as is, without asking the hub
    n_calls = len(fake_hub.calls)
    pinned = plan(hub_config(revision=SHA_B))
    assert pinned["train_function_calling"]["inputs"]["extra"]["model"]["revision"] == SHA_B
    assert not any(c.startswith(f"/api/models/{MODEL}") for c in fake_hub.calls[n_calls:])


def test_offline_uses_the_last_revision_recorded_in_the_cache_and_says_so(fake_hub, state_dir, caplog):
    from huggingface_hub import constants

    fake_hub.refs[("dataset", DATASET, "main")] = SHA_A
    fake_hub.refs[("model", MODEL, "main")] = SHA_A
    online = plan(hub_config())
    n_calls = len(fake_hub.calls)
    fake_hub.refs[("dataset", DATASET, "main")] = SHA_B  # not seen: offline
    constants.HF_HUB_OFFLINE = True  # restored by the fixture's monkeypatch
    with caplog.at_level(logging.WARNING, logger="dagtune.hub"):
        offline = plan(hub_config())
    assert len(fake_hub.calls) == n_calls  # nothing asked from the hub
    assert offline["prepare_data"]["key"] == online["prepare_data"]["key"]
    assert any("resolved from the local HF cache" in r.getMessage() for r in caplog.records)


def test_unreachable_hub_with_nothing_cached_names_the_config_path(fake_hub, state_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(hub.HubRevisionError, match=r"prepare_data\.function_calling\.source\.revision"):
        plan(hub_config())


def test_unknown_revision_is_a_config_error(fake_hub, state_dir):
    fake_hub.refs[("model", MODEL, "main")] = SHA_A
    with pytest.raises(hub.HubRevisionError, match=r"prepare_data\.function_calling\.source\.revision"):
        plan(hub_config())  # the dataset has no main on the stand-in: 404


def test_tiny_local_and_synthetic_sources_ask_nothing(fake_hub, state_dir):
    plan(load_config())
    assert fake_hub.calls == []
