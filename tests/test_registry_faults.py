"""MLflow faults during registration, against a real SQLite store: a transient failure while logging a
model is retried (the failed attempt's model deleted: no orphan), a lost reply to "create model version"
does not make a duplicate, a registration that gives up leaves no run RUNNING, and runs left RUNNING
by a killed registration are marked FAILED by the next one."""

from __future__ import annotations

import sys

import mlflow
import pytest
from registry_helpers import build_artifacts, fake_llama_cpp, migrated_db, write_config

from dagtune.config import load_config
from dagtune.registry import models as mdl
from dagtune.registry import registry as reg
from dagtune.registry.node import RunInfo, register_pipeline, tracker_for
from dagtune.registry.tracking import TAG_CONFIG_HASH, RegistryUnavailable
from dagtune.store import ArtifactStore

HASH = "f00d" * 16


@pytest.fixture
def cfg(state_dir, tmp_path, tmp_path_factory, monkeypatch):
    migrated_db(state_dir / "mlflow.db", tmp_path_factory.getbasetemp())
    c = load_config(write_config(tmp_path), "tiny")
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_llama_cpp())
    yield c
    mlflow.set_tracking_uri(None)


def _run(cfg, arts, tracker=None):
    return register_pipeline(cfg, arts, RunInfo(config_hash=HASH, profile="tiny", flow_run_id="f"), tracker)


def _runs(tr, status):
    exp = tr.client.get_experiment_by_name(load_config().register.experiment)
    return tr.client.search_runs([exp.experiment_id], f"attributes.status = '{status}'")


def _once(real, exc):
    """``real`` that does its work and then fails the first time: the reply was lost."""
    calls = []

    def flaky(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return out

    return flaky, calls


def test_lost_create_version_reply_does_not_duplicate(cfg, monkeypatch):
    tr = tracker_for(cfg)
    flaky, calls = _once(tr.client.create_model_version, ConnectionError("connection reset by peer"))
    monkeypatch.setattr(tr.client, "create_model_version", flaky)
    out = _run(cfg, build_artifacts(ArtifactStore(cfg.artifact_root)), tr)
    assert out["models"]["function_calling"]["version"] == "1"
    assert out["models"]["function_calling"]["created"] is True
    assert [str(v.version) for v in reg.list_versions(tr, "fc")] == ["1"]
    assert len(calls) == 2  # fc: created (reply lost), then found by its digest; clf: created once


def test_transient_model_logging_failure_is_retried_without_orphans(cfg, monkeypatch):
    tr = tracker_for(cfg)
    flaky, calls = _once(mdl.log_gguf_model, ConnectionError("connection aborted"))
    monkeypatch.setattr(mdl, "log_gguf_model", flaky)
    out = _run(cfg, build_artifacts(ArtifactStore(cfg.artifact_root)), tr)
    assert len(calls) == 2 and out["models"]["function_calling"]["created"]
    mv = tr.client.get_model_version("fc", "1")
    exp_id = tr.client.get_run(mv.run_id).info.experiment_id
    models = tr.client.search_logged_models([exp_id], filter_string=f"source_run_id = '{mv.run_id}'")
    assert len(models) == 1 and models[0].model_id in mv.source  # the failed attempt's model is gone
    assert _runs(tr, "RUNNING") == [] and _runs(tr, "FAILED") == []


def test_registration_that_gives_up_leaves_no_run_running_and_reruns_once(cfg, monkeypatch):
    tr = tracker_for(cfg)
    store = ArtifactStore(cfg.artifact_root)

    def down(*a, **k):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(mdl, "log_gguf_model", down)
    with pytest.raises(RegistryUnavailable, match="log model function_calling failed after 2 attempt"):
        _run(cfg, build_artifacts(store), tr)
    assert _runs(tr, "RUNNING") == []
    assert [r.data.tags.get("dagtune.run_kind") for r in _runs(tr, "FAILED")] == ["pipeline"]
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_llama_cpp())
    out = _run(cfg, build_artifacts(store), tr)
    assert [str(v.version) for v in reg.list_versions(tr, "fc")] == ["1"] and out["models"][
        "function_calling"
    ]["created"]


def test_runs_left_running_by_a_killed_registration_are_failed_next_time(cfg):
    tr = tracker_for(cfg)
    exp_id = tr.experiment_id(cfg.register.experiment)
    killed = tr.client.create_run(exp_id, run_name="killed", tags={TAG_CONFIG_HASH: HASH})
    child = tr.client.create_run(exp_id, run_name="node", tags={"mlflow.parentRunId": killed.info.run_id})
    other = tr.client.create_run(exp_id, run_name="other config", tags={TAG_CONFIG_HASH: "beef" * 16})
    _run(cfg, build_artifacts(ArtifactStore(cfg.artifact_root)), tr)
    status = {
        r: tr.client.get_run(r).info.status
        for r in (killed.info.run_id, child.info.run_id, other.info.run_id)
    }
    assert list(status.values()) == ["FAILED", "FAILED", "RUNNING"]


# ------------------------------------------------------------------------------------------------
# the SQLite store's first initialisation
# ------------------------------------------------------------------------------------------------
def _half_built(path):
    """The state a SIGKILL during MLflow's first schema setup leaves (seen on this machine with a kill
    0.8 s into the migrations): tables up to an intermediate revision, plus the temp table of the batch
    migration that was running (`_alembic_tmp_tags`); every later init fails with "already exists"."""
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config, create_sqlalchemy_engine
    from mlflow.store.db_migrations.versions import df50e92ffc5e_add_experiment_tags_table as killed_in
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase
    from sqlalchemy import text

    engine = create_sqlalchemy_engine(f"sqlite:///{path}")
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(str(engine.url))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, killed_in.down_revision)
        conn.execute(
            text('CREATE TABLE _alembic_tmp_tags ("key" VARCHAR(250) NOT NULL, run_uuid VARCHAR(32))')
        )
    engine.dispose()


def test_half_built_sqlite_store_is_detected_and_rebuilt(tmp_path, caplog):
    from mlflow import MlflowClient

    from dagtune.registry.tracking import connect

    db = tmp_path / "mlflow.db"
    _half_built(db)
    with pytest.raises(Exception, match="already exists"):  # what every rerun hit before
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    tr = connect(f"sqlite:///{db}", state_dir=tmp_path)
    assert tr.client.create_experiment("e")
    assert "was half-built" in caplog.text and len(list(tmp_path.glob("mlflow.db.half-built-*"))) == 1
    mlflow.set_tracking_uri(None)


def test_broken_store_holding_runs_is_not_touched(tmp_path):
    import sqlite3

    from dagtune.registry.tracking import ensure_sqlite_store

    db = tmp_path / "mlflow.db"
    _half_built(db)
    with sqlite3.connect(db) as c:
        c.execute(
            "INSERT INTO runs (run_uuid, experiment_id, lifecycle_stage, status, source_type, start_time) "
            "VALUES ('r1', 0, 'active', 'FINISHED', 'LOCAL', 0)"
        )
    before = db.read_bytes()
    with pytest.raises(RuntimeError, match="broken schema .* holds runs: not touched"):
        ensure_sqlite_store(db)
    assert db.read_bytes() == before


_INIT = "import sys; from pathlib import Path; from dagtune.registry.tracking import ensure_sqlite_store; ensure_sqlite_store(Path(sys.argv[1]))"


def test_first_init_killed_midway_leaves_no_store_and_the_rerun_builds_it(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from dagtune.registry.tracking import ensure_sqlite_store

    db = tmp_path / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])}
    p = subprocess.Popen([sys.executable, "-c", _INIT, str(db)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".mlflow.db.init-*")):
        time.sleep(0.01)
    time.sleep(0.8)  # inside the migrations, where a kill used to leave the store half-built
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not db.exists()  # never half-built at the real path
    ensure_sqlite_store(db)
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()


# ------------------------------------------------------------------------------------------------
# dagtune gc
# ------------------------------------------------------------------------------------------------
def test_gc_keeps_recent_runs_plan_and_registered_versions(cfg):
    from dagtune.gc import collect, record_run

    store = ArtifactStore(cfg.artifact_root)
    arts = build_artifacts(store)
    _run(cfg, arts)  # registers fc (adapter + gguf) and clf: their artifacts are referenced
    old, _ = store.build("evaluate", {"old": 1}, lambda out, s: (out / "m.json").write_text("{}") and None)
    (store.root / ".scratch" / f"evaluate-{old.key}").mkdir(parents=True)
    (cfg.state_dir / "prefect-results" / "evaluate" / old.key).mkdir(parents=True)
    record_run(cfg.state_dir, "tiny", True, {"evaluate": arts["evaluate"].key})  # the last run used it

    dry = collect(cfg, keep_runs=1, dry_run=True)
    assert sorted(dry["deleted"]) == sorted(
        [f"prepare_data/{arts['prepare_data'].key}", f"evaluate/{old.key}"]
    )
    assert store.get("evaluate", old.key) is not None  # a dry run deletes nothing

    out = collect(cfg, keep_runs=1)
    assert sorted(out["deleted"]) == sorted(dry["deleted"]) and out["bytes_freed"] > 0
    assert (
        store.get("evaluate", old.key) is None and store.get("prepare_data", arts["prepare_data"].key) is None
    )
    assert not (store.root / ".scratch" / f"evaluate-{old.key}").exists()
    assert not (cfg.state_dir / "prefect-results" / "evaluate" / old.key).exists()
    for node in ("train_function_calling", "convert_gguf_function_calling", "train_classifier", "evaluate"):
        assert store.get(node, arts[node].key) is not None, node
    assert collect(cfg, keep_runs=0)["deleted"] == [f"evaluate/{arts['evaluate'].key}"]


def test_gc_collects_a_retired_nodes_artifacts_unless_kept(cfg):
    """convert_gguf became one node per model: a store from before still holds convert_gguf/<key>
    exports (GBs at real size). gc removes those nothing names, and keeps one a recent run used."""
    from dagtune.gc import collect, record_run

    store = ArtifactStore(cfg.artifact_root)
    _run(cfg, build_artifacts(store))
    old = [
        store.build(
            "convert_gguf", {"old": i}, lambda out, s: (out / "x.gguf").write_bytes(b"GGUF") and None
        )[0]
        for i in range(2)
    ]
    record_run(cfg.state_dir, "tiny", True, {"convert_gguf": old[1].key})
    out = collect(cfg, keep_runs=1)
    assert f"convert_gguf/{old[0].key}" in out["deleted"] and store.get("convert_gguf", old[0].key) is None
    assert store.get("convert_gguf", old[1].key) is not None


def test_gc_deletes_nothing_without_the_registry(cfg, monkeypatch, capsys):
    from registry_helpers import free_port

    from dagtune.cli import main

    store = ArtifactStore(cfg.artifact_root)
    art, _ = store.build("evaluate", {"old": 2}, lambda out, s: (out / "m.json").write_text("{}") and None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("DAGTUNE_ARTIFACT_ROOT", str(cfg.artifact_root))
    cfg_path = cfg.config_dir + "/pipeline_config.yaml"
    assert main(["gc", "--config", cfg_path, "--profile", "tiny"]) == 1
    assert "nothing deleted" in capsys.readouterr().err
    assert store.get("evaluate", art.key) is not None
