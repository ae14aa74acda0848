"""benchmarks/pipeline_real_size.py on the CPU (``--device cpu --tiny``): the same code path as the GPU
call (config writing, the real Prefect flow through ``dagtune run --json``, per-node numbers read back
from the manifests, the sampler thread), at a tiny nightly size. The proof the script works before the
GPU call is made."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dagtune.pipeline import NODE_ORDER

ROOT = Path(__file__).resolve().parent.parent
# Two training steps leave near-flat logits, where Q8_0 rounding flips top-1 by chance (as in
# tests/test_flow.py): parity itself is tested in tests/test_gguf*.py.
OVERRIDE = {
    "evaluate": {"max_new_tokens": 16},
    "convert_gguf": {
        "parity_prompts": 4,
        "max_new_tokens": 4,
        "min_top1_agreement": 0.0,
        "min_template_greedy_match": 0.0,
    },
}


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "pipeline_real_size", ROOT / "benchmarks/pipeline_real_size.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pipeline_real_size"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama_cpp (convert_gguf)")
def test_cpu_tiny_mode_runs_the_whole_dag_and_reports_every_node(tmp_path, monkeypatch):
    for var in ("DAGTUNE_STATE_DIR", "DAGTUNE_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "prs.json"
    args = ["--device", "cpu", "--tiny", "--fc", "60", "--extractor", "60", "--classifier", "60"]
    args += ["--eval", "8", "--steps-cap", "2", "--override", json.dumps(OVERRIDE), "--out", str(out)]
    doc = _benchmark().main(args)
    assert json.loads(out.read_text()) == doc
    assert doc["device"].startswith("cpu (") and doc["profile"] == "tiny" and doc["steps_cap"] == 2
    assert doc["nightly"] == {"fc": 60, "extractor": 60, "classifier": 60, "eval": 8}
    (run,) = doc["runs"]
    assert run["ok"], (run["error"], Path(run["log"]).read_text()[-3000:])
    assert list(run["nodes"]) == NODE_ORDER
    for name, node in run["nodes"].items():
        assert node["status"] == "ran", name
        assert node["wall_s"] > 0 and node["started"] < node["finished"], name
        # no GPU here: the sampler says why instead of inventing a busy fraction
        assert node["gpu_busy_fraction"] is None and node["gpu_samples"] == 0
    assert run["gpu"]["samples"] == 0 and run["gpu"]["error"]
    for name in ("train_function_calling", "train_extractor", "train_classifier"):
        node = run["nodes"][name]
        assert set(node["phases"]) == {"startup_s", "load_s", "prepare_s", "first_step_s", "steady_s",
                                       "checkpoint_s", "validate_s", "merge_s", "save_s"}  # fmt: skip
        phases = ("startup_s", "load_s", "prepare_s", "first_step_s", "validate_s")
        assert all(node["phases"][k] > 0 for k in phases), name
        # each node in its own process: its start-up is within the node's wall time, before the rest
        assert node["phases"]["startup_s"] + node["phases"]["load_s"] < node["wall_s"], name
        assert node["compile_s"] == node["phases"]["first_step_s"]
    assert run["nodes"]["evaluate"]["evaluation_s"] > 0
    path = [c["node"] for c in run["critical_path"]]
    assert path[0] == "prepare_data" and path[-1] == "register", path
    for model in ("function_calling", "extractor"):
        gguf = run["nodes"][f"convert_gguf_{model}"]
        assert set(gguf["gguf"]) == {f"{model}.q8_0"}
        assert gguf["gguf_bytes"] == sum(f["bytes"] for f in gguf["gguf"].values()) > 0
        assert all(f["parity_s"] > 0 for f in gguf["gguf"].values())
    assert run["nodes"]["register"]["registration_s"] > 0
    assert set(run["nodes"]["register"]["register_phases"]) == {
        "connect",
        "runs",
        "function_calling",
        "extractor",
        "classifier",
    }
    # the intervals follow the DAG: data before training, evaluation after all training, register last
    n = run["nodes"]
    trained = [n[t] for t in ("train_function_calling", "train_extractor", "train_classifier")]
    assert all(n["prepare_data"]["finished"] <= t["started"] for t in trained)
    assert all(t["finished"] <= n["evaluate"]["started"] for t in trained)
    # each export after its own training (NODES gives it no other training upstream)
    for model in ("function_calling", "extractor"):
        assert n[f"convert_gguf_{model}"]["started"] >= n[f"train_{model}"]["finished"]
    exports = (n["convert_gguf_function_calling"], n["convert_gguf_extractor"])
    assert n["register"]["started"] >= max(n["evaluate"]["finished"], *(e["finished"] for e in exports))


def test_warm_run_reruns_every_node_on_the_last_runs_state(tmp_path):
    bench = _benchmark()
    assert bench.run_plan("cold", None) == [("cold", [])]
    assert bench.run_plan("warm", None) == [("cold", []), ("warm", NODE_ORDER)]
    assert bench.run_plan("warm-only", ["prepare_data", "train_classifier"]) == [
        ("warm", ["prepare_data", "train_classifier"])
    ]
    # a warm run without an earlier run's compile cache would be a cold one under another name
    with pytest.raises(SystemExit, match="no earlier run's compile cache"):
        bench.main(["--warm-only", "--device", "cpu", "--tiny", "--state-dir", str(tmp_path / "none"),
                    "--out", str(tmp_path / "x.json")])  # fmt: skip


def test_critical_path_follows_the_upstream_each_node_waited_for():
    """From the node that finished last, back through the upstream that finished last before it: a
    shorter sibling branch (b) and a node not upstream (d) stay off the path."""
    nodes = {
        "a": {"started": 100.0, "finished": 110.0},
        "b": {"started": 110.5, "finished": 130.0},
        "c": {"started": 110.5, "finished": 150.0},
        "d": {"started": 111.0, "finished": 170.0},
        "e": {"started": 152.0, "finished": 160.0},
        "f": {"started": 171.0, "finished": 180.0},
        "skipped": {"started": None, "finished": None},
    }
    upstream = {"b": ("a",), "c": ("a",), "d": ("a",), "e": ("b", "c"), "f": ("e", "skipped", "d")}
    chain = _benchmark().critical_path(nodes, upstream)
    assert [c["node"] for c in chain] == ["a", "d", "f"]
    assert chain[-1] == {"node": "f", "start_s": 71.0, "end_s": 80.0, "gap_s": 1.0}
    upstream["f"] = ("e",)
    assert [c["node"] for c in _benchmark().critical_path(nodes, upstream)] == ["a", "c", "e", "f"]
    assert _benchmark().critical_path({}, upstream) == []
