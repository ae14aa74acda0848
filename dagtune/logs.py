"""Where a node's output goes while it builds.

dagtune's own records (logger ``dagtune`` and its children) stay on the run's log: the console and, under
Prefect, the flow run's logs (``PREFECT_LOGGING_EXTRA_LOGGERS=dagtune``, set by
``runner.prepare_environment`` and by the deployments). Everything else a node's thread emits -- library
loggers (transformers, httpx, datasets), ``print`` and progress bars written to ``sys.stdout`` /
``sys.stderr`` -- goes to ``<artifact>/node.log`` instead, so the run log stays readable and the chatter
is still kept with the artifact that produced it.

Routing is per thread because nodes run concurrently in one process (Prefect's thread pool). Output
written by the C side of a library straight to file descriptor 1/2 is not Python-level and is not routed.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

NODE_LOG = "node.log"
CONSOLE_MARK = "dagtune_console"  # set on the handler configure_console installs
DAGTUNE_LOGGER = "dagtune"
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

_sinks: dict[int, TextIO] = {}
_lock = threading.Lock()


def is_dagtune_record(record: logging.LogRecord) -> bool:
    return record.name == DAGTUNE_LOGGER or record.name.startswith(DAGTUNE_LOGGER + ".")


class _ThreadRouter(io.TextIOBase):
    """A ``sys.stdout`` / ``sys.stderr`` stand-in: a write from a thread that is building a node goes to
    that node's log file, any other write to the stream it replaced."""

    def __init__(self, fallback: TextIO) -> None:
        self.fallback = fallback

    def write(self, s: str) -> int:
        sink = _sinks.get(threading.get_ident())
        return (sink or self.fallback).write(s)

    def flush(self) -> None:
        sink = _sinks.get(threading.get_ident())
        (sink or self.fallback).flush()

    def isatty(self) -> bool:  # progress bars draw one line per update into a file, not a redraw loop
        return threading.get_ident() not in _sinks and self.fallback.isatty()

    def __getattr__(self, name: str):  # encoding, fileno, ... of the real stream
        return getattr(self.fallback, name)


class _ThreadFileHandler(logging.Handler):
    """On the root logger: a non-dagtune record emitted by a node's thread goes to that node's file."""

    def emit(self, record: logging.LogRecord) -> None:
        sink = _sinks.get(record.thread or 0)
        if sink is None or is_dagtune_record(record):
            return
        try:
            sink.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


_handler = _ThreadFileHandler()
_handler.setFormatter(logging.Formatter(LOG_FORMAT))


class QuietFilter(logging.Filter):
    """For a console handler: only dagtune's records, and none a node's thread routed to its file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_dagtune_record(record)


class NotRoutedFilter(logging.Filter):
    """For a console handler in verbose mode: library records from a node's thread are in its file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_dagtune_record(record) or (record.thread or 0) not in _sinks


# Library root loggers that stop propagation to the root logger once configured (transformers does on
# import, with its own stderr handler): the routing handler is attached to them too.
NON_PROPAGATING = ("transformers", "datasets")


def _routed_loggers() -> list[logging.Logger]:
    libs = [logging.getLogger(n) for n in NON_PROPAGATING]
    return [logging.getLogger(), *(lg for lg in libs if not lg.propagate)]


def _install() -> None:
    if not isinstance(sys.stdout, _ThreadRouter):
        sys.stdout = _ThreadRouter(sys.stdout)
    if not isinstance(sys.stderr, _ThreadRouter):
        sys.stderr = _ThreadRouter(sys.stderr)
    for lg in _routed_loggers():
        if _handler not in lg.handlers:
            lg.addHandler(_handler)
        for h in lg.handlers:
            if h is not _handler and not any(
                isinstance(f, (QuietFilter, NotRoutedFilter)) for f in h.filters
            ):
                h.addFilter(NotRoutedFilter())


def _uninstall() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _ThreadRouter):
            setattr(sys, name, stream.fallback)
    for lg in [logging.getLogger(), *(logging.getLogger(n) for n in NON_PROPAGATING)]:
        lg.removeHandler(_handler)


def ensure_dagtune_logger_level(level: int = logging.INFO) -> None:
    """A worker's root logger is at WARNING: dagtune's INFO records (node ran, key, metrics) must pass."""
    lg = logging.getLogger(DAGTUNE_LOGGER)
    if lg.level == logging.NOTSET or lg.level > level:
        lg.setLevel(level)


@contextmanager
def node_output_to(path: Path) -> Iterator[None]:
    """Route this thread's library logs, prints and progress bars to ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tid = threading.get_ident()
    with open(path, "a", encoding="utf-8", buffering=1) as f:
        with _lock:
            _sinks[tid] = f
            _install()
        try:
            yield
        finally:
            with _lock:
                _sinks.pop(tid, None)
                if not _sinks:
                    _uninstall()


def configure_console(verbose: bool, stream: TextIO | None = None) -> None:
    """The CLI's console: dagtune's lines only by default; ``verbose`` adds every library's INFO."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, CONSOLE_MARK, False)]:  # one console per process
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, CONSOLE_MARK, True)
    handler.setFormatter(logging.Formatter(LOG_FORMAT if verbose else "%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(NotRoutedFilter() if verbose else QuietFilter())
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)  # library warnings become `py.warnings` records: shown only with -v
    ensure_dagtune_logger_level()
