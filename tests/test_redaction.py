"""A tracking URI's password appears nowhere: not in the artifact store (manifests, registered.json),
not in MLflow (params, tags, run metadata, the server's DB and artifacts), not on stdout/stderr or in
the logs. Planted both ways the issue found it leaking: YAML ``register.tracking_uri`` and env
``MLFLOW_TRACKING_URI``, against a real ``mlflow server``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from registry_helpers import (
    MlflowServer,
    build_artifacts,
    fake_llama_cpp,
    migrated_db,
    with_extractor_placeholders,
    write_config,
)

from dagtune.config import load_config
from dagtune.logs import NODE_LOG
from dagtune.pipeline import run_node
from dagtune.redact import redact, redact_uri, split_credentials
from dagtune.store import ArtifactStore

SECRET = "PLANTED-s3cret-91f2"


def test_redact_and_split():
    uri = f"https://alice:{SECRET}@mlflow.example:5000/path?q=1"
    assert (
        redact_uri(f"View run x at: {uri}/#/runs/1")
        == "View run x at: https://***@mlflow.example:5000/path?q=1/#/runs/1"
    )
    assert redact({"a": [uri, ("x", uri)], "n": 1}) == {
        "a": [redact_uri(uri), ("x", redact_uri(uri))],
        "n": 1,
    }
    assert split_credentials(uri) == ("https://mlflow.example:5000/path?q=1", "alice", SECRET)
    assert split_credentials("http://bob%40corp:p%2Fw@h")[1:] == ("bob@corp", "p/w")
    assert split_credentials("sqlite:////tmp/x.db") == ("sqlite:////tmp/x.db", None, None)
    assert redact_uri("mail me at a@b.c") == "mail me at a@b.c"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    srv = MlflowServer(migrated_db(d / "mlflow.db", tmp_path_factory.getbasetemp()), d / "art", d / "log")
    srv.start()
    yield srv, d
    srv.stop()


def _leaks(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def _register(cfg, store: ArtifactStore):
    return run_node("register", cfg, with_extractor_placeholders(store, build_artifacts(store)))


@pytest.mark.parametrize("where", ["yaml", "env"])
def test_planted_password_appears_nowhere(server, state_dir, tmp_path, monkeypatch, capfd, caplog, where):
    srv, server_dir = server
    secret_uri = srv.uri.replace("http://", f"http://alice:{SECRET}@")
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_llama_cpp())
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    path = write_config(tmp_path, names=(f"fc-{where}", f"clf-{where}"))
    if where == "yaml":
        raw = yaml.safe_load(path.read_text())
        raw["register"]["tracking_uri"] = secret_uri
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", secret_uri)
    cfg = load_config(path, "tiny")
    assert SECRET in cfg.tracking_uri
    with caplog.at_level(logging.DEBUG):
        art, res = _register(cfg, ArtifactStore(cfg.artifact_root))
    mlflow.set_tracking_uri(None)
    assert res.status == "ran" and (art.dir / "registered.json").is_file()
    assert art.manifest()["inputs"]["config"]["tracking_uri"] == (
        redact_uri(secret_uri) if where == "yaml" else None
    )
    out, err = capfd.readouterr()
    node_log = art.dir / NODE_LOG  # library output of the node's thread (MLflow's run links) goes here
    printed = out + err + caplog.text + (node_log.read_text() if node_log.is_file() else "")
    assert "View run" in printed  # MLflow did print its run links
    assert SECRET not in printed
    assert _leaks(state_dir) == [] and _leaks(server_dir) == []
