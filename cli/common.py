"""Shared helpers of the click commands: exit codes, one-line errors, logging, signals.

Exit codes: 0 success; 1 an expected runtime failure (bad slide, model or data file, full
disk: ``CellsegError``), printed as one ``error: ...`` line; 2 a usage error (click's own, and
our checks of the command line made before any work); 130 interrupted by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable

import click

EXIT_FAILURE = 1  # an expected runtime failure
EXIT_USAGE = 2  # click's code for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
RESOURCE_TRACKER_WARNING = "ignore:resource_tracker:UserWarning"


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Prints ``error: message`` on stderr and exits (default: 2, a usage error)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # handled like Ctrl-C: stop, keep what resumes, exit 130


def user_errors(func: Callable) -> Callable:
    """Turns expected failures (``CellsegError``) into one line on stderr and exit 1; Ctrl-C and
    SIGTERM into ``interrupted`` and exit 130 (no traceback either way)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from cellseg.errors import CellsegError

        previous = None
        if threading_is_main():
            previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            return func(*args, **kwargs)
        except CellsegError as exc:
            fail(str(exc), code=EXIT_FAILURE)
        except OSError as exc:  # a full or read-only disk while writing (not a bug): one line
            from cellseg.outputs import WRITE_ERRNOS

            reason = WRITE_ERRNOS.get(exc.errno or 0)
            if reason is None:
                raise
            fail(f"{reason} writing {exc.filename or 'an output'}", code=EXIT_FAILURE)
        except KeyboardInterrupt:
            fail("interrupted", code=EXIT_INTERRUPTED)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (click's test runner
    swaps it; a handler bound to the old stream would write to a closed file)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    """``warning: message`` (lower-case level, like the ``error:`` lines)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"{record.levelname.lower()}: {message}"


def configure_logging(verbose: int, quiet: bool) -> None:
    """Log records on stderr, one line each: warnings by default, info with ``-v``, debug with
    ``-vv``, errors only with ``-q``. Third-party loggers (tifffile, tiffslide, PIL, zarr,
    Python warnings) are silent unless ``-v``. Worker processes follow (environment)."""
    from cellseg.workers import LOG_LEVEL_ENV, THIRD_PARTY_ENV

    if quiet:
        level = logging.ERROR
    else:
        level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    if verbose == 0:
        handler.addFilter(lambda record: record.name.split(".")[0] in ("cellseg", "cli"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    if verbose == 0 and RESOURCE_TRACKER_WARNING not in sys.warnoptions:
        # After a kill -9, multiprocessing's resource tracker (a child that outlives us by a
        # moment to free our semaphores) warns about them in four lines: it is cleaning up as
        # designed. Its command line takes -W options from sys.warnoptions.
        sys.warnoptions.append(RESOURCE_TRACKER_WARNING)
    os.environ[LOG_LEVEL_ENV] = logging.getLevelName(level)
    os.environ[THIRD_PARTY_ENV] = "1" if verbose else "0"


device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the network runs; auto picks CUDA when available.",
)

tta_option = click.option(
    "--tta",
    is_flag=True,
    help="Test-time augmentation: average the 8 rotations/reflections of each tile "
    "(8x the model time; a little more accurate, see docs/RESULTS.md).",
)

precision_option = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="Network arithmetic. auto: bf16 where the hardware has it (CUDA with bf16, CPUs with "
    "AMX/AVX512-BF16), fp32 elsewhere. Sensitive ops always stay fp32 (docs/NOTES.md).",
)
