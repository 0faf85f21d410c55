"""Safe outputs for whole-slide prediction: checks before work, a per-slide lock, provenance.

* :func:`output_conflicts` and :func:`check_writable` run before a slide is read: two outputs
  that share a path, an output that is an input, or a folder that cannot be written are refused
  with one line instead of failing (or silently overwriting) later.
* :class:`SlideLock` is an atomic lock file beside the outputs (``O_CREAT | O_EXCL``, holding
  pid, host and start time; its mtime is a heartbeat), so two processes, on one machine or on a
  cluster sharing the folder, never process the same slide. A lock whose owner died (its pid is
  gone on this host, or its heartbeat is older than ``LOCK_STALE_S``) is taken over.
* :func:`provenance` is what the outputs were made from (input file identity, model, every
  option that changes the result); it is saved beside the outputs, and a later run skips a slide
  only when it matches (:func:`provenance_differences` says why not).
* :func:`os_error_message` turns a full or read-only disk into one line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .errors import BusyError, OutputError

log = logging.getLogger(__name__)

LOCK_HEARTBEAT_S = 30.0  # the lock file's mtime is refreshed this often while a slide runs
LOCK_STALE_S = 600.0  # a lock not refreshed for this long belongs to a dead (remote) process
IDENTITY_SAMPLE_BYTES = 1 << 20  # hashed at the start, middle and end of an input file
# errno values that mean "this output cannot be written" rather than a bug.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


# ------------------------------------------------------------------------------- before work


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    with contextlib.suppress(OSError):
        return a.exists() and b.exists() and os.path.samefile(a, b)
    return False


def output_conflicts(outputs: Sequence[Path], inputs: Iterable[Path]) -> str | None:
    """Why this set of output paths is unsafe (two share a path, one is an input), or None."""
    resolved: dict[Path, Path] = {}
    for path in outputs:
        key = path.resolve()
        if key in resolved:
            return f"{resolved[key]} and {path} are the same file; give each output its own path"
        resolved[key] = path
    for source in inputs:
        for path in outputs:
            if _same_file(path, source):
                return f"{path} is also an input; choose another output path"
    return None


def _existing_ancestor(path: Path) -> Path:
    for folder in [path, *path.parents]:
        if folder.exists():
            return folder
    return Path(path.anchor or ".")


def check_writable(paths: Iterable[Path]) -> None:
    """Raises OutputError naming the folder when an output's folder cannot be created or written.

    Writes and removes a probe file in the nearest existing folder of each output, which catches
    read-only mounts and permissions (``os.access`` is unreliable for root and network disks).
    Creates no folder.
    """
    probed: set[Path] = set()
    for path in paths:
        folder = _existing_ancestor(Path(path).absolute().parent)
        if folder in probed:
            continue
        probed.add(folder)
        if not folder.is_dir():
            raise OutputError(f"{folder}: not a folder, cannot write {path} there")
        probe = folder / f".cellseg-probe-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            reason = WRITE_ERRNOS.get(exc.errno or 0, exc.strerror or type(exc).__name__)
            raise OutputError(f"{folder}: cannot write here ({reason}), needed for {path}") from exc


def os_error_message(exc: OSError, folder: Path, kept: Path | None = None) -> str | None:
    """One line for an OSError that means "this output cannot be written", else None.

    ``folder`` is named when the error carries no file name (a failed ``write()``); ``kept``
    is the work folder that the next run resumes from.
    """
    reason = WRITE_ERRNOS.get(exc.errno or 0)
    if reason is None:
        return None
    where = exc.filename or folder
    hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix it"
    message = f"{reason} writing {where}; {hint} and the same command resumes"
    if kept is not None and Path(kept).exists():
        message += f" (the work so far is kept in {kept})"
    return message


# ----------------------------------------------------------------------------------- locking


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlideLock:
    """Exclusive lock of one slide's outputs: a file created with ``O_CREAT | O_EXCL``.

    Use as a context manager. Raises :class:`BusyError` when a live process holds it. While
    held, a daemon thread refreshes the file's mtime every ``LOCK_HEARTBEAT_S``; a lock whose
    pid is dead on this host, or whose mtime is older than ``LOCK_STALE_S``, is stale and taken
    over (renamed away atomically first, so two processes cannot both take it).
    """

    def __init__(self, path: Path, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or str(path)  # what is locked, for the BusyError message
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._made_dirs: list[Path] = []

    def owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def is_held(self) -> bool:
        """Whether a live process holds this lock right now."""
        return self.path.exists() and not self._is_stale()

    def _is_stale(self) -> bool:
        try:
            age_s = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age_s > LOCK_STALE_S:
            return True
        owner = self.owner()
        if owner is None:  # being written right now, or garbage: judge by its age
            return age_s > LOCK_HEARTBEAT_S
        same_host = owner.get("host") == socket.gethostname()
        return same_host and not _pid_alive(int(owner.get("pid", -1)))

    def _take_over(self) -> None:
        """Removes a stale lock unless another process replaced it meanwhile."""
        try:
            inode = self.path.stat().st_ino
            moved = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
            os.replace(self.path, moved)
        except FileNotFoundError:
            return
        if moved.stat().st_ino != inode:  # a fresh lock slipped in: put it back
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
        moved.unlink(missing_ok=True)
        log.info("%s: took over a stale lock", self.path)

    def acquire(self) -> None:
        # Folders made for the lock alone are removed with it if the run wrote nothing there.
        self._made_dirs = [
            d for d in [self.path.parent, *self.path.parent.parents] if not d.exists()
        ]
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(5):
            # Made again on every try: another slide's run sharing a new output folder removes
            # it when it ends having written nothing (_remove_made_dirs), possibly between
            # this mkdir and the open below; once the lock file is in it, rmdir cannot.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileNotFoundError:
                continue
            except FileExistsError:
                if not self._is_stale():
                    break
                self._take_over()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self._held = True
            self._thread = threading.Thread(
                target=self._heartbeat, name="cellseg-lock-heartbeat", daemon=True
            )
            self._thread.start()
            return
        self._remove_made_dirs()
        owner = self.owner() or {}
        since = time.strftime("%H:%M:%S", time.localtime(owner.get("started", 0)))
        raise BusyError(
            f"{self.label}: being processed by pid "
            f"{owner.get('pid', '?')} on {owner.get('host', '?')} since {since} "
            f"(lock {self.path}); skipped"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False
        self._remove_made_dirs()

    def _remove_made_dirs(self) -> None:
        for folder in self._made_dirs:  # innermost first; fails (kept) when not empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._made_dirs = []

    def __enter__(self) -> SlideLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# -------------------------------------------------------------------------------- provenance


def file_identity(path: Path) -> dict[str, Any]:
    """Size and a SHA-256 of up to three 1 MiB samples (start, middle, end) of ``path``.

    Cheap on multi-GB slides yet changes when the file is replaced by another scan or cut short;
    the mtime is left out on purpose, so a copied slide is still the same input. A MIRAX
    ``.mrxs`` also lists the names and sizes of the files in its data folder.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for start in sorted(
            {
                0,
                max(0, size // 2 - IDENTITY_SAMPLE_BYTES // 2),
                max(0, size - IDENTITY_SAMPLE_BYTES),
            }
        ):
            f.seek(start)
            digest.update(f.read(IDENTITY_SAMPLE_BYTES))
    identity = {"size": size, "sample_sha256": digest.hexdigest()}
    data_dir = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and data_dir.is_dir():  # MIRAX keeps its pixels beside
        identity["data_files"] = sorted(
            (f.name, f.stat().st_size) for f in data_dir.iterdir() if f.is_file()
        )
    return identity


# How a difference in each provenance field is explained to the user.
PROVENANCE_LABELS = {
    "input": "the input file changed",
    "model": "another model",
    "mpp": "--mpp",
    "roi": "--roi",
    "tta": "--tta",
    "tissue_mask": "--no-tissue-mask",
    "object_type": "--object-type",
    "cell_expansion_um": "--cell-expansion-um",
    "format": "outputs of an older cellseg (another output format)",
    "precision": "--precision",
    "postprocess": "post-processing parameters",
    "geometry": "tiling parameters",
    "outputs": "the set of outputs",
}


def provenance_differences(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What differs between recorded and current provenance, as short phrases ([] = same)."""
    if saved is None:
        return ["no provenance recorded (made by another program or an older cellseg)"]
    current = json.loads(json.dumps(current))  # tuples -> lists, as saved
    differences = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            label = PROVENANCE_LABELS.get(key, key)
            if key in ("input", "format", "model", "postprocess", "geometry", "outputs"):
                differences.append(label)
            else:
                differences.append(f"{label} {saved.get(key)!r} -> {current.get(key)!r}")
    return differences


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, data: dict[str, Any], partial: Path | None = None) -> Path:
    """Writes ``data`` to ``partial`` (default ``<path>.partial``), fsyncs, renames to ``path``
    unless ``partial`` was given (the caller publishes it). Returns the file written."""
    text = json.dumps(data, indent=2) + "\n"
    return write_atomic(path, text, staged=partial, publish=partial is None)
