"""Two machines sharing one artifact store, played on this one (docs/scaling.md): a Prefect server (on
Postgres, as tests/test_stack.py), two process workers on one pool, each with its own state dir (its
own Prefect result records and compile cache, as on two hosts) and the same DAGTUNE_ARTIFACT_ROOT (the
mount every worker shares). Two flow runs are created together through the API; each worker takes one
(`--limit 1`). Every selected node is computed exactly once across both runs: the other run waits on
the node's key lock in the shared root and reuses the artifact. `--only` keeps the runs to prepare_data
and the cheapest training node (CI time); the lock path is the same for every node."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests.stack import Stack, free_port, pg_bin, start_postgres, stop_postgres, wait_http
from tests.test_flow import fast_config

pytestmark = [pytest.mark.slow, pytest.mark.stack]
ONLY = ["prepare_data", "train_classifier"]
POOL = "dagtune-shared-root"
STATUS_LINE = re.compile(r"node (\w+): (ran|cached) in ")


def _start_prefect_server(stack: Stack) -> None:
    # Postgres, not SQLite: two workers and two flow runs writing at once on a busy 2-core host made
    # SQLite answer "database is locked" until API calls timed out.
    pg = start_postgres(stack)
    env = {
        **stack.env,
        "PREFECT_HOME": str(stack.root / "prefect-server"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@{pg}/prefect",
    }
    env.pop("PREFECT_API_URL")
    port = stack.prefect_url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port]
    p = stack.start("prefect", cmd, env)
    wait_http(f"{stack.prefect_url}/api/health", 180, p, stack.root / "prefect.log")


def _start_worker(stack: Stack, i: int, shared: Path) -> None:
    env = {
        **stack.env,
        "DAGTUNE_STATE_DIR": str(stack.root / f"machine{i}"),  # per host: records, caches
        "DAGTUNE_ARTIFACT_ROOT": str(shared),  # the shared mount
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # poll often: both runs start together (test time)
    }
    cmd = [sys.executable, "-m", "dagtune.cli", "worker", "--config", str(stack.config)]
    stack.start(f"worker{i}", [*cmd, "--name", f"machine{i}", "--limit", "1"], env)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    pg_bin("initdb")  # .ci/run installs Postgres: missing, the setup is broken (FileNotFoundError)
    root = tmp_path_factory.mktemp("shared-root")
    env = {
        **os.environ,
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
        "PREFECT_HOME": str(root / "prefect-client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    # Nothing host-specific in the deployment's job variables: each worker's environment decides.
    for var in ("DAGTUNE_STATE_DIR", "DAGTUNE_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    # One GPU per "machine": the pool-wide GPU limit counts both. Own pool and deployment name, so the
    # test could share a Prefect server with tests/test_stack.py's deployment.
    config = fast_config(root, {"deploy": {"name": POOL, "work_pool": POOL, "gpu_slots": 2}})
    s = Stack(root, env, config, env["PREFECT_API_URL"].removesuffix("/api"), mlflow_url="")
    shared = root / "shared-artifacts"
    try:
        _start_prefect_server(s)
        for i in (1, 2):  # booting while `dagtune deploy` runs; the pool is whoever's first
            _start_worker(s, i, shared)
        r = s.cli("deploy", "--config", str(config), "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        s.deployment_id = json.loads(r.stdout)["deployment_id"]
        yield s, shared
    finally:
        s.stop_together([n for n in s.procs if n != "prefect"])  # the workers before their server
        s.stop("prefect")
        stop_postgres(s)


def _node_lines(stack: Stack, flow_run_id: str) -> list[str]:
    logs = stack.api(
        "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    )
    return [e["message"] for e in logs if e["name"] == "dagtune"]


def _statuses(lines: list[str]) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in map(STATUS_LINE.search, lines) if m}


def test_two_workers_on_one_artifact_root_compute_each_node_once(two_workers):
    stack, shared = two_workers
    run = {"config_path": str(stack.config), "only": ONLY}
    ids = [
        stack.api(
            "POST", f"/deployments/{stack.deployment_id}/create_flow_run", json={"parameters": {"run": run}}
        )["id"]
        for _ in range(2)
    ]
    runs = [stack.wait_flow_run(i, timeout=300) for i in ids]
    logs = {n: (stack.root / f"{n}.log").read_text() for n in ("worker1", "worker2")}
    assert [r["state_type"] for r in runs] == ["COMPLETED"] * 2, {n: t[-3000:] for n, t in logs.items()}

    # one run per worker, and the two runs overlapped (they raced for the same keys)
    # (both workers may claim the same run: the server lets one through and aborts the other)
    taken = [
        sorted(r["name"] for r in runs if f"'{r['name']}' submitted to infra" in t) for t in logs.values()
    ]
    assert sorted(taken) == sorted([r["name"]] for r in runs), logs
    starts, ends = [r["start_time"] for r in runs], [r["end_time"] for r in runs]
    assert max(starts) < min(ends), (starts, ends)

    lines = {i: _node_lines(stack, i) for i in ids}
    statuses = {i: _statuses(lines[i]) for i in ids}
    for node in ONLY:
        computed = sum(f"node {node}: computing" in m for run_lines in lines.values() for m in run_lines)
        assert computed == 1, (node, lines)
        assert sorted(s[node] for s in statuses.values()) == ["cached", "ran"], (node, statuses)

    # the artifacts are the shared root's, one per node; the machines' own state dirs hold none
    for node in ONLY:
        built = [d for d in (shared / node).iterdir() if (d / "manifest.json").is_file()]
        assert len(built) == 1, (node, built)
    assert not any((stack.root / f"machine{i}" / "artifacts").exists() for i in (1, 2))
    assert not list(shared.glob(".tmp/*")), "a build dir was left behind"
