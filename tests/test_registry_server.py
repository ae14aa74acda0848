"""Against a real ``mlflow server`` (SQLite backend, proxied artifacts) on 127.0.0.1 and a free port:
register, alias, promote, rollback, load by alias and predict; a second run adds no version; the
server stopped mid-registration gives a clear error and loses nothing; after a restart the rerun
completes and registers once."""

from __future__ import annotations

import sys

import mlflow
import pytest
from registry_helpers import (
    MlflowServer,
    build_artifacts,
    fake_llama_cpp,
    migrated_db,
    solutions,
    write_config,
)

from dagtune.config import load_config
from dagtune.registry import registry as reg
from dagtune.registry.node import RunInfo, register_pipeline, tracker_for
from dagtune.registry.tracking import RegistryUnavailable
from dagtune.store import ArtifactStore


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    db = migrated_db(d / "mlflow.db", tmp_path_factory.getbasetemp())
    srv = MlflowServer(db, d / "artifacts", d / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def cfg(server, state_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_llama_cpp())
    c = load_config(write_config(tmp_path), "tiny")
    assert c.tracking_uri == server.uri
    yield c
    mlflow.set_tracking_uri(None)


def _run(cfg, arts, flow):
    return register_pipeline(cfg, arts, RunInfo(config_hash="beef" * 16, profile="tiny", flow_run_id=flow))


def _versions(tr, name):
    return [str(v.version) for v in reg.list_versions(tr, name)]


def test_server_register_alias_promote_rollback_predict_and_outage(cfg, server, monkeypatch):
    store = ArtifactStore(cfg.artifact_root)
    first = _run(cfg, build_artifacts(store), "run-1")
    assert {m: (r["version"], r["created"], r["champion"]) for m, r in first["models"].items()} == {
        "function_calling": ("1", True, "1"),
        "classifier": ("1", True, "1"),
    }
    tr = tracker_for(cfg)
    # artifacts went through the server (proxied), and load back by alias
    assert tr.client.get_run(first["parent_run_id"]).info.artifact_uri.startswith("mlflow-artifacts:")
    assert mlflow.pyfunc.load_model("models:/fc@champion").predict(["w1"]) == ["GGUFa:w1"]
    pred = mlflow.pyfunc.load_model("models:/clf@champion").predict(solutions("fine", "wrong step"))
    assert list(pred["label"]) == ["correct", "flawed"]

    # second pipeline run: nothing new
    second = _run(cfg, build_artifacts(store), "run-2")
    assert not any(r["created"] for r in second["models"].values())
    assert _versions(tr, "fc") == ["1"] and _versions(tr, "clf") == ["1"]

    # the server goes away after the new model is logged, right before its version is created
    arts_b = build_artifacts(store, variant="b", fc_exact=0.9, clf_f1=0.8)
    real_register = reg.register_version

    def stop_then_register(*a, **k):
        server.stop()
        return real_register(*a, **k)

    monkeypatch.setattr(reg, "register_version", stop_then_register)
    with pytest.raises(RegistryUnavailable) as ei:
        _run(cfg, arts_b, "run-3")
    msg = str(ei.value)
    assert server.uri in msg and "unreachable" in msg and "2 attempt(s)" in msg and "rerun" in msg
    # nothing lost: every artifact is still in the store under its key
    assert all(store.get(a.node, a.key) is not None for a in arts_b.values())

    monkeypatch.setattr(reg, "register_version", real_register)
    server.start()
    third = _run(cfg, build_artifacts(store, variant="b", fc_exact=0.9, clf_f1=0.8), "run-4")
    assert {m: (r["version"], r["created"], r["champion"]) for m, r in third["models"].items()} == {
        "function_calling": ("2", True, "2"),
        "classifier": ("2", True, "2"),
    }
    fourth = _run(cfg, arts_b, "run-5")
    assert not any(r["created"] for r in fourth["models"].values())
    assert _versions(tr, "fc") == ["1", "2"] and _versions(tr, "clf") == ["1", "2"]

    # people: roll back, then promote again; who and why recorded, versions kept
    ev = reg.rollback(tr, "fc", "carol", "prod regression")
    assert (ev["version"], ev["previous"]) == ("1", "2")
    assert mlflow.pyfunc.load_model("models:/fc@champion").predict("w2") == ["GGUFa:w2"]
    reg.promote(tr, "fc", "2", "dave", "fixed upstream")
    assert mlflow.pyfunc.load_model("models:/fc@champion").predict("w2") == ["GGUFb:w2"]
    v2 = tr.client.get_model_version("fc", "2")
    assert v2.tags["dagtune.rolled_back_by"] == "carol" and v2.tags["dagtune.promoted_by"] == "dave"
    assert [e["action"] for e in reg.champion_history(tr, "fc")] == [
        "promote",
        "promote",
        "rollback",
        "promote",
    ]
    assert _versions(tr, "fc") == ["1", "2"]
