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
from registry_helpers import (
    build_artifacts,
    fake_llama_cpp,
    migrated_db,
    with_extractor_placeholders,
    write_config,
)

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


def test_better_than_base_by_noise_is_not_promoted_even_as_first_version():
    # 30 right against the base's 27, on rows that mostly disagree: the point estimate is up (+0.05)
    # but the interval straddles 0, as the classifier's [-0.136, +0.236] against its majority baseline
    # did when it was promoted on the point estimate
    result = decide(Evidence(scores(range(10, 40)), scores(range(27))), GATE)
    vs_base = result.details["vs_base"]
    assert vs_base["ci_low"] < 0 < vs_base["delta"] < vs_base["ci_high"]
    assert not result.passed
    assert "does not beat its base model" in result.reasons[0]
    assert "lower bound not above min_delta 0" in result.reasons[0] and "95% CI [" in result.reasons[0]


def test_base_check_applies_min_delta_to_the_lower_bound():
    # 30 vs 6 on nested rows: the lower bound (about 0.28) clears 0.25 but not 0.35
    ev = Evidence(scores(range(30)), scores(range(6)))
    assert decide(ev, reg.Gate.of(PromotionGate(min_delta=0.25))).passed
    held = decide(ev, reg.Gate.of(PromotionGate(min_delta=0.35)))
    assert not held.passed and "lower bound not above min_delta 0.35" in held.reasons[0]


def test_classifier_against_majority_baseline_uses_the_lower_bound():
    from dagtune.registry.gate import majority_baseline

    gold = np.array([i % 2 for i in range(100)], dtype=float)
    gate = reg.Gate.of(PromotionGate(metric="macro_f1"))

    def clf(wrong: int) -> TaskScores:
        pred = np.where(np.arange(100) < wrong, 1 - gold, gold)
        return TaskScores("macro_f1", tuple(f"c{i}" for i in range(100)), np.stack([gold, pred], 1))

    noisy, clear = clf(62), clf(30)  # macro-F1 0.38 and 0.70 against the baseline's 0.33
    held = decide(Evidence(noisy, majority_baseline(noisy), base_kind="majority-class baseline"), gate)
    assert held.details["vs_base"]["ci_low"] < 0 < held.details["vs_base"]["delta"]
    assert not held.passed and "does not beat its majority-class baseline" in held.reasons[0]
    passed = decide(Evidence(clear, majority_baseline(clear), base_kind="majority-class baseline"), gate)
    assert passed.passed and passed.details["vs_base"]["ci_low"] > 0, passed.reasons


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
    # register loads models, so it runs in a child process by default (runtime.isolation): the fake
    # llama_cpp below lives in this process only, so the node runs here (thread isolation)
    c = load_config(
        write_config(tmp_path), "tiny", overrides={"runtime": {"isolation": "thread", "nodes_per_device": 1}}
    )
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", fake_llama_cpp())
    yield c
    mlflow.set_tracking_uri(None)


def register(cfg, arts):
    """The register node as the pipeline runs it (the extractor, not registered by this config, as
    placeholder artifacts)."""
    store = ArtifactStore(cfg.artifact_root)
    art, _ = run_node("register", cfg, with_extractor_placeholders(store, arts), force=True)
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


def test_register_node_holds_a_classifier_not_clearly_better_than_its_baseline(cfg):
    """Through the real register node: a first classifier version whose macro-F1 is above the
    majority-class baseline's only by noise (interval straddling 0) is registered, not promoted, and
    the interval is in MLflow, registered.json and the CLI lines; a clearly better one is promoted."""
    store = ArtifactStore(cfg.artifact_root)
    tr = tracker_for(cfg)

    art, out = register(cfg, build_artifacts(store, variant="q", clf_f1=0.38))
    clf = out["classifier"]
    assert (clf["version"], clf["created"], clf["gate_passed"], clf["champion"]) == ("1", True, False, None)
    vs_base = clf["gate"]["vs_base"]
    assert vs_base["ci_low"] < 0 < vs_base["delta"] < vs_base["ci_high"], vs_base
    v1 = tr.client.get_model_version("clf", "1")
    assert v1.tags["dagtune.gate_passed"] == "false"
    assert json.loads(v1.tags["dagtune.gate"])["vs_base"]["ci_low"] == pytest.approx(vs_base["ci_low"])
    assert "does not beat its majority-class baseline" in v1.description
    assert "lower bound not above min_delta 0" in v1.description
    assert reg.alias_version(tr, "clf", reg.CHAMPION) is None
    text = "\n".join(registry_lines(registry_block(art.path)))
    assert "clf v1 (new version): gate failed; champion vNone, challenger v1" in text
    assert "95% CI [" in text and "lower bound not above min_delta 0" in text

    art, out = register(cfg, build_artifacts(store, variant="r", clf_f1=0.7))
    clf = out["classifier"]
    assert (clf["version"], clf["gate_passed"], clf["champion"]) == ("2", True, "2"), clf["gate_reasons"]
    assert clf["gate"]["vs_base"]["ci_low"] > 0
    assert "lower bound above min_delta 0" in clf["gate_reasons"][0]


def test_champion_classifier_is_loaded_on_the_runs_device(tmp_path):
    """The default loader's own default device is the CPU: re-scoring a real-size champion there took
    minutes of the nightly run (the served pyfunc loads through the same function, device "auto"). A
    loader that takes a device gets the run's; one that does not still loads (custom loaders keep their
    one-argument contract)."""
    from dagtune.registry.models import load_on_device

    calls = []

    def with_device(path, device="cpu"):
        calls.append((path, device))
        return "model"

    def path_only(path):
        calls.append((path, None))
        return "model"

    assert load_on_device(with_device, tmp_path, "cuda") == "model"
    assert load_on_device(path_only, tmp_path, "cuda") == "model"
    assert calls == [(str(tmp_path), "cuda"), (str(tmp_path), None)]
