"""Exceptions for expected user-facing failures.

Each carries a one-line message naming the offending file or option, so the command line can print
it as ``error: <message>`` and exit non-zero without a traceback.
"""


class CellsegError(Exception):
    """Base class for expected, user-facing failures."""


class DataError(CellsegError):
    """A dataset folder or one of its files is missing, unreadable or inconsistent."""


class SlideError(CellsegError):
    """A slide cannot be opened or read, or its resolution (mpp) is unknown."""


class ModelError(CellsegError):
    """A model checkpoint is missing, unreadable or incompatible."""


class OutputError(CellsegError):
    """An output cannot be written: read-only or full disk, no permission, two outputs clash."""


class BusyError(CellsegError):
    """Another process holds the slide's lock (it is being processed right now)."""
