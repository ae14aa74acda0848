"""Device slots (dagtune.slots): GPUs are slots, shared by every run on the host through file locks."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from dagtune.slots import device_slots, worker_devices


def _spans(lock_dir, devices, per_device, wants, hold=0.4):
    """Run one thread per entry of ``wants``; each holds its slots for ``hold`` s. -> [(start, end, devices)]"""
    spans = []

    def work(i, want):
        with device_slots(lock_dir, devices, per_device, want, f"n{i}") as got:
            t0 = time.time()
            time.sleep(hold)
            spans.append((t0, time.time(), tuple(got)))

    threads = [threading.Thread(target=work, args=(i, w)) for i, w in enumerate(wants)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # a deterministic arrival order
    for t in threads:
        t.join()
    return sorted(spans)


def _overlap(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_one_device_one_slot_queues_nodes(tmp_path):
    a, b = _spans(tmp_path, ["0"], 1, [1, 1])
    assert not _overlap(a, b) and a[2] == b[2] == ("0",)


def test_two_gpus_run_two_nodes_at_once_on_different_gpus(tmp_path):
    a, b = _spans(tmp_path, ["0", "1"], 1, [1, 1])
    assert _overlap(a, b)
    assert {a[2], b[2]} == {("0",), ("1",)}


def test_slots_per_device_share_one_gpu(tmp_path):
    spans = _spans(tmp_path, ["0"], 2, [1, 1, 1])
    assert _overlap(spans[0], spans[1])  # two share the GPU
    assert spans[2][0] >= min(spans[0][1], spans[1][1]) - 0.01  # the third waits for one of them


def test_idle_gpu_is_preferred_over_a_busy_gpus_second_slot(tmp_path):
    a, b = _spans(tmp_path, ["0", "1"], 2, [1, 1])
    assert {a[2], b[2]} == {("0",), ("1",)}


def test_two_gpu_node_holds_both_or_none(tmp_path):
    """A node wanting 2 GPUs waits while one is busy without holding the other: a 1-GPU node that
    arrives later still gets the free GPU."""
    spans = _spans(tmp_path, ["0", "1"], 1, [1, 2, 1], hold=0.5)
    by_len = sorted(spans, key=lambda s: s[0])
    single, late = [s for s in by_len if len(s[2]) == 1]
    double = next(s for s in spans if len(s[2]) == 2)
    assert set(double[2]) == {"0", "1"}
    assert _overlap(single, late)  # the late 1-GPU node ran beside the first while the 2-GPU one waited
    assert double[0] >= max(single[1], late[1]) - 0.01


def test_a_node_asking_more_gpus_than_the_worker_has_fails(tmp_path):
    with pytest.raises(RuntimeError, match="asks for 3 device"):
        with device_slots(tmp_path, ["0", "1"], 1, 3, "train_classifier"):
            pass


def _rt(device="auto", gpus=None):
    return SimpleNamespace(device=device, gpus=gpus)


def test_worker_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    assert worker_devices(_rt()) == ["2", "3", "5"]
    assert worker_devices(_rt(gpus=2)) == ["2", "3"]
    assert worker_devices(_rt(device="cpu")) == ["cpu"]
    with pytest.raises(RuntimeError, match="runtime.gpus is 4"):
        worker_devices(_rt(device="cuda", gpus=4))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert worker_devices(_rt()) == ["cpu"]
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        worker_devices(_rt(device="cuda"))
