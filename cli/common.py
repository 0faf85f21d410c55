"""Shared helpers of the click commands: one-line errors and lazy imports."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import click


def fail(message: str, code: int = 2) -> None:
    """Prints ``error: message`` on stderr and exits non-zero, without a traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def user_errors(func: Callable) -> Callable:
    """Turns expected failures (``CellsegError``, bad files) into one line on stderr."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from cellseg.errors import CellsegError

        try:
            return func(*args, **kwargs)
        except CellsegError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper


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
