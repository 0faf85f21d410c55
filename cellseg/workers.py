"""Helper processes that end with their parent and leave Ctrl-C to it.

The slide readers (:mod:`cellseg.readahead`) and the labelling processes (:mod:`cellseg.pipeline`)
are ``spawn``-ed :class:`concurrent.futures.ProcessPoolExecutor` workers. Left to themselves they
outlive a parent killed with ``kill -9`` (each holds a slide handle, ~100 MB) and print a
``KeyboardInterrupt`` traceback of their own on Ctrl-C (the terminal sends SIGINT to the whole
process group). :func:`init_worker` is their initializer:

* SIGINT is ignored: the parent handles Ctrl-C and shuts the pool down;
* on Linux the kernel sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``);
* everywhere, a watchdog thread exits the worker when its parent pid changes (the portable
  fallback, e.g. macOS);
* logging follows the parent's command line (``CELLSEG_LOG_LEVEL``, set by the CLI): third-party
  loggers such as tifffile's stay silent unless ``-v``.

:func:`sigint_ignored` keeps SIGINT ignored while workers are being started, so that a Ctrl-C
during their start-up (imports take seconds) does not reach them either: a child inherits an
ignored signal, and Python leaves it ignored.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

LOG_LEVEL_ENV = "CELLSEG_LOG_LEVEL"  # "ERROR", "WARNING", "INFO" or "DEBUG" (see cli/common.py)
THIRD_PARTY_ENV = "CELLSEG_LOG_THIRD_PARTY"  # "1": third-party log records are shown
WATCHDOG_PERIOD_S = 1.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _set_parent_death_signal() -> None:
    """Asks Linux to SIGKILL this process when its parent exits (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _watch_parent(parent_pid: int, period_s: float) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent is gone; nothing here is worth cleaning up
        time.sleep(period_s)


class _LowerCaseLevel(logging.Formatter):
    """``warning: message``, as the parent's lines (cli/common.py)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def configure_worker_logging() -> None:
    """Logging of a worker process as the parent's command line asked (stderr, one line each)."""
    level = os.environ.get(LOG_LEVEL_ENV)
    if level is None:
        return  # a library user's process: leave logging alone
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerCaseLevel("%(message)s"))
    if os.environ.get(THIRD_PARTY_ENV) != "1":
        handler.addFilter(lambda record: record.name.split(".")[0] == "cellseg")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)


def init_worker(parent_pid: int, initializer: Callable[..., Any] | None = None, *args: Any) -> None:
    """Initializer of every helper process; then runs ``initializer(*args)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    watchdog = threading.Thread(
        target=_watch_parent,
        args=(parent_pid, WATCHDOG_PERIOD_S),
        name="cellseg-parent-watchdog",
        daemon=True,
    )
    watchdog.start()
    configure_worker_logging()
    if initializer is not None:
        initializer(*args)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignores SIGINT while starting child processes (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ready() -> None:
    """Does nothing; submitting it makes a pool start a worker."""


def start_pool(
    workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """A ``spawn`` process pool (never fork a process holding torch and threads) whose workers
    are started now, from this thread, with SIGINT ignored, and run :func:`init_worker`.

    Starting them here matters on Linux: the parent-death signal fires when the *thread* that
    started a process ends, so workers must not be started lazily from a short-lived thread.
    """
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(os.getpid(), initializer, *initargs),
    )
    with sigint_ignored():
        for _ in range(workers):
            pool.submit(_ready)
    return pool
