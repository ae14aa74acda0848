"""A model-loading node runs in its own process (dagtune.node_process): its records reach the run's log,
its failures (error, signal, out of memory) become one clear node failure, and nothing is committed."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

from dagtune import pipeline
from dagtune.config import load_config
from dagtune.node_process import NodeProcessError

NODE = "train_classifier"


def _run(monkeypatch, build: str, overrides: dict | None = None):
    node = dataclasses.replace(pipeline.NODES[NODE], module=f"tests.node_process_builds:{build}", upstream=())
    monkeypatch.setitem(pipeline.NODES, NODE, node)
    cfg = load_config(profile="tiny", overrides=overrides)
    return cfg, pipeline.run_node(NODE, cfg, {})


def test_node_builds_in_a_child_process_and_its_records_reach_the_run_log(state_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dagtune")
    cfg, (art, res) = _run(monkeypatch, "ok")
    metrics = art.manifest()["metrics"]
    assert res.status == "ran"
    assert metrics["pid"] != os.getpid()
    assert metrics["section"] == type(cfg.train_classifier).__name__
    assert metrics["state_dir"] == str(cfg.state_dir)
    assert (art.dir / "result.txt").read_text() == "built in a child"
    child_says = [r for r in caplog.records if "says hi" in r.getMessage()]
    assert child_says and child_says[0].name == "dagtune.test_child"
    assert f"child {metrics['pid']} says hi" in child_says[0].getMessage()
    assert any("training slot acquired" in r.getMessage() for r in caplog.records)
    assert not list((cfg.artifact_root / ".scratch").glob("*/node-spec.json"))  # the spec holds the config


def test_cpu_node_sees_no_gpu_and_gets_its_share_of_threads(state_dir, monkeypatch):
    from dagtune.slots import cpu_threads

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _, (art, _) = _run(monkeypatch, "ok", {"runtime": {"nodes_per_device": 2}})
    metrics = art.manifest()["metrics"]
    assert metrics["cuda_visible_devices"] == ""
    assert metrics["omp_num_threads"] == str(max(1, cpu_threads() // 2))


@pytest.mark.parametrize(
    "build, expected",
    [
        ("fail", r"ValueError: boom in the child \(exit code 1 on cpu\)"),
        ("killed", r"killed by SIGKILL .*out-of-memory killer"),
        ("out_of_memory", r"out of GPU memory on cpu .*lower the node's batch_size"),
    ],
)
def test_child_failure_is_one_clear_node_failure(state_dir, monkeypatch, build, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(NodeProcessError, match=expected) as err:
        _run(monkeypatch, build)
    cfg = load_config(profile="tiny")
    assert not list((cfg.artifact_root / NODE).glob("*/manifest.json"))  # nothing committed
    assert (
        err.value.child_type
        == {"fail": "ValueError", "killed": None, "out_of_memory": "OutOfMemoryError"}[build]
    )
    if build == "fail":  # the log's tail comes with the error, and stays in the scratch dir
        assert "library chatter before the failure" in str(err.value)
        assert "Traceback" in str(err.value)
        kept = list((cfg.artifact_root / ".scratch").glob(f"{NODE}-*/node-failed.log"))
        assert kept and "boom in the child" in kept[0].read_text()


def test_native_crash_leaves_the_stacks_in_the_log_even_with_stderr_silenced(state_dir, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(NodeProcessError, match="killed by SIGSEGV") as err:
        _run(monkeypatch, "native_crash_with_stderr_silenced")
    assert "Fatal Python error: Segmentation fault" in str(err.value)
    assert "native_crash_with_stderr_silenced" in str(err.value)  # the crashing function's frame
