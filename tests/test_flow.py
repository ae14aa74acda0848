"""The real Prefect flow through the CLI (Prefect's local ephemeral server, real artifact store):
first run builds, second run is all cached and writes nothing, a changed section re-runs that node
and its downstream only, a SIGKILL mid-write leaves no manifest, and two runs started together
compute each key once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dagtune.config import DEFAULT_CONFIG
from dagtune.pipeline import NODE_ORDER
from tests.test_pipeline_plan import TWEAKS, descendants

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _env(state: Path, prefect_home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "DAGTUNE_STATE_DIR": str(state), "PYTHONUNBUFFERED": "1"}
    env.pop("DAGTUNE_ARTIFACT_ROOT", None)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(prefect_home or state / "prefect")
    return env


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dagtune.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


# The tiny profile, made smaller still: these tests check orchestration, not learning.
FAST = {
    "prepare_data": {
        "function_calling": {"source": {"num_examples": 60}},
        "extractor": {"source": {"num_examples": 60}},
        "classifier": {"source": {"num_examples": 60}},
    },
    **{
        n: {"optim": {"max_steps": 2, "batch_size": 4}, "checkpoint_every": 1000, "log_every": 1}
        for n in ("train_function_calling", "train_extractor", "train_classifier")
    },
    "evaluate": {"max_examples": 8, "max_new_tokens": 16},
    # Two training steps leave near-flat logits, where Q8_0 rounding flips top-1 by chance: parity
    # itself is tested in test_gguf.py and on the fully trained tiny pipeline (test_evaluate_e2e.py),
    # the embedded-template check in test_gguf_template.py (its greedy comparison flips alike here).
    "convert_gguf": {
        "parity_prompts": 2,
        "max_new_tokens": 4,
        "min_top1_agreement": 0.0,
        "min_template_greedy_match": 0.0,
    },
}


def fast_config(tmp: Path, tweak: dict | None = None) -> Path:
    from dagtune.config import deep_merge

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["profiles"]["tiny"] = deep_merge(deep_merge(raw["profiles"]["tiny"], FAST), tweak or {})
    p = tmp / f"fast-{len(list(tmp.glob('fast-*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return p


def _run_json(state: Path, *extra: str, prefect_home: Path | None = None) -> dict:
    if "--config" not in extra:
        extra = (*extra, "--config", str(fast_config(state.parent)))
    r = _cli("run", "--json", *extra, env=_env(state, prefect_home))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])  # the JSON's error, then the log
    return json.loads(r.stdout)  # exactly one JSON object on stdout


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def built(built_pipeline):
    return built_pipeline  # conftest.py: built once per session, reused by tests/test_stack.py


def test_first_run_builds_every_node(built):
    state, first = built
    assert first["ok"] and [n["name"] for n in first["nodes"]] == NODE_ORDER
    for n in first["nodes"]:
        assert n["status"] == "ran", n
        assert Path(n["artifact"], "manifest.json").is_file()
        assert set(n) == {"name", "status", "seconds", "wait_seconds", "key", "artifact"}
        assert n["seconds"] > 0


def _prefect_db(state: Path, sql: str, *args) -> list[tuple]:
    import sqlite3

    con = sqlite3.connect(state / "prefect" / "prefect.db")
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def test_flow_run_logs_show_dagtune_and_no_library_chatter(built):
    state, first = built
    logs = _prefect_db(state, "select name, message from log where flow_run_id = ?", first["flow_run_id"])
    dagtune = [m for n, m in logs if n.startswith("dagtune")]
    for name in NODE_ORDER:
        assert any(f"node {name}: ran in" in m for m in dagtune), name
    assert any('"version"' in m and "register" in m for m in dagtune)  # versions and gate decision
    assert not [m for _, m in logs if "LOAD_CONST" in m or "llama_model_loader" in m]
    assert len(logs) < 200, len(logs)
    for n in first["nodes"]:  # the chatter is kept with the artifact instead
        assert Path(n["artifact"], "node.log").is_file()


def test_run_publishes_report_and_metrics_artifacts(built):
    state, first = built
    rows = _prefect_db(
        state, "select key, type, data from artifact where flow_run_id = ?", first["flow_run_id"]
    )
    by_key = {k: (t, json.loads(d)) for k, t, d in rows}
    kind, md = by_key["dagtune-run-report"]
    assert kind == "markdown"
    for name in NODE_ORDER:
        assert f"| {name} | ran |" in md
    assert "| function_calling | tool_name_accuracy |" in md and "## Registry and promotion gate" in md
    kind, table = by_key["dagtune-headline-metrics"]
    table = json.loads(table) if isinstance(table, str) else table
    assert kind == "table" and {r["node"] for r in table} >= {"prepare_data", "evaluate"}


def test_only_one_node_on_new_state_succeeds_and_skips_the_rest(tmp_path):
    out = _run_json(tmp_path / "state", "--only", NODE_ORDER[0])
    assert out["ok"]
    assert [n["status"] for n in out["nodes"]] == ["ran"] + ["skipped"] * (len(NODE_ORDER) - 1)


def test_first_run_reports_the_registry_gate(built):
    """--json carries a registry block: every model's version, gate outcome with reasons, aliases.
    Two training steps do not beat the bases: each version is registered, none promoted."""
    _, first = built
    reg = first["registry"]
    assert set(reg) == {"function_calling", "extractor", "classifier"}
    for model in reg.values():
        assert model["version"] == "1" and model["created"] is True
        assert model["gate_reasons"] and model["gate_passed"] is (model["champion"] == "1")


def test_second_run_is_cached_and_writes_nothing(built):
    state, first = built
    before = _snapshot(state / "artifacts")
    second = _run_json(state)
    assert [n["status"] for n in second["nodes"]] == ["cached"] * len(NODE_ORDER)
    assert [n["key"] for n in second["nodes"]] == [n["key"] for n in first["nodes"]]
    assert _snapshot(state / "artifacts") == before


def test_status_reports_every_node_built(built):
    state, _ = built
    r = _cli("status", "--json", "--config", str(fast_config(state.parent)), env=_env(state))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["nodes"]
    assert all(row["exists"] and row["size_bytes"] > 0 for row in rows)


def test_changed_section_reruns_node_and_downstream_only(built, tmp_path):
    state, first = built
    node = "train_classifier"  # a leaf: nothing else may re-run
    out = _run_json(state, "--config", str(fast_config(tmp_path, {node: TWEAKS[node]})))
    ran = {n["name"] for n in out["nodes"] if n["status"] == "ran"}
    assert ran == descendants(node)


def test_force_recomputes_one_node(built):
    state, _ = built
    out = _run_json(state, "--force", NODE_ORDER[0], "--only", NODE_ORDER[0])
    assert [(n["name"], n["status"]) for n in out["nodes"]][0] == (NODE_ORDER[0], "ran")


def test_corrupt_merged_weights_are_not_served_through_prefects_cache(built):
    """A flipped byte in a cached merged model (mtime kept) and a deleted file: the next run moves each
    damaged artifact aside and recomputes exactly that node; nothing downstream consumed it."""
    from tests.test_reliability import _flip

    state, first = built
    arts = {n["name"]: Path(n["artifact"]) for n in first["nodes"]}
    weights = arts["train_extractor"] / "merged" / "model.safetensors"
    _flip(weights, offset=weights.stat().st_size // 2)
    (arts["prepare_data"] / "stats.json").unlink()
    out = _run_json(state)
    ran = {n["name"] for n in out["nodes"] if n["status"] == "ran"}
    assert ran == {"prepare_data", "train_extractor"}, out
    assert [n["key"] for n in out["nodes"]] == [n["key"] for n in first["nodes"]]
    assert (arts["prepare_data"] / "stats.json").is_file()
    from dagtune.store import artifact_problem

    assert artifact_problem(weights.parent.parent) is None


def test_state_dir_copied_then_original_moved_runs_from_the_copy(built, tmp_path):
    """Prefect's cache records hold artifact paths relative to the artifact root: the copy is all
    cached and reads its own artifacts, with the original gone."""
    import shutil

    state, first = built
    copy = tmp_path / "copied-state"
    shutil.copytree(state, copy, symlinks=True)
    moved = state.with_name(state.name + "-moved")
    state.rename(moved)
    try:
        out = _run_json(copy, "--config", str(fast_config(moved.parent)))
    finally:
        recreated = sorted(str(p.relative_to(state)) for p in state.rglob("*")) if state.exists() else None
        if recreated is not None:
            shutil.rmtree(state)
        moved.rename(state)
    assert recreated is None, f"the run on the copy wrote into the original location: {recreated[:5]}"
    assert [n["status"] for n in out["nodes"]] == ["cached"] * len(NODE_ORDER)
    assert all(Path(n["artifact"]).is_relative_to(copy / "artifacts") for n in out["nodes"])
    records = list((copy / "prefect-results").glob("*/*/prefect-result"))
    assert records
    # After the whole module, the shared state also holds records of keys this run does not use
    # (test_changed_section_... wrote them): the run drops those that name the original location too.
    stale = [str(r) for r in records if json.dumps(str(state))[1:-1] in r.read_text()]
    assert not stale, f"a Prefect record in the copy still names the original state dir: {stale[:2]}"
    assert not list((copy / "artifacts").glob("*/*/prefect-result"))  # the store holds artifacts only


def test_sigkill_mid_write_then_rerun(tmp_path):
    state = tmp_path / "state"
    env = _env(state)
    config = str(fast_config(tmp_path))  # the rerun recomputes the very key the kill interrupted
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagtune.cli", "run", "--json", "--config", config],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    tmp_dir = state / "artifacts" / ".tmp"
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_dir.is_dir() and any(tmp_dir.glob(f"{NODE_ORDER[0]}-*"))):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((state / "artifacts").glob("*/*/manifest.json")), "a killed run left a manifest"
    # Only the interrupted node (CI time): the nodes after it never started, and test_first_run_builds
    # every node on a fresh state already.
    out = _run_json(state, "--only", NODE_ORDER[0], "--config", config)
    assert out["ok"] and out["nodes"][0]["status"] == "ran"


def test_two_runs_started_together_compute_each_key_once(tmp_path):
    # Output goes to files, not pipes: a child blocked on a full 64 KiB pipe while holding the training
    # slot (the parent drained one child at a time) is what hung this test once, not the product's locks.
    state = tmp_path / "state"
    config = str(fast_config(tmp_path))  # the locks are under test, not training (CI time)
    logs = [(tmp_path / f"out{i}.json", tmp_path / f"err{i}.log") for i in range(2)]
    procs = []
    for i, (out_p, err_p) in enumerate(logs):
        with open(out_p, "w") as out_f, open(err_p, "w") as err_f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dagtune.cli", "run", "--json", "--config", config],
                    cwd=ROOT,
                    env=_env(state, tmp_path / f"prefect{i}"),
                    stdout=out_f,
                    stderr=err_f,
                )
            )
    try:
        for p in procs:
            p.wait(timeout=420)
    finally:
        for p in procs:
            p.kill()
    outs = [(o.read_text(), e.read_text()) for o, e in logs]
    assert all(p.returncode == 0 for p in procs), [(o[-1000:], e[-2000:]) for o, e in outs]
    computed = sum(err.count("computing") for _, err in outs)
    assert computed == len(NODE_ORDER)
    statuses = [json.loads(o)["nodes"] for o, _ in outs]
    for i, name in enumerate(NODE_ORDER):
        assert sorted(s[i]["status"] for s in statuses) == ["cached", "ran"], name
