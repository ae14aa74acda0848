"""MLflow tracking + registry against a real SQLite store: gate, idempotent versions, aliases,
promote/rollback (library and CLI), load by alias and predict, retries on an unreachable server."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
from registry_helpers import (
    build_artifacts,
    fake_llama_cpp,
    fc_metrics,
    free_port,
    migrated_db,
    solutions,
    write_config,
)

from dagtune.config import PromotionGate, load_config
from dagtune.registry import registry as reg
from dagtune.registry.gate import group_drops
from dagtune.registry.node import RunInfo, register_pipeline, tracker_for
from dagtune.registry.tracking import (
    RegistryUnavailable,
    RetryPolicy,
    child_run,
    connect,
    git_commit,
    is_unavailable,
    parent_run,
    with_retries,
)
from dagtune.store import ArtifactStore

# ----------------------------------------------------------------------------------------------
# the gate (pure)
# ----------------------------------------------------------------------------------------------
GATE = reg.Gate.of(PromotionGate(metric="exact_match", min_delta=0.01, max_group_drop=0.05))


# The headline rule (base, champion, min_delta) is a paired bootstrap now: tests/test_registry_gate.py.
# The per-group drop rule is unchanged:
def test_gate_group_drop_and_missing_group():
    champ = fc_metrics(0.70, {"MSA": 0.80, "Gulf": 0.60})
    ok, why = group_drops(fc_metrics(0.80, {"MSA": 0.90, "Gulf": 0.54}), champ, GATE)
    assert not ok and any("by_dialect[Gulf]" in r and "dropped" in r for r in why)
    ok, why = group_drops(fc_metrics(0.80, {"MSA": 0.90, "Gulf": 0.56}), champ, GATE)
    assert ok, why  # a 0.04 drop is within tolerance
    ok, why = group_drops(fc_metrics(0.80, {"MSA": 0.90}), champ, GATE)
    assert not ok and any("Gulf" in r and "no exact_match" in r for r in why)


def test_gate_reads_grouped_layout_and_skips_small_groups():
    # evaluation's layout: {"overall": {...}, "by_dialect": {...}}; tiny groups are noise
    champ = {"overall": {"exact_match": 0.5}, "by_dialect": {"Levant": {"exact_match": 1.0, "n": 2}}}
    new = {"overall": {"exact_match": 0.6}, "by_dialect": {"Levant": {"exact_match": 0.0, "n": 2}}}
    assert not group_drops(new, champ, reg.Gate.of(PromotionGate()))[0]
    assert group_drops(new, champ, reg.Gate.of(PromotionGate(min_group_size=5)))[0]


# ----------------------------------------------------------------------------------------------
# retries
# ----------------------------------------------------------------------------------------------
def test_unreachable_server_retries_with_backoff_then_clear_error():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    with pytest.raises(RegistryUnavailable) as ei:
        connect(uri, RetryPolicy(retries=2, backoff_s=0.05))
    msg = str(ei.value)
    assert uri in msg and "unreachable" in msg and "3 attempt(s)" in msg and ei.value.attempts == 3
    assert time.time() - t0 < 20  # MLflow's own retry loop is off: ours is the one that counts


def test_backoff_doubles_and_real_errors_are_not_retried():
    sleeps: list[float] = []

    def flaky() -> None:
        raise ConnectionError("connection refused")

    with pytest.raises(RegistryUnavailable):
        with_retries(flaky, what="x", uri="u", policy=RetryPolicy(3, 0.5, 1.5), sleep=sleeps.append)
    assert sleeps == [0.5, 1.0, 1.5]
    sleeps.clear()
    with pytest.raises(ValueError):
        with_retries(lambda: int("x"), what="x", uri="u", policy=RetryPolicy(3, 0.5), sleep=sleeps.append)
    assert sleeps == [] and not is_unavailable(ValueError("bad name"))


# ----------------------------------------------------------------------------------------------
# against a real SQLite store
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def cfg(state_dir, tmp_path, tmp_path_factory, monkeypatch):
    db = migrated_db(state_dir / "mlflow.db", tmp_path_factory.getbasetemp())
    assert db.is_file()
    path = write_config(tmp_path)
    c = load_config(path, "tiny")
    assert c.tracking_uri == f"sqlite:///{state_dir / 'mlflow.db'}"  # the embedded default
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", fake_llama_cpp())
    yield c
    mlflow.set_tracking_uri(None)


def _run(cfg, arts, flow="flow-1"):
    return register_pipeline(cfg, arts, RunInfo(config_hash="cafe" * 16, profile="tiny", flow_run_id=flow))


def test_tracking_runs_params_step_metrics_and_artifacts(cfg):
    arts = build_artifacts(ArtifactStore(cfg.artifact_root))
    out = _run(cfg, arts, flow="f-123")
    # where registration's time goes: connecting, the runs, each model
    assert list(out["seconds"]) == ["connect", "runs", *out["models"]]
    assert all(v >= 0 for v in out["seconds"].values())
    c = tracker_for(cfg).client
    parent = c.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == "f-123"
    assert (
        parent.data.tags["dagtune.config_hash"] == "cafe" * 16
        and parent.data.tags["dagtune.profile"] == "tiny"
    )
    commit, _ = git_commit()
    if commit:  # outside a git checkout (e.g. a docker build) there is no commit to record
        assert parent.data.tags["mlflow.source.git.commit"] == commit
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_node = {r.data.tags["dagtune.node"]: r for r in children}
    assert set(by_node) == set(arts)
    train = by_node["train_function_calling"]
    assert train.data.params["lora.r"] == str(cfg.train_function_calling.lora.r)
    assert train.data.metrics["train_seconds"] == 12.5
    assert [m.step for m in c.get_metric_history(train.info.run_id, "loss")] == [1, 2, 3]
    files = {f.path for f in c.list_artifacts(train.info.run_id)}
    assert {"manifest.json", "train_log.jsonl"} <= files and "adapter" not in files  # not a report
    # artifacts live under the state dir, not ./mlruns of the working directory
    assert train.info.artifact_uri.startswith((cfg.state_dir / "mlartifacts").as_uri())


def test_register_idempotent_alias_gate_promote_rollback_and_predict(cfg, capsys):
    from dagtune.cli import main

    store = ArtifactStore(cfg.artifact_root)
    arts = build_artifacts(store)
    first = _run(cfg, arts)
    tr = tracker_for(cfg)
    assert first["models"]["function_calling"] | {"gate_reasons": None, "gate": None} == {
        "name": "fc",
        "version": "1",
        "created": True,
        "digest": first["models"]["function_calling"]["digest"],
        "gate_passed": True,
        "gate_reasons": None,
        "gate": None,
        "champion": "1",
        "challenger": None,
    }
    assert first["models"]["classifier"]["champion"] == "1"

    # a second pipeline run over the same (cached) artifacts adds no version
    second = _run(cfg, build_artifacts(store), flow="flow-2")
    assert second["parent_run_id"] != first["parent_run_id"]
    assert [m["created"] for m in second["models"].values()] == [False, False]
    assert [len(reg.list_versions(tr, n)) for n in ("fc", "clf")] == [1, 1]

    v1 = reg.list_versions(tr, "fc")[0]
    t = v1.tags
    assert t["dagtune.artifact.gguf_q8_0.key"] == arts["convert_gguf_function_calling"].key
    assert len(t["dagtune.artifact.gguf_q8_0.sha256"]) == 64 and len(t["dagtune.dataset_digest"]) == 64
    # tags: lineage and headline numbers only; the full evaluation block is an artifact of the run
    assert t["eval.exact_match"] == "0.8" and not any(k.startswith("eval.by_") for k in t)
    full = json.loads(mlflow.artifacts.load_text(f"runs:/{v1.run_id}/eval_metrics/function_calling.json"))
    assert full["by_dialect"]["MSA"]["exact_match"] == 0.8
    assert len(t) < 40, sorted(t)
    assert t["dagtune.train_seconds"] == "12.5" and t["prefect.flow_run_id"] == "flow-1"
    assert t["dagtune.gate_passed"] == "true" and t["dagtune.promoted_by"] == "dagtune (auto)"

    # load by alias and predict: GGUF (fake llama_cpp, greedy) and classifier (stand-in loader)
    gguf = mlflow.pyfunc.load_model("models:/fc@champion")
    assert gguf.predict("w1 w2") == ["GGUFa:w1 w2"]
    assert gguf.predict([{"role": "user", "content": "hi"}]) == ["chat:hi"]
    llama = __import__("sys").modules["llama_cpp"]
    assert all(c[2]["temperature"] == 0.0 and c[2]["top_k"] == 1 for c in llama.calls if c[0] != "init")
    clf = mlflow.pyfunc.load_model("models:/clf@champion")
    pred = clf.predict(solutions("all good", "this is wrong"))
    assert list(pred["label"]) == ["correct", "flawed"] and list(pred["probability"]) == [0.1, 0.9]

    # new bytes + a dialect that drops too much: v2 is challenger, champion stays v1
    worse = _run(cfg, build_artifacts(store, variant="b", fc_dialects={"MSA": 0.96, "Gulf": 0.7}))
    fc = worse["models"]["function_calling"]
    assert (fc["version"], fc["created"], fc["gate_passed"], fc["champion"]) == ("2", True, False, "1")
    assert any("Gulf" in r for r in fc["gate_reasons"])
    assert str(reg.alias_version(tr, "fc", "challenger").version) == "2"
    # a better one passes and is promoted automatically
    better = _run(cfg, build_artifacts(store, variant="c", fc_dialects={"MSA": 0.96, "Gulf": 0.96}))
    assert better["models"]["function_calling"]["champion"] == "3"
    assert reg.alias_version(tr, "fc", "challenger") is None  # v3 won: no longer a challenger

    # people: promote by config key, roll back twice, never delete
    cli = ["promote", "--config", str(cfg.config_dir) + "/pipeline_config.yaml", "--profile", "tiny"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("USER", "alice")
        assert main([*cli, "function_calling", "--version", "2", "--reason", "Gulf fix verified"]) == 0
        assert str(reg.alias_version(tr, "fc", "champion").version) == "2"
        v2 = tr.client.get_model_version("fc", "2")
        assert (v2.tags["dagtune.promoted_by"], v2.tags["dagtune.promoted_reason"]) == (
            "alice",
            "Gulf fix verified",
        )
        assert main([*cli, "fc", "--rollback", "--reason", "regression in prod", "--json"]) == 0
        event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (event["version"], event["previous"], event["who"]) == ("3", "2", "alice")
        assert (
            tr.client.get_model_version("fc", "2").tags["dagtune.rolled_back_reason"] == "regression in prod"
        )
        assert main([*cli, "fc", "--rollback"]) == 0
        assert str(reg.alias_version(tr, "fc", "champion").version) == "1"
        assert main([*cli, "fc", "--rollback"]) == 1  # v1 was the first champion
        assert "nothing to roll back" in capsys.readouterr().err
        assert main([*cli, "fc", "--version", "9"]) == 1
    history = reg.champion_history(tr, "fc")
    assert [(e["action"], e["version"]) for e in history] == [
        ("promote", "1"),
        ("promote", "3"),
        ("promote", "2"),
        ("rollback", "3"),
        ("rollback", "1"),
    ]
    assert [str(v.version) for v in reg.list_versions(tr, "fc")] == ["1", "2", "3"]


def test_interrupted_registration_regates_on_rerun(cfg, monkeypatch):
    """Version created, then the process dies before the gate: the rerun gates it, once."""
    store = ArtifactStore(cfg.artifact_root)
    real = reg.gate_and_alias
    monkeypatch.setattr(reg, "gate_and_alias", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, build_artifacts(store))
    tr = tracker_for(cfg)
    # the first model (function_calling: config order) got its version, nothing else happened
    assert reg.alias_version(tr, "fc", "champion") is None and len(reg.list_versions(tr, "fc")) == 1
    monkeypatch.setattr(reg, "gate_and_alias", real)
    out = _run(cfg, build_artifacts(store))
    assert out["models"]["function_calling"] | {"digest": 0, "gate_reasons": 0, "gate": 0} == {
        "name": "fc", "version": "1", "created": False, "digest": 0,
        "gate_passed": True, "gate_reasons": 0, "gate": 0, "champion": "1", "challenger": None,
    }  # fmt: skip
    assert len(reg.list_versions(tr, "fc")) == 1


def test_child_run_without_parent_artifacts(cfg):
    tr = tracker_for(cfg)
    with parent_run(tr, "plain", run_name="p", tags={"a": "b"}) as pid:
        rid = child_run(tr, pid, "evaluate", metrics={"x": {"y": 1, "z": None, "s": "text"}})
    run = tr.client.get_run(rid)
    assert run.data.metrics == {"x.y": 1.0} and run.data.tags["mlflow.parentRunId"] == pid


def test_classifier_pyfunc_accepts_the_real_loader_shapes(tmp_path):
    """(model, tokenizer) from the loader and a (texts, 2) matrix from predict_proba, as
    dagtune.training.classifier returns them; more labels -> argmax."""
    from types import SimpleNamespace

    from registry_helpers import write_standin_classifier

    from dagtune.registry.models import ClassifierModel, label_probabilities

    write_standin_classifier(tmp_path / "clf")
    m = ClassifierModel()
    cfg = {"loader": "registry_helpers:load_standin_classifier_tuple", "threshold": 0.5}
    m.load_context(SimpleNamespace(model_config=cfg, artifacts={"classifier": str(tmp_path / "clf")}))
    out = m.predict(None, solutions("ok", "wrong"))
    assert list(out["label"]) == ["correct", "flawed"] and list(out["probability"]) == [0.1, 0.9]
    assert label_probabilities([[0.2, 0.5, 0.3]], 0.5) == ([0.5], [1])
