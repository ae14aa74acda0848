"""Operating the pipeline without running it: the typed run form, where a node's output goes, the run
report, the CLI's one-JSON-object promise and the status rows after a failure."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from dagtune.logs import node_output_to
from dagtune.report import headline, metric_rows, run_markdown
from dagtune.run_request import RunRequest
from dagtune.runner import _failure_status, add_dagtune_to_prefect_logs, cache_record_key, summarize

ROOT = Path(__file__).resolve().parent.parent


# -- the run form ---------------------------------------------------------------------------------
def test_misspelled_node_is_rejected_naming_the_parameter():
    with pytest.raises(ValidationError) as e:
        RunRequest(force=["evalute"])
    assert e.value.errors()[0]["loc"][:1] == ("force",)


def test_unknown_profile_is_rejected_naming_the_parameter():
    with pytest.raises(ValidationError, match="profile 'nope' is not defined"):
        RunRequest(profile="nope")


def test_flow_rejects_bad_parameters_before_running():
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import dagtune_pipeline

    with pytest.raises(ParameterTypeError, match=r"run\.force\.0"):
        dagtune_pipeline.validate_parameters({"run": {"force": ["evalute"]}})
    assert dagtune_pipeline.description.startswith("Retrain, evaluate")  # the deployment's description


def test_overrides_reach_the_config():
    req = RunRequest(
        profile="tiny",
        promote=False,
        data={"extractor": {"path": "rows.csv"}, "function_calling": {"hub_revision": "abc123"}},
    )
    ov = req.overrides()
    assert ov["register"] == {"auto_promote": False}
    assert ov["prepare_data"]["extractor"]["source"]["kind"] == "file"
    assert ov["prepare_data"]["function_calling"]["source"] == {"revision": "abc123"}
    cfg = RunRequest(profile="tiny", promote=False, data={"extractor": {"path": "rows.csv"}}).load()
    assert cfg.register.auto_promote is False
    assert cfg.prepare_data.extractor.source.path == "rows.csv"
    with pytest.raises(ValidationError, match="either path or hub_revision"):
        RunRequest(data={"extractor": {"path": "a", "hub_revision": "b"}})


# -- the Prefect cache never replays a node the run did not select ----------------------------------
def test_unselected_node_has_no_cache_record():
    cfg = RunRequest(profile="tiny").load()
    assert cache_record_key("prepare_data", cfg, {}, [], ["train_extractor"]) is None
    assert cache_record_key("prepare_data", cfg, {}, ["prepare_data"], []) is None
    assert cache_record_key("prepare_data", cfg, {}, [], ["prepare_data"]).startswith("prepare_data/")


def test_dagtune_logger_is_added_to_prefect_extra_loggers():
    env = {"PREFECT_LOGGING_EXTRA_LOGGERS": "foo"}
    add_dagtune_to_prefect_logs(env)
    add_dagtune_to_prefect_logs(env)
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "foo,dagtune"


# -- a node's thread's chatter goes to its file -----------------------------------------------------
@pytest.mark.parametrize("transformers_configured", [False, True])
def test_node_output_routes_only_the_nodes_thread(tmp_path, capsys, monkeypatch, transformers_configured):
    if transformers_configured:  # transformers' own root logger stops propagation once configured
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers.fake")
        monkeypatch.setattr(logging.getLogger("transformers"), "propagate", False)  # as it leaves it
    logging.getLogger("transformers.fake").setLevel(logging.INFO)
    # Only the routing under test: handlers that earlier in-process runs left on the root and `dagtune`
    # loggers (Prefect's console handler on a captured stream, ...) are out of this test's scope.
    root, dagtune_logger = logging.getLogger(), logging.getLogger("dagtune")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(dagtune_logger, "handlers", [])
    monkeypatch.setattr(dagtune_logger, "propagate", True)
    seen = threading.Event()

    def other_thread():
        print("from another thread")
        seen.set()

    with node_output_to(tmp_path / "node.log"):
        print("progress 1/2")
        sys.stderr.write("tqdm bar\n")
        logging.getLogger("transformers.fake").warning("library chatter")
        logging.getLogger("dagtune").warning("node ran")
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    text = (tmp_path / "node.log").read_text()
    assert "progress 1/2" in text and "tqdm bar" in text and "library chatter" in text
    assert "node ran" not in text and "from another thread" not in text
    assert seen.is_set() and "from another thread" in capsys.readouterr().out
    print("after")
    assert "after" not in (tmp_path / "node.log").read_text()


# -- the run report ---------------------------------------------------------------------------------
def _artifact(tmp: Path, node: str, metrics: dict, files: dict | None = None) -> str:
    d = tmp / node
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"metrics": metrics, "timings": {}}))
    for name, content in (files or {}).items():
        (d / name).write_text(json.dumps(content))
    return str(d)


def test_run_report_shows_nodes_eval_and_gate(tmp_path):
    ev = {"fc_tool_name_accuracy": 0.8, "fc_tool_name_accuracy_base": 0.1, "classifier_macro_f1": 0.7}
    registered = {
        "parent_run_id": "abc",
        "models": {
            "extractor": {
                "name": "dagtune-extractor",
                "version": "3",
                "gate_passed": False,
                "gate_reasons": ["equation_score 0.5 < champion 0.6"],
                "champion": "2",
            }
        },
    }
    results = [
        {
            "name": "evaluate",
            "status": "ran",
            "seconds": 3.0,
            "key": "k" * 64,
            "artifact": _artifact(tmp_path, "evaluate", ev),
        },
        {
            "name": "register",
            "status": "ran",
            "seconds": 1.0,
            "key": "r" * 64,
            "artifact": _artifact(tmp_path, "register", {}, {"registered.json": registered}),
        },
        {
            "name": "convert_gguf_extractor",
            "status": "skipped",
            "seconds": 0.0,
            "key": "g" * 64,
            "artifact": None,
        },
    ]
    md = run_markdown(results, "tiny", "http://user:secret@mlflow:5000")
    assert "| evaluate | ran | 3.0 |" in md and "| convert_gguf_extractor | skipped |" in md
    assert "| function_calling | tool_name_accuracy | 0.8000 | 0.1000 |" in md
    assert "| classifier | macro_f1 | 0.7000 | – |" in md
    assert "held" in md and "equation_score 0.5 < champion 0.6" in md and "v2" in md
    assert "http://***@mlflow:5000/#/models/dagtune-extractor/versions/3" in md and "secret" not in md
    rows = metric_rows(results)
    assert {"node": "evaluate", "metric": "fc_tool_name_accuracy", "value": 0.8} in rows


def test_headline_of_training_picks_the_loss():
    assert headline("train_extractor", {"train_loss_last": 1.234567, "base_model_path": "/x"}) == {
        "train_loss_last": 1.2346
    }


def test_headline_of_each_export_is_its_parity_top1():
    """Both export nodes take the convert_gguf section's headline (one section, two nodes)."""
    metrics = {"extractor": {"q8_0": {"parity": {"top1_agreement": 0.987654}}}}
    assert headline("convert_gguf_extractor", metrics) == {"extractor_q8_0_top1": 0.9877}


# -- status rows after a failure --------------------------------------------------------------------
def test_failure_rows_use_build_seconds_and_mark_forced_old_artifact_failed(tmp_path):
    started = time.time()
    new = tmp_path / "new"
    new.mkdir()
    (new / "manifest.json").write_text(json.dumps({"timings": {"finished": started + 5, "seconds": 4.5}}))
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"timings": {"finished": started - 100, "seconds": 9}}))
    assert _failure_status({"exists": True, "artifact": str(new)}, started, False, True) == ("ran", 4.5)
    assert _failure_status({"exists": True, "artifact": str(old)}, started, True, True) == ("failed", 0.0)
    assert _failure_status({"exists": True, "artifact": str(old)}, started, False, True) == ("cached", 0.0)
    assert _failure_status({"exists": False, "artifact": None}, started, False, False) == ("skipped", 0.0)
    assert _failure_status({"exists": False, "artifact": None}, started, False, True) == ("failed", 0.0)


def test_summarize_rows_mark_other_runs_cached_and_resolve_artifacts(tmp_path):
    ran = {"name": "a", "status": "ran", "seconds": 1.5, "wait_seconds": 0.25, "key": "k", "artifact": "a/k"}
    other = {"name": "b", "status": "ran", "seconds": 2.0, "key": "k", "artifact": "b/k", "flow_run_id": "x"}
    skipped = {"name": "c", "status": "skipped", "seconds": 0.0, "key": "k", "artifact": None}
    rows = summarize([{**ran, "flow_run_id": "this"}, other, skipped], "this", tmp_path)
    assert [(r["name"], r["status"], r["seconds"], r["wait_seconds"], r["artifact"]) for r in rows] == [
        ("a", "ran", 1.5, 0.25, str(tmp_path / "a/k")),
        ("b", "cached", 0.0, 0.0, str(tmp_path / "b/k")),
        ("c", "skipped", 0.0, 0.0, None),
    ]
    assert all(set(r) == {"name", "status", "seconds", "wait_seconds", "key", "artifact"} for r in rows)
    assert summarize([ran], None)[0]["artifact"] == "a/k"  # no root: left relative


# -- the CLI's --json promise -----------------------------------------------------------------------
def _cli_json(*args: str, env_extra: dict[str, str], tmp_path: Path) -> tuple[int, dict]:
    import os

    env = {**os.environ, "DAGTUNE_STATE_DIR": str(tmp_path / "state"), **env_extra}
    r = subprocess.run(
        [sys.executable, "-m", "dagtune.cli", "run", "--json", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return r.returncode, json.loads(r.stdout)  # exactly one JSON object, whatever happened


def test_json_on_config_error(tmp_path):
    rc, out = _cli_json("--profile", "nope", env_extra={}, tmp_path=tmp_path)
    assert rc == 2 and out["ok"] is False and "profile 'nope' not defined" in out["error"]


def test_json_when_prefect_is_unreachable(tmp_path):
    rc, out = _cli_json(
        "--only", "prepare_data", env_extra={"PREFECT_API_URL": "http://127.0.0.1:9/api"}, tmp_path=tmp_path
    )
    assert rc == 1 and out["ok"] is False and "127.0.0.1:9" in out["error"]


# -- the MLflow parent run --------------------------------------------------------------------------
def test_parent_run_params_config_artifact_and_training_view(tmp_path):
    from dagtune.registry.parent import (
        EXPERIMENT_KIND_TAG,
        TRAINING_KIND,
        open_experiment_on_training_runs,
        record_pipeline_run,
    )
    from dagtune.registry.tracking import TAG_CONFIG_HASH, TAG_GIT_COMMIT, TAG_PROFILE, connect, parent_run

    tracker = connect(f"sqlite:///{tmp_path / 'mlflow.db'}", state_dir=tmp_path)
    tags = {TAG_PROFILE: "tiny", TAG_CONFIG_HASH: "c" * 64, TAG_GIT_COMMIT: "abc123"}
    with parent_run(tracker, "exp", run_name="p", tags=tags) as run_id:
        record_pipeline_run(tracker, run_id, tags, {"register": {"experiment": "exp"}})
        exp_id = tracker.experiment_id("exp")
        open_experiment_on_training_runs(tracker, exp_id)
    run = tracker.client.get_run(run_id)
    assert run.data.params == {"profile": "tiny", "config_hash": "c" * 64, "git_commit": "abc123"}
    local = tracker.client.download_artifacts(run_id, "config/resolved_config.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == {"register": {"experiment": "exp"}}
    assert tracker.client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND


# -- the deployment spec ----------------------------------------------------------------------------
def test_deployment_spec_takes_cron_timezone_pool_and_the_cli_profile(tmp_path, monkeypatch):
    import yaml

    from dagtune.config import DEFAULT_CONFIG, load_config
    from dagtune.deployment import FLOW_ENTRYPOINT, REPO_ROOT, deployment_spec, worker_command, worker_env

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["deploy"].update(cron="30 3 * * 1-5", timezone="Europe/Berlin", work_pool="gpu-a", gpu_slots=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    cfg = load_config(path)  # no --profile: the config's default_profile, as `dagtune run`
    spec = deployment_spec(cfg, str(path))
    assert (spec["cron"], spec["timezone"], spec["work_pool"], spec["gpu_slots"]) == (
        "30 3 * * 1-5",
        "Europe/Berlin",
        "gpu-a",
        2,
    )
    assert spec["parameters"] == {"run": {"profile": raw["default_profile"], "config_path": str(path)}}
    RunRequest.model_validate(spec["parameters"]["run"])  # the deployment's defaults pass its own form
    assert spec["entrypoint"] == FLOW_ENTRYPOINT and spec["job_variables"]["working_dir"] == str(REPO_ROOT)
    env = spec["job_variables"]["env"]
    assert (
        env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "dagtune"
        and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    )
    assert worker_command(cfg, healthcheck=True)[-5:] == [
        "--pool",
        "gpu-a",
        "--type",
        "process",
        "--with-healthcheck",
    ]
    assert worker_command(cfg, name="gpu-host-1", limit=1)[-4:] == ["--name", "gpu-host-1", "--limit", "1"]
    assert worker_env({"PREFECT_LOGGING_EXTRA_LOGGERS": "x"})["PREFECT_LOGGING_EXTRA_LOGGERS"] == "x,dagtune"
