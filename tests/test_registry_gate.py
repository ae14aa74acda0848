"""The promotion gate: paired bootstrap over per-example scores, the base rule, the champion re-scored
on the same rows, and its outcome in MLflow, registered.json and the CLI's registry block.

Pure cases use per-example score arrays built here; the MLflow cases run the real ``register`` node
(``run_node``) against a real SQLite store, over artifacts built through the real store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from registry_helpers import build_artifacts, fake_llama_cpp, migrated_db, write_config

from dagtune.config import PromotionGate, load_config
from dagtune.pipeline import run_node
from dagtune.registry import registry as reg
from dagtune.registry.gate import Evidence, TaskScores, decide, label_metric, paired_bootstrap
from dagtune.registry.node import registry_block, registry_lines, tracker_for
from dagtune.registry.tracking import git_commit
from dagtune.store import ArtifactStore

ROOT = Path(__file__).resolve().parent.parent

GATE = reg.Gate.of(PromotionGate(metric="exact_match", min_delta=0.0))
IDS = tuple(f"r{i}" for i in range(60))


def scores(correct: list[int] | range, n: int = 60) -> TaskScores:
    v = np.zeros(n)
    v[list(correct)] = 1.0
    return TaskScores("exact_match", IDS[:n], v)


# ----------------------------------------------------------------------------------------------
# pure
# ----------------------------------------------------------------------------------------------
def test_bootstrap_is_deterministic_and_paired():
    a, b = scores(range(40)), scores(range(30))
    first, again = paired_bootstrap(a, b), paired_bootstrap(a, b)
    assert first == again and first["resamples"] == 2000
    assert first["delta"] == pytest.approx(10 / 60)
    assert 0 < first["ci_low"] < first["delta"] < first["ci_high"]
    # paired: the reference in another row order gives the same interval
    shuffled = TaskScores("exact_match", IDS[::-1], b.values[::-1])
    assert paired_bootstrap(a, shuffled) == first


def test_label_metric_matches_sklearn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert label_metric(y, p, "macro_f1") == pytest.approx(f1_score(y, p, average="macro"))
    assert label_metric(y, p, "accuracy") == pytest.approx(accuracy_score(y, p))
    assert label_metric(y, p, "balanced_accuracy") == pytest.approx(balanced_accuracy_score(y, p))
    assert label_metric(y, p, "f1_flawed") == pytest.approx(f1_score(y, p))


def test_worse_than_base_is_not_promoted_even_as_first_version():
    result = decide(Evidence(scores([]), scores(range(6))), GATE)  # 0.0 vs base 0.1
    assert not result.passed
    assert "does not beat its base model" in result.reasons[0] and result.reasons[1] == "no champion yet"


def test_better_than_base_first_version_passes():
    result = decide(Evidence(scores(range(30)), scores(range(6))), GATE)
    assert result.passed, result.reasons
    assert result.details["vs_base"]["delta"] == pytest.approx(0.4)


def test_better_than_champion_by_noise_is_not_promoted():
    # one example of difference out of 60: the point estimate is up, the interval includes 0
    champion = scores(range(30))
    result = decide(Evidence(scores(range(31)), scores([]), champion_version="1", champion=champion), GATE)
    assert not result.passed
    assert result.details["vs_champion"]["delta"] > 0 >= result.details["vs_champion"]["ci_low"]
    assert "lower bound not above min_delta 0" in result.reasons[1]


def test_clearly_better_than_champion_is_promoted():
    champion = scores(range(20))
    result = decide(Evidence(scores(range(40)), scores([]), champion_version="1", champion=champion), GATE)
    assert result.passed, result.reasons
    assert result.details["vs_champion"]["ci_low"] > 0


def test_min_delta_applies_to_the_lower_bound():
    champion = scores(range(20))
    strict = reg.Gate.of(PromotionGate(min_delta=0.25))
    result = decide(Evidence(scores(range(40)), scores([]), champion_version="1", champion=champion), strict)
    assert not result.passed  # +0.33 on the point estimate, but its lower bound (0.22) is under 0.25


def test_champion_that_cannot_be_rescored_is_not_auto_promoted():
    ev = Evidence(scores(range(59)), scores([]), champion_version="4", champion_source="gone")
    result = decide(ev, GATE)
    assert not result.passed
    assert "champion v4 could not be re-scored" in result.reasons[1] and "(gone)" in result.reasons[1]


# ----------------------------------------------------------------------------------------------
# through the real register node and a real MLflow SQLite store
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def cfg(state_dir, tmp_path, tmp_path_factory, monkeypatch):
    migrated_db(state_dir / "mlflow.db", tmp_path_factory.getbasetemp())
    c = load_config(write_config(tmp_path), "tiny")
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", fake_llama_cpp())
    yield c
    mlflow.set_tracking_uri(None)


def register(cfg, arts):
    """The register node as the pipeline runs it; its upstream needs every node (train_extractor is
    not registered by this config: a placeholder artifact)."""
    store = ArtifactStore(cfg.artifact_root)
    ex, _ = store.build("train_extractor", {"node": "train_extractor"}, lambda out, s: {})
    upstream = {**arts, "train_extractor": ex}
    art, _ = run_node("register", cfg, upstream, force=True)
    return art, json.loads((art.dir / "registered.json").read_text())["models"]


def test_register_node_gate_cases_visible_in_mlflow_json_and_cli(cfg):
    store = ArtifactStore(cfg.artifact_root)
    tr = tracker_for(cfg)

    # 1. a first version worse than its base: registered, never promoted
    art, out = register(cfg, build_artifacts(store, variant="w", fc_exact=0.1, fc_base=0.3))
    fc = out["function_calling"]
    assert (fc["version"], fc["created"], fc["gate_passed"], fc["champion"]) == ("1", True, False, None)
    v1 = tr.client.get_model_version("fc", "1")
    assert v1.tags["dagtune.gate_passed"] == "false" and "does not beat its base" in v1.description
    assert json.loads(v1.tags["dagtune.gate"])["vs_base"]["delta"] == pytest.approx(-0.2)
    # lineage: the commit of the code that ran, although the config file lives outside the checkout
    commit, _ = git_commit(ROOT)
    parent = json.loads((art.dir / "registered.json").read_text())["parent_run_id"]
    assert tr.client.get_run(parent).data.tags.get("mlflow.source.git.commit") == commit
    block = registry_block(art.path)
    assert (
        block["function_calling"]["gate_passed"] is False and block["function_calling"]["challenger"] == "1"
    )
    text = "\n".join(registry_lines(block))
    assert "fc v1 (new version): gate failed; champion vNone, challenger v1" in text
    assert "does not beat its base model" in text

    # 2. better than its base, no champion yet: promoted
    art, out = register(cfg, build_artifacts(store, variant="a"))
    assert (out["function_calling"]["version"], out["function_calling"]["champion"]) == ("2", "2")

    # 3. better than the champion by noise (one more correct example of 100): not promoted
    noisy = {"MSA": 0.82, "Gulf": 0.8}
    art, out = register(cfg, build_artifacts(store, variant="n", fc_dialects=noisy))
    fc = out["function_calling"]
    assert (fc["version"], fc["gate_passed"], fc["champion"]) == ("3", False, "2")
    assert fc["gate"]["vs_champion"]["delta"] == pytest.approx(0.01)
    assert "same rows, config and code" in fc["gate"]["champion_source"]  # v2's own predictions

    # 4. clearly better: promoted
    art, out = register(cfg, build_artifacts(store, variant="c", fc_exact=0.96))
    fc = out["function_calling"]
    assert (fc["version"], fc["gate_passed"], fc["champion"]) == ("4", True, "4")
    assert tr.client.get_model_version("fc", "4").tags["dagtune.promoted_by"] == "dagtune (auto)"

    # 5. the champion's artifacts are gone: the gate says so and does not promote
    shutil.rmtree(store.path("train_function_calling", fc["gate"] and champion_train_key(tr, "4")))
    art, out = register(cfg, build_artifacts(store, variant="d", fc_exact=0.99))
    fc = out["function_calling"]
    assert (fc["version"], fc["gate_passed"], fc["champion"]) == ("5", False, "4")
    assert any("could not be re-scored" in r and "not in the store" in r for r in fc["gate_reasons"])
    assert "not promoted automatically" in tr.client.get_model_version("fc", "5").description

    # an unchanged rerun registers nothing new and keeps the recorded outcome
    art, again = register(cfg, build_artifacts(store, variant="d", fc_exact=0.99))
    assert again["function_calling"]["created"] is False
    assert again["function_calling"]["gate_reasons"] == fc["gate_reasons"]
    assert [str(v.version) for v in reg.list_versions(tr, "fc")] == ["1", "2", "3", "4", "5"]


def champion_train_key(tr, version: str) -> str:
    tags = json.loads(tr.client.get_model_version("fc", version).tags["dagtune.artifacts"])
    return tags["adapter"]["key"]


def test_champion_is_rescored_under_this_runs_evaluation_config(cfg):
    """The stored metrics of the champion were computed under another evaluate config (the tiny
    profile's 64-example subsample, Arabic normalisation on): the gate re-runs the classifier (through
    the registered loader) on this run's test rows (all 100) instead."""
    store = ArtifactStore(cfg.artifact_root)
    register(cfg, build_artifacts(store, variant="a", clf_f1=0.7))
    arts = build_artifacts(
        store, variant="b", clf_f1=0.8, evaluate_config={"max_examples": None, "arabic_normalization": False}
    )
    _, out = register(cfg, arts)
    clf = out["classifier"]
    assert clf["gate"]["champion_source"].startswith("re-scored from train_classifier/"), clf
    # the stand-in classifier is right on every row of the re-scored test split: the challenger's 0.8
    # is not better than the champion's re-scored 1.0, whatever the champion's stored 0.7 said
    assert clf["gate"]["vs_champion"]["reference"] == pytest.approx(1.0), clf["gate_reasons"]
    assert (clf["gate_passed"], clf["champion"]) == (False, "1")
