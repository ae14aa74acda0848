"""Node build functions for tests/test_node_process.py: imported by the node's child process."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("dagtune.test_child")


def ok(ctx):
    log.info("child %d says hi", os.getpid())
    (ctx.out / "result.txt").write_text("built in a child")
    return {
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "section": type(ctx.section).__name__,
        "state_dir": str(ctx.settings.state_dir),
    }


def fail(ctx):
    print("library chatter before the failure")
    raise ValueError("boom in the child")


def killed(ctx):
    os.kill(os.getpid(), signal.SIGKILL)


def out_of_memory(ctx):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def native_crash_with_stderr_silenced(ctx):
    """What llama-cpp-python's quiet load does (fd 2 on /dev/null) when native code then crashes."""
    import faulthandler

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    faulthandler._sigsegv()
