"""A model-loading node in its own process, pinned to the devices its slots gave it.

Why a process per node: model loading patches torch globally (two loads in one process failed with
"Cannot copy out of meta tensor"), GPU memory is only fully returned when the process ends, and a
crash (out of memory, a signal) takes down the node, not the run.

The parent (``run_in_process``, called inside the store's build under the node's lock) writes a spec
(config, context, upstream references) into the node's scratch dir, starts ``python -m
dagtune.node_process <spec>`` -- or ``torch.distributed.run`` with one process per device when the node
asks for several -- with ``CUDA_VISIBLE_DEVICES`` set to its GPUs, and reads the child's stdout: lines
carrying a ``dagtune`` log record are logged again in the parent (so they reach the console and the
Prefect flow run), anything else goes to ``<artifact>/node.log`` like the child's stderr. The child
writes its metrics (rank 0) or its error to a JSON file; the parent turns an exit code, a signal or an
out-of-memory error into one clear ``NodeProcessError``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

log = logging.getLogger("dagtune")

MARK = "\x1edagtune-log\x1f"  # prefix of a stdout line that carries a dagtune log record
SPEC = "node-spec.json"
TAIL_LINES = 30
SPAWNED_AT = "DAGTUNE_NODE_SPAWNED_AT"  # epoch seconds at which the parent started this node's process


def startup_seconds() -> float | None:
    """Seconds since the parent started this node's process (None when the node runs in-process)."""
    at = os.environ.get(SPAWNED_AT)
    return round(time.time() - float(at), 3) if at else None


class NodeProcessError(RuntimeError):
    """A node's process failed: exit code, signal or error, with the tail of its log. ``child_type``:
    the class name of the exception the node raised in its process (None after a signal)."""

    def __init__(self, message: str, child_type: str | None = None, returncode: int | None = None) -> None:
        super().__init__(message)
        self.child_type = child_type
        self.returncode = returncode


# ---------------------------------------------------------------------------------------------- parent
def _spec(ctx: Any, cfg: Any, module: str) -> dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(ctx.settings).items()}
    return {
        "node": ctx.name,
        "module": module,
        "config": cfg.model_dump(mode="json"),
        "out": str(ctx.out),
        "scratch": str(ctx.scratch),
        "upstream": {u: asdict(a) for u, a in ctx.upstream.items()},
        "settings": settings,
    }


def _write_spec(ctx: Any, cfg: Any, module: str) -> Path:
    path = Path(ctx.scratch) / SPEC
    # the config may hold credentials (a tracking URI's password): readable by the owner only
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(_spec(ctx, cfg, module), f, default=str)
    return path


def child_command(spec: Path, processes: int) -> list[str]:
    """One process, or torch's elastic launcher with one process per device (data parallel)."""
    entry = ["-m", "dagtune.node_process", str(spec)]
    if processes == 1:
        return [sys.executable, *entry]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *entry,
    ]


def child_env(devices: list[str], threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads and "OMP_NUM_THREADS" not in env:  # an operator's own setting wins
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    # "" hides every GPU: a node scheduled on the CPU must not touch one another node is using
    env["CUDA_VISIBLE_DEVICES"] = ",".join(d for d in devices if d != "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    env[SPAWNED_AT] = repr(time.time())  # the child's start-up (interpreter, imports) is timed from here
    # the parent's sys.path (a worktree or a test's PYTHONPATH) is the child's: same code either way
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _relay(line: str, node_log: Any) -> None:
    if line.startswith(MARK):
        try:
            rec = json.loads(line[len(MARK) :])
        except ValueError:
            node_log.write(line)
            return
        lg = logging.getLogger(rec.get("name") or "dagtune")
        level = int(rec.get("levelno", logging.INFO))
        if lg.isEnabledFor(level):
            lg.handle(logging.makeLogRecord({"name": lg.name, "levelno": level,
                                             "levelname": logging.getLevelName(level), "msg": rec.get("msg", "")}))  # fmt: skip
    else:
        node_log.write(line)


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _error_from_files(scratch: Path) -> dict[str, Any] | None:
    for p in sorted(scratch.glob("node-error-*.json")):
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return None


def _explain(rc: int, err: dict[str, Any] | None, devices: list[str]) -> str:
    where = ",".join(devices)
    if rc < 0:
        sig = signal.Signals(-rc).name
        hint = (
            " (on Linux usually the out-of-memory killer: host memory ran out; see dmesg)"
            if sig == "SIGKILL"
            else ""
        )
        return f"killed by {sig}{hint} on {where}"
    if err is None:
        return f"exit code {rc} on {where}"
    what = f"{err.get('type')}: {err.get('message')}"
    if err.get("type") == "OutOfMemoryError" or "out of memory" in str(err.get("message", "")).lower():
        return f"out of GPU memory on {where} (lower the node's batch_size or max_seq_length): {what}"
    return f"{what} (exit code {rc} on {where})"


def run_in_process(
    ctx: Any, cfg: Any, module: str, devices: list[str], processes: int = 1, threads: int | None = None
) -> dict[str, Any]:
    """Build the node (``module``: "package.module:function") in a child process on ``devices`` (with
    ``threads`` CPU threads per process); returns its metrics."""
    from dagtune.logs import NODE_LOG

    scratch = Path(ctx.scratch)
    for old in scratch.glob("node-error-*.json"):
        old.unlink()
    result_path = scratch / "node-result.json"
    result_path.unlink(missing_ok=True)
    spec = _write_spec(ctx, cfg, module)
    node_log_path = Path(ctx.out) / NODE_LOG
    node_log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = child_command(spec, processes)
    log.debug("node %s: %s (CUDA_VISIBLE_DEVICES=%s)", ctx.name, " ".join(cmd), ",".join(devices))
    try:
        with open(node_log_path, "a", encoding="utf-8", buffering=1) as node_log:
            proc = subprocess.Popen(cmd, env=child_env(devices, threads), stdout=subprocess.PIPE, stderr=node_log,
                                    stdin=subprocess.DEVNULL, text=True, bufsize=1)  # fmt: skip
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    _relay(line, node_log)
                rc = proc.wait()
            except BaseException:  # the parent is stopped (Ctrl-C, a cancelled flow run): so is the child
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
    finally:
        spec.unlink(missing_ok=True)
    if rc == 0 and result_path.exists():
        return json.loads(result_path.read_text()).get("metrics") or {}
    kept = scratch / "node-failed.log"  # the artifact's temp dir goes with the failure; its log stays here
    kept.write_text(
        node_log_path.read_text(encoding="utf-8", errors="replace") if node_log_path.exists() else ""
    )
    err = _error_from_files(scratch)
    raise NodeProcessError(
        f"node {ctx.name} failed in its own process: {_explain(rc, err, devices)}\n"
        f"last lines of its log ({kept}):\n{_tail(kept)}",
        child_type=(err or {}).get("type"),
        returncode=rc,
    )


# ----------------------------------------------------------------------------------------------- child
class _MarkHandler(logging.Handler):
    """Each dagtune record as one marked JSON line on the parent's pipe."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            rec = {"name": record.name, "levelno": record.levelno, "msg": record.getMessage()}
            self.stream.write(MARK + json.dumps(rec, ensure_ascii=False) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)


def _die_with_parent() -> None:
    """SIGTERM when the parent goes (also killed with SIGKILL), so no node outlives its run."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _route_child_logs(rank: int) -> None:
    pipe = sys.stdout
    sys.stdout = sys.stderr  # library prints and progress bars: into node.log with stderr
    lg = logging.getLogger("dagtune")
    lg.setLevel(logging.DEBUG if os.environ.get("DAGTUNE_DEBUG") else logging.INFO)
    lg.propagate = False
    handler: logging.Handler = _MarkHandler(pipe) if rank == 0 else logging.StreamHandler(sys.stderr)
    if rank != 0:  # the other ranks' records stay in node.log: one rank speaks for the node
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s [rank {rank}] %(name)s %(levelname)s %(message)s")
        )
    lg.addHandler(handler)
    root = logging.getLogger()
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(h)
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def _context(spec: dict[str, Any]) -> tuple[Any, Any]:
    from dagtune.config import PipelineConfig
    from dagtune.pipeline import NODES, NodeContext, Settings
    from dagtune.store import Artifact, ArtifactStore

    cfg = PipelineConfig.model_validate(spec["config"])
    name = spec["node"]
    s = dict(spec["settings"])
    for k in ("state_dir", "artifact_root", "config_dir"):
        s[k] = Path(s[k])
    ctx = NodeContext(
        name=name,
        out=Path(spec["out"]),
        scratch=Path(spec["scratch"]),
        section=getattr(cfg, NODES[name].section_name),
        runtime=cfg.runtime,
        upstream={u: Artifact(**a) for u, a in spec["upstream"].items()},
        store=ArtifactStore(cfg.artifact_root),
        settings=Settings(**s),
    )
    mod, fn = spec["module"].split(":")
    return getattr(importlib.import_module(mod), fn), ctx


_CRASH_LOG: Any = None


def _dump_stacks_on_crash() -> None:
    """A crash in native code (CUDA, llama.cpp) leaves every thread's stack in the node's log, written
    through a copy of stderr's descriptor: llama-cpp-python points fd 2 at /dev/null while it loads."""
    import faulthandler

    global _CRASH_LOG
    _CRASH_LOG = os.fdopen(os.dup(2), "w")
    faulthandler.enable(file=_CRASH_LOG)


def main(argv: list[str]) -> int:
    _dump_stacks_on_crash()
    _die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    _route_child_logs(rank)
    spec_path = Path(argv[0])
    scratch = spec_path.parent
    try:
        build, ctx = _context(json.loads(spec_path.read_text()))
        metrics = build(ctx) or {}
        if rank == 0:
            part = scratch / "node-result.json.part"
            part.write_text(json.dumps({"metrics": metrics}, ensure_ascii=False, default=str))
            os.replace(part, scratch / "node-result.json")
        return 0
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, then a non-zero exit
        traceback.print_exc(file=sys.stderr)
        err = {"type": type(e).__name__, "message": str(e)[:4000], "rank": rank}
        (scratch / f"node-error-{rank}.json").write_text(json.dumps(err, ensure_ascii=False))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
