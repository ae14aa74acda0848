"""The layering the project lives by: dagtune/ holds the logic and imports no Prefect; tasks/ are thin
wrappers, one per node; flows/ only wire tasks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from dagtune.pipeline import NODE_ORDER

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_core_never_imports_prefect():
    offenders = [str(p) for p in (ROOT / "dagtune").rglob("*.py") if "prefect" in _imports(p)]
    assert offenders == []


def test_importing_every_core_module_loads_no_prefect_and_no_torch():
    mods = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "dagtune").rglob("*.py")
        if "_code" not in p.parts and p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "print('prefect' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    prefect_loaded, torch_loaded = out.stdout.split()
    assert prefect_loaded == "False"
    assert torch_loaded == "False", "heavy imports belong inside functions"


def test_one_thin_task_file_per_node():
    for name in NODE_ORDER:
        src = (ROOT / "tasks" / f"{name}.py").read_text()
        assert f'{name} = node_task("{name}")' in src
        assert len([line for line in src.splitlines() if line.strip()]) <= 6


def test_flow_wires_every_node_and_holds_no_logic():
    src = (ROOT / "flows" / "pipeline.py").read_text()
    for name in NODE_ORDER:
        assert f"{name}.submit(" in src
    tree = ast.parse(src)
    banned = (ast.If, ast.For, ast.While, ast.Try, ast.With)
    assert not [type(n).__name__ for n in ast.walk(tree) if isinstance(n, banned)]
