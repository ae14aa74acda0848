"""Children die with the parent: a killed `dagtune run` must not leave its ephemeral Prefect server
or a running ``convert_hf_to_gguf.py`` behind.

``reap_children_on_exit()`` forks a small watchdog. It learns the run's descendants from /proc every
half second and, once the run's process is gone (SIGKILL included: the watchdog sees the end of a pipe
only the run holds), sends them SIGTERM, then SIGKILL to any still there after a grace period. Each pid
is checked against its recorded start time first, so a reused pid is never signalled. Linux only
(elsewhere it does nothing); process groups are left alone, so Ctrl-C and shell pipelines behave as
before.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 5.0


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time in clock ticks), from /proc/<pid>/stat."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid ...
        out[int(d.name)] = (int(fields[1]), int(fields[19]))
    return out


def descendants(root: int, table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """Every process below ``root``: pid -> start time."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo += children.get(pid, [])
    return found


def _signal_known(known: dict[int, int], sig: int) -> int:
    table = _proc_table()
    hit = 0
    for pid, start in known.items():
        if pid in table and table[pid][1] == start:
            try:
                os.kill(pid, sig)
                hit += 1
            except OSError:
                pass
    return hit


def _watch(parent: int, fd: int) -> None:
    known: dict[int, int] = {}
    me = os.getpid()
    while not select.select([fd], [], [], POLL_S)[0]:
        known.update({p: s for p, s in descendants(parent).items() if p != me})
    # EOF: the run's process is gone. (A normal exit got here too; its children are stopped already.)
    if _signal_known(known, signal.SIGTERM):
        deadline = time.time() + GRACE_S
        while time.time() < deadline and _signal_known(known, 0):
            time.sleep(0.1)
        _signal_known(known, signal.SIGKILL)


def reap_children_on_exit() -> int | None:
    """Start the watchdog for this process; returns its pid (None where /proc is missing)."""
    if not sys.platform.startswith("linux") or not Path("/proc/self/stat").exists():
        return None
    parent = os.getpid()
    r, w = os.pipe()  # close-on-exec: only this process holds the write end
    pid = os.fork()
    if pid == 0:  # the watchdog: only os-level calls from here on
        try:
            os.close(w)
            null = os.open(os.devnull, os.O_RDWR)
            for std in (0, 1, 2):  # never hold the run's stdout/stderr pipes open after it ends
                os.dup2(null, std)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the run, not for us
            _watch(parent, r)
        finally:
            os._exit(0)
    os.close(r)
    _KEEP.append(w)  # held open until this process ends, however it ends
    return pid


_KEEP: list[int] = []
