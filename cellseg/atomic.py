"""Atomic file writes: nothing half-written ever appears under a final name.

Every output of cellseg (GeoJSON, overlay, summary, provenance, ``cohort.csv``, checkpoints,
training state, the journal's ``progress.json``) is written through this module: the data goes to
a staged name in the same folder (``<name>.partial`` by default; same folder, so the rename never
crosses file systems), is flushed and fsynced, and only then renamed over the final name with
``os.replace`` (atomic on POSIX: a reader sees the old file or the new one, never a mix). On any
failure the staged file is removed and the error propagates unchanged, so callers keep turning
``OSError`` into their one-line ``OutputError`` (``cellseg.outputs.os_error_message``).

The staged name is fixed rather than random, so a writer killed mid-write leaves one file that
the next write of the same output replaces (no litter accumulates); the price is one writer per
final name at a time, which every caller has (a slide lock, the cohort lock, one training run).

``publish=False`` stops before the rename and leaves the complete file under its staged name:
whole-slide prediction renames all of a slide's staged outputs together, in a fixed order, once
every one is complete (``cellseg.predict._publish``).

* :class:`AtomicFile`: an open file object (``with AtomicFile(path, "w") as f: ...``), or, for
  streamed writers with their own lifetime, ``open()`` / ``commit()`` / ``abort()``.
* :func:`atomic_path`: the staged path, for libraries that write by file name (safetensors,
  ``torch.save``, PIL).
* :func:`write_atomic`: a whole ``str`` or ``bytes`` at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

log = logging.getLogger(__name__)

STAGED_SUFFIX = ".partial"


def staged_name(path: str | Path) -> Path:
    """The default staged name of ``path``: ``<name>.partial`` in the same folder."""
    path = Path(path)
    return path.with_name(path.name + STAGED_SUFFIX)


def _fsync_file(path: Path) -> None:
    """Flushes ``path``'s data to disk (for files written by name by another library)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable; best effort (not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        log.debug("cannot fsync folder %s", folder, exc_info=True)
    finally:
        os.close(fd)


def _publish(staged: Path, path: Path) -> None:
    os.replace(staged, path)
    _fsync_folder(path.parent)


class AtomicFile:
    """A file written under a staged name and renamed to ``path`` when complete.

    As a context manager it yields the open file; a clean exit commits (flush, fsync, close,
    rename), an exception aborts (close, remove the staged file) and propagates.

    Args:
        path: the final name.
        mode: a write mode for :func:`open` (``"w"``, ``"wb"``, ...).
        staged: where to write (default ``<path>.partial``); must be in ``path``'s folder.
        publish: rename to ``path`` on commit; False leaves the complete file at ``staged``
            (the caller renames it, e.g. together with other outputs).
        **open_kwargs: passed to :func:`open` (``encoding``, ``newline``).
    """

    def __init__(
        self,
        path: str | Path,
        mode: str = "wb",
        *,
        staged: str | Path | None = None,
        publish: bool = True,
        **open_kwargs: Any,
    ) -> None:
        if not any(c in mode for c in "wax") or "r" in mode:
            raise ValueError(f"AtomicFile needs a write mode, got {mode!r}")
        self.path = Path(path)
        self.staged = Path(staged) if staged is not None else staged_name(self.path)
        self.publish = publish
        self.mode = mode
        self.open_kwargs = open_kwargs
        self.file: IO[Any] | None = None

    def open(self) -> IO[Any]:
        """Creates (truncates) the staged file and returns it open for writing."""
        self.file = open(self.staged, self.mode, **self.open_kwargs)  # noqa: SIM115 (commit/abort)
        return self.file

    def commit(self) -> Path:
        """Flushes, fsyncs and closes the file, then renames it to ``path`` (``publish``).

        Returns the file written (``path``, or ``staged`` without ``publish``). On failure (a
        full disk while flushing) the staged file is removed and the error propagates.
        """
        if self.file is None:
            raise RuntimeError(f"{self.staged}: not open")
        try:
            self.file.flush()
            os.fsync(self.file.fileno())  # the rename must not publish unwritten data
            self.file.close()
            self.file = None
            if not self.publish:
                return self.staged
            _publish(self.staged, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Discards everything written; nothing appears under ``path``."""
        if self.file is not None:
            try:
                self.file.close()
            except (OSError, ValueError):  # a full disk refuses the last flush too
                log.debug("ignored error closing %s", self.staged, exc_info=True)
            self.file = None
        self.staged.unlink(missing_ok=True)

    def __enter__(self) -> IO[Any]:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@contextlib.contextmanager
def atomic_path(
    path: str | Path, *, staged: str | Path | None = None, publish: bool = True
) -> Iterator[Path]:
    """Yields the staged path for a library that writes by file name; on a clean exit the file
    is fsynced and renamed to ``path`` (unless ``publish`` is False), on an exception removed.

    Example: ``with atomic_path(out) as tmp: save_file(tensors, str(tmp))``.
    """
    path = Path(path)
    target = Path(staged) if staged is not None else staged_name(path)
    try:
        yield target
        _fsync_file(target)
        if publish:
            _publish(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def write_atomic(
    path: str | Path,
    data: str | bytes,
    *,
    staged: str | Path | None = None,
    publish: bool = True,
    encoding: str = "utf-8",
) -> Path:
    """Writes ``data`` (text in ``encoding``, or bytes) atomically; returns the file written
    (``path``, or the staged name without ``publish``)."""
    raw = data.encode(encoding) if isinstance(data, str) else data
    writer = AtomicFile(path, "wb", staged=staged, publish=publish)
    with writer as f:
        f.write(raw)
    return writer.staged if not publish else writer.path
