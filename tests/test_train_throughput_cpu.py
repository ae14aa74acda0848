"""benchmarks/train_throughput.py's raw loops on the CPU with tiny shapes: the harness and its classifier-
objective baselines (``hf_head``) run and learn; a check of the harness, not a measurement."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_hf_loops_lm_and_last_token_head(tmp_path):
    out = tmp_path / "tt.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--tiny", "--device", "cpu",
           "--impl", "hf,hf_head", "--models", "phi-4-mini", "--keys", "phi-4-mini|ckpt|16bit|b2",
           "--batch", "2", "--seq", "32", "--warmup", "1", "--steps", "6",
           "--model-root", str(tmp_path / "models"), "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {r["impl"]: r for r in doc["results"]}
    assert set(rows) == {"hf", "hf_head"}, doc["results"]
    for r in rows.values():
        assert r["status"] == "ok", (r, out.with_suffix(".log").read_text()[-3000:])
        assert r["tokens"] == 2 * 32 * 6 and r["tokens_per_s"] > 0
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
    # The LM loss starts near ln(vocab); the two-class head's cross-entropy near ln 2.
    assert rows["hf"]["loss_first"] > 5.0
    assert 0.2 < rows["hf_head"]["loss_first"] < 2.0
