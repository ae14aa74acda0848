"""The operations stack for real, natively (no Docker engine here): Postgres, the Prefect server and the
MLflow server on it, `dagtune deploy`, a process worker on the pool. A run triggered through the Prefect
API is completed by the worker and its versions are visible in MLflow; then a real browser (Debian's
Chromium through Playwright) fills the typed run form in the Prefect UI and checks the run's report
artifact; finally the schedule outlives the worker. One stack for the whole module (CI time)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.stack import (
    Stack,
    deploy_and_start_worker,
    free_port,
    pg_bin,
    start_postgres,
    start_servers,
    stop_postgres,
)
from tests.test_flow import fast_config

pytestmark = [pytest.mark.slow, pytest.mark.stack]
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS_OUT = ROOT / ".state" / "test-artifacts"  # screenshots kept after the run (CI uploads them)


def _require_postgres() -> None:
    try:
        pg_bin("initdb")
    except FileNotFoundError as e:
        pytest.fail(str(e))  # .ci/run installs it: a missing server is a broken setup, not a skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory, built_pipeline):
    _require_postgres()
    root = tmp_path_factory.mktemp("stack")
    # The artifacts tests/test_flow.py built: the worker reuses every node but register, whose key
    # includes the tracking server (CI time; the run is still the worker's, through the server's cache).
    state, _ = built_pipeline
    env = {
        **os.environ,
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
        "PREFECT_HOME": str(root / "prefect-client"),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "DAGTUNE_STATE_DIR": str(state),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("DAGTUNE_ARTIFACT_ROOT", None)
    s = Stack(
        root=root,
        env=env,
        config=fast_config(root),
        prefect_url=env["PREFECT_API_URL"].removesuffix("/api"),
        mlflow_url=env["MLFLOW_TRACKING_URI"],
    )
    try:
        start_servers(s, start_postgres(s))
        deploy_and_start_worker(s)
        yield s
    finally:
        for name in list(s.procs):
            s.stop(name)
        stop_postgres(s)


def _trigger(stack: Stack, run: dict) -> str:
    fr = stack.api(
        "POST", f"/deployments/{stack.deployment_id}/create_flow_run", json={"parameters": {"run": run}}
    )
    return fr["id"]


def test_run_triggered_through_the_api_is_completed_by_the_worker(stack):
    flow_run_id = _trigger(stack, {"config_path": str(stack.config)})
    fr = stack.wait_flow_run(flow_run_id, timeout=900)
    assert fr["state_type"] == "COMPLETED", stack.worker_log()
    r = stack.cli("models", "--config", str(stack.config), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    models = json.loads(r.stdout)["models"]
    assert len(models) == 3 and all(m["versions"] for m in models), models
    # The gate decided every version, and `champion` is exactly where it passed (tiny fine-tunes of a
    # few steps may not beat their base: then nothing is promoted, which is the gate working).
    for m in models:
        for v in m["versions"]:
            assert "dagtune.gate_passed" in v["tags"], v
            assert ("champion" in v["aliases"]) == (v["tags"]["dagtune.gate_passed"] in (True, "true")), v
    logs = stack.api(
        "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    )
    assert any(entry["name"] == "dagtune" and "node register" in entry["message"] for entry in logs)


def test_bad_form_values_fail_before_anything_runs(stack):
    import httpx

    with pytest.raises(httpx.HTTPStatusError) as e:
        _trigger(stack, {"force": ["evalute"]})
    assert e.value.response.status_code == 409 and "force" in e.value.response.text


def _browser(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail("Debian's chromium is not installed: apt-get install chromium (see .ci/run)")
    pw = sync_playwright().start()
    ctx = pw.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"),  # a fresh user-data dir
        executable_path=str(CHROMIUM),
        headless=True,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
        viewport={"width": 1400, "height": 1000},
    )
    return pw, ctx


def test_ui_run_form_submits_and_the_report_shows_the_node_table(stack, tmp_path):
    from tests.stack_ui import open_custom_run_form, read_report_artifact, submit_form

    pw, ctx = _browser(tmp_path)
    page = ctx.new_page()
    shot = ARTIFACTS_OUT / "prefect-ui-run-report.png"
    try:
        open_custom_run_form(page, stack.prefect_url)
        flow_run_id = submit_form(
            page, profile="tiny", force="prepare_data", promote=False, config=str(stack.config)
        )
        fr = stack.wait_flow_run(flow_run_id, timeout=600)
        assert fr["state_type"] == "COMPLETED", stack.worker_log()
        assert fr["parameters"]["run"]["force"] == ["prepare_data"]
        assert fr["parameters"]["run"]["promote"] is False
        text = read_report_artifact(page, stack.prefect_url, flow_run_id)
        assert "Nodes" in text and "prepare_data" in text and "register" in text
    finally:
        ARTIFACTS_OUT.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        ctx.close()
        pw.stop()
    assert shot.stat().st_size > 10_000


def test_schedule_stays_active_when_the_worker_stops(stack):
    stack.stop("worker")
    d = stack.api("GET", f"/deployments/{stack.deployment_id}")
    assert d["paused"] is False
    assert d["schedules"] and all(s["active"] for s in d["schedules"])
    assert d["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert d["description"].startswith("Retrain, evaluate")
