"""benchmarks/train_throughput.py end to end on the GPU with tiny shapes (seconds, not a measurement)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", ["functiongemma-270m", "phi-4-mini"])
def test_tiny_unsloth_and_hf_loops_train(tmp_path, model):
    impls = "unsloth,hf" if importlib.util.find_spec("unsloth") is not None else "hf"
    if model == "phi-4-mini":  # and the raw loops on the classifier's objective
        impls += "," + ",".join(f"{i}_head" for i in impls.split(","))
    out = tmp_path / "tt.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/train_throughput.py"),
        "--tiny",
        "--impl",
        impls,
        "--models",
        model,
        "--batch",
        "2",
        "--seq",
        "128",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--model-root",
        str(tmp_path / "models"),
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    log = out.with_suffix(".log").read_text() if out.with_suffix(".log").exists() else ""
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["env"]["device"] != "" and "cpu" not in doc["env"]["device"]
    rows = doc["results"]
    assert {r["impl"] for r in rows} == set(impls.split(","))
    for r in rows:
        assert r["status"] == "ok", (r, log[-3000:])
        assert r["tokens_per_s"] > 0 and r["peak_allocated_gib"] > 0
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
