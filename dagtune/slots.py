"""Device slots: which GPUs a model-loading node may use while it runs.

A worker's devices are its visible GPUs (``runtime.gpus`` of them; all by default), or the CPU as one
device when there is none. Each device has ``runtime.nodes_per_device`` slots, one file lock each under
``<state_dir>/.locks``, so every run on the host (threads, processes, several CLI runs or Prefect
workers) shares them. A node that asks for k devices holds one slot on each of k distinct devices,
all or none, preferring idle devices; while it waits, nothing is held.

GPUs are found without importing torch (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi``): planning and
queueing must not pay for a CUDA context.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("dagtune")

CPU = "cpu"
POLL_S = 0.5


def visible_gpus() -> list[str]:
    """Indices of the GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return (
        [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]
        if out.returncode == 0
        else []
    )


def host_cpus() -> int:
    """Every CPU this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads() -> int:
    """CPU threads this process should use: its share set by the parent (OMP_NUM_THREADS, see
    ``threads_per_slot``), else every CPU it may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return host_cpus()


def threads_per_slot(runtime: Any) -> int:
    """A node process's share of the CPUs: every slot of the worker may be busy at once, and torch's
    spinning thread pools in one process slow another's kernel launches when they oversubscribe."""
    slots = len(worker_devices(runtime)) * runtime.nodes_per_device
    return max(1, cpu_threads() // slots)


def worker_devices(runtime: Any) -> list[str]:
    """The devices this worker schedules on: ``runtime.gpus`` GPUs (all visible when unset), or the CPU."""
    if runtime.device == "cpu":
        return [CPU]
    gpus = visible_gpus()
    if runtime.gpus is not None:
        if runtime.gpus > len(gpus) and runtime.device == "cuda":
            raise RuntimeError(
                f"runtime.gpus is {runtime.gpus} but only {len(gpus)} GPU(s) are visible: {gpus}"
            )
        gpus = gpus[: runtime.gpus]
    if not gpus:
        if runtime.device == "cuda":
            raise RuntimeError(
                "runtime.device is cuda but no GPU is visible (CUDA_VISIBLE_DEVICES / nvidia-smi)"
            )
        return [CPU]
    return gpus


def _try_slot(lock_dir: Path, device: str, slot: int) -> Any | None:
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_dir / f"device-{device}-slot-{slot}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _take(lock_dir: Path, devices: list[str], per_device: int, want: int) -> tuple[list[str], list[Any]]:
    """One pass: idle devices first (their slot 0 is free), then any free slot; all ``want`` or none."""
    got: list[str] = []
    locks: list[Any] = []
    for slot_range in (range(1), range(1, per_device)):
        for dev in devices:
            if len(got) == want:
                break
            if dev in got:
                continue
            for s in slot_range:
                lock = _try_slot(lock_dir, dev, s)
                if lock is not None:
                    got.append(dev)
                    locks.append(lock)
                    break
    if len(got) < want:
        for lock in locks:
            lock.release()
        return [], []
    return got, locks


@contextmanager
def device_slots(
    lock_dir: Path, devices: list[str], per_device: int, want: int, name: str
) -> Iterator[list[str]]:
    """Hold one slot on each of ``want`` devices while the block runs; yields the devices."""
    if want > len(devices):
        raise RuntimeError(
            f"node {name} asks for {want} device(s); this worker has {len(devices)}: {devices} (runtime.gpus)"
        )
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        got, locks = _take(lock_dir, devices, per_device, want)
        if got:
            break
        if not waited:
            log.info("node %s: waiting for %d free device slot(s) of %s", name, want, ",".join(devices))
            waited = True
        time.sleep(POLL_S)
    # The epoch in the text: benchmarks/pipeline_real_size.py reads when a node's work began.
    log.info("node %s: training slot acquired at %.3f on %s", name, time.time(), ",".join(got))
    with ExitStack() as stack:
        for lock in locks:
            stack.callback(lock.release)
        yield got
