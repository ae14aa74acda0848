from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
EXTERNAL_SAMPLE = SHARED / "data" / "external" / "arabic_mobile_actions_sample" / "test_sample.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA: run on the GPU machine (see README, GPU tests)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_console_handler_left_behind():
    """A CLI main() called in-process installs a console handler on pytest's capture stream, which is
    closed after that test: later tests would get "Logging error" tracebacks from it."""
    import logging

    from dagtune.logs import CONSOLE_MARK

    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, CONSOLE_MARK, False)]:
        root.removeHandler(h)


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> Path:
    """A private state dir (artifacts, Prefect home, MLflow) for one test."""
    d = tmp_path / "state"
    monkeypatch.setenv("DAGTUNE_STATE_DIR", str(d))
    monkeypatch.delenv("DAGTUNE_ARTIFACT_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return d


@pytest.fixture(scope="session")
def _fast_pipeline(tmp_path_factory):
    """The fast tiny pipeline built once through the CLI: (state dir, its config, the run's JSON, a copy
    of its artifacts taken right after the build, before any test changes that state)."""
    from tests.test_flow import _run_json, fast_config

    root = tmp_path_factory.mktemp("flow")
    state, config = root / "state", fast_config(root)
    first = _run_json(state, "--config", str(config))
    pristine = tmp_path_factory.mktemp("flow-pristine") / "artifacts"
    shutil.copytree(state / "artifacts", pristine, symlinks=True)
    return state, config, first, pristine


@pytest.fixture(scope="session")
def built_pipeline(_fast_pipeline):
    """One fast tiny pipeline built through the CLI (tests/test_flow.py's FAST config), shared by
    tests/test_flow.py and tests/test_stack.py so CI builds it once: (state dir, the run's JSON)."""
    state, _, first, _ = _fast_pipeline
    return state, first


@pytest.fixture(scope="session")
def copy_of_built_pipeline(_fast_pipeline):
    """Copies the fast pipeline's artifacts as first built into ``<dir>/state/artifacts`` (no MLflow
    store, no Prefect records): returns (that state dir, the build's config). Every node run there with
    that config is cached (CI time); register, forced, fills that state's own MLflow store."""
    _, config, _, pristine = _fast_pipeline

    def copy(into: Path) -> tuple[Path, Path]:
        state = into / "state"
        shutil.copytree(pristine, state / "artifacts", symlinks=True)
        return state, config

    return copy
