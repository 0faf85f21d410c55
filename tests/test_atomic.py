"""The one atomic-write helper (cellseg.atomic): all or nothing under the final name."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cellseg.atomic import AtomicFile, atomic_path, staged_name, write_atomic


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_success_replaces_the_old_file_and_leaves_no_staged_file(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    path.write_text("old")
    inode_old = path.stat().st_ino
    assert write_atomic(path, '{"new": 1}') == path
    assert path.read_text() == '{"new": 1}'
    assert path.stat().st_ino != inode_old  # a new file renamed over the old one, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_final_name_keeps_the_old_content_until_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "cohort.csv"
    path.write_text("old\n")
    with AtomicFile(path, "w", newline="") as f:
        f.write("new\n")
        f.flush()
        assert path.read_text() == "old\n"  # readers see the old file while writing
        assert staged_name(path).read_text() == "new\n"
    assert path.read_text() == "new\n"
    assert not staged_name(path).exists()


def test_an_exception_while_writing_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "n.png"
    with pytest.raises(RuntimeError, match="killed"), AtomicFile(path, "wb") as f:
        f.write(b"half a picture")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_an_exception_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "best.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("serialiser failed")
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_disk_full_propagates_the_oserror_and_leaves_no_litter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The errno survives (callers turn it into their one-line OutputError) and neither the
    final name nor the staged name is left behind."""
    path = tmp_path / "summary.json"
    if where == "write":  # what a write() on a full disk raises inside the block
        with pytest.raises(OSError) as raised, AtomicFile(path, "wb") as f:
            f.write(b"x")
            _disk_full()
    else:
        monkeypatch.setattr(f"cellseg.atomic.os.{where}", _disk_full)
        with pytest.raises(OSError) as raised:
            write_atomic(path, "data")
    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_fsyncs_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A file written by name by another library is fsynced before it is published."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        "cellseg.atomic.os.fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1]
    )
    monkeypatch.setattr(
        "cellseg.atomic.os.replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    path = tmp_path / "last_state.pt"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent  # same folder: the rename cannot cross file systems
        tmp.write_bytes(b"state")
    assert path.read_bytes() == b"state"
    assert events[:2] == ["fsync", "replace"]


def test_unpublished_files_stay_under_the_staged_name(tmp_path: Path) -> None:
    """publish=False is predict's staged-publish protocol: complete, but not yet renamed."""
    path = tmp_path / "n.geojson"
    staged = tmp_path / "elsewhere.partial"
    assert write_atomic(path, "{}", staged=staged, publish=False) == staged
    assert staged.read_text() == "{}" and not path.exists()


def test_only_write_modes_are_accepted(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="write mode"):
        AtomicFile(tmp_path / "x", "r+")
