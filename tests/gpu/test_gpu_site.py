"""The GPU package site (scripts/gpu_site.sh) on the CUDA machine.

    export PYTHONPATH=$PWD/.gpu_site:$PWD; python3 -m pytest -m gpu tests/gpu   # with carry [".gpu_site"]

Unsloth patches transformers when imported, so every check that imports it runs in a child process.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

PINS = {
    "unsloth": "2026.10.7",
    "unsloth_zoo": "2026.10.7",
    "bitsandbytes": "0.50.2",
    "trl": "1.15.0",
    "datasets": "4.8.5",
    "xformers": "0.0.35",
}


def _need_site():
    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth not importable: build .gpu_site (scripts/gpu_site.sh) and put it on PYTHONPATH")


def test_site_imports_with_pinned_versions():
    _need_site()
    code = (
        "import json, torch, unsloth, unsloth_zoo, bitsandbytes, trl, datasets, xformers\n"
        "from importlib.metadata import version\n"
        f"print('VERSIONS ' + json.dumps({{n: version(n) for n in {sorted(PINS)!r}}}))\n"
        "print('DEVICE', torch.cuda.get_device_name())\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("VERSIONS "))
    assert json.loads(line[len("VERSIONS ") :]) == PINS


def test_bitsandbytes_nf4_roundtrip_on_cuda():
    _need_site()
    import bitsandbytes.functional as F
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    q, state = F.quantize_4bit(w, quant_type="nf4")
    back = F.dequantize_4bit(q, state)
    rel = ((back.float() - w.float()).norm() / w.float().norm()).item()
    assert back.shape == w.shape and rel < 0.15, rel
