"""The resume journal of one slide's prediction: completed regions and their nuclei.

Regions are labelled in raster order, so what a run has completed is a *prefix* of the regions:
the journal records its length, the next free nucleus id and how many bytes of ``nuclei.jsonl``
belong to it. Nuclei are appended (and fsynced) before ``progress.json`` is atomically replaced,
so a run killed at any moment leaves a journal that describes a consistent prefix; bytes past the
recorded length are an unfinished region and are truncated on resume. A restarted run with the
same inputs and parameters (its *fingerprint*) continues from there and ends with the same
nuclei, ids included, as an uninterrupted run.

Layout of the work folder: ``progress.json`` (fingerprint, ``regions_done``, ``next_id``,
``nuclei_bytes`` and running ``counters`` such as seconds spent) and ``nuclei.jsonl`` (one
nucleus per line: ``{"id", "rings", "measurements"}``, rings in QuPath level-0 pixels).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .records import NucleusRecord

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
NUCLEI = "nuclei.jsonl"


class Journal:
    """Progress of one slide in ``work_dir``; created fresh or resumed by :meth:`open`.

    Attributes:
        regions_done: regions completed, in raster order.
        next_id: the id the next nucleus gets (ids start at 1).
        counters: running totals over all sessions (e.g. ``seconds``), committed with regions.
        resumed: True when an earlier run's progress was picked up.
    """

    def __init__(self, work_dir: Path, fingerprint: dict[str, Any]) -> None:
        self.work_dir = Path(work_dir)
        # Compared with the saved copy, so give it the shape JSON gives it (tuples -> lists).
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.regions_done = 0
        self.next_id = 1
        self.nuclei_bytes = 0
        self.counters: dict[str, float] = {}
        self.resumed = False
        self.publishing: dict[str, Any] | None = None  # set once the outputs are being renamed
        self._nuclei_file = None

    @classmethod
    def open(cls, work_dir: Path, fingerprint: dict[str, Any]) -> Journal:
        """Resumes the journal in ``work_dir`` if its fingerprint matches, else starts afresh.

        A journal with another fingerprint (different slide file, model or parameters) is
        discarded with a warning, together with the rest of the work folder.
        """
        journal = cls(work_dir, fingerprint)
        saved = journal._load()
        if saved is not None and saved.get("fingerprint") != journal.fingerprint:
            log.warning("%s: parameters or inputs changed; starting this slide afresh", work_dir)
            saved = None
        if saved is None:
            shutil.rmtree(work_dir, ignore_errors=True)
            work_dir.mkdir(parents=True)
            journal._save()
        else:
            journal.regions_done = int(saved["regions_done"])
            journal.next_id = int(saved["next_id"])
            journal.nuclei_bytes = int(saved["nuclei_bytes"])
            journal.counters = dict(saved["counters"])
            journal.resumed = True
        nuclei_path = work_dir / NUCLEI
        nuclei_path.touch()
        # Bytes past the recorded length belong to a region that did not finish.
        os.truncate(nuclei_path, journal.nuclei_bytes)
        journal._nuclei_file = open(nuclei_path, "ab")  # noqa: SIM115 (closed by close())
        return journal

    def restart(self) -> None:
        """Forgets all progress and empties the work folder (keeps the fingerprint)."""
        self.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        fresh = Journal.open(self.work_dir, self.fingerprint)
        self.__dict__.update(fresh.__dict__)

    def _load(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.work_dir / PROGRESS).read_text())
        except (OSError, ValueError):
            return None

    def _save(self) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "regions_done": self.regions_done,
            "next_id": self.next_id,
            "nuclei_bytes": self.nuclei_bytes,
            "counters": self.counters,
            "publishing": self.publishing,
        }
        write_atomic(self.work_dir / PROGRESS, json.dumps(state, indent=1))

    def mark_publishing(self, summary: dict[str, Any]) -> None:
        """Commits that every output is complete under its partial name and that renaming them
        has begun; a run killed from here on is finished by :func:`publishing_summary`'s caller
        without recomputing anything."""
        self.publishing = summary
        self._save()

    @staticmethod
    def publishing_summary(work_dir: Path) -> dict[str, Any] | None:
        """The summary of a run that was killed while renaming its outputs, else None."""
        try:
            state = json.loads((Path(work_dir) / PROGRESS).read_text())
        except (OSError, ValueError):
            return None
        summary = state.get("publishing") if isinstance(state, dict) else None
        return summary if isinstance(summary, dict) else None

    def record_region(
        self, nuclei: Iterable[NucleusRecord], next_id: int, counters: dict[str, float]
    ) -> None:
        """Appends one completed region's nuclei, then commits it (fsync, atomic progress)."""
        if self._nuclei_file is None:
            raise RuntimeError("journal is not open")
        data = "".join(record.to_json() + "\n" for record in nuclei).encode("utf-8")
        if data:
            self._nuclei_file.write(data)
            self._nuclei_file.flush()
            os.fsync(self._nuclei_file.fileno())
        self.nuclei_bytes = self._nuclei_file.tell()
        self.regions_done += 1
        self.next_id = next_id
        self.counters = dict(counters)
        self._save()

    def nuclei(self) -> Iterator[NucleusRecord]:
        """The committed nuclei, streamed from disk in id order."""
        with open(self.work_dir / NUCLEI, "rb") as f:
            consumed = 0
            for line in f:
                consumed += len(line)
                if consumed > self.nuclei_bytes:
                    break
                yield NucleusRecord.from_json(line.decode("utf-8"))

    def close(self) -> None:
        if self._nuclei_file is not None:
            self._nuclei_file.close()
            self._nuclei_file = None

    def remove(self) -> None:
        """Deletes the work folder (after the outputs were written, or after a data error)."""
        self.close()
        remove_work_dir(self.work_dir)


def remove_work_dir(work_dir: Path) -> None:
    """Deletes a work folder, ``progress.json`` first: a folder without it is left-over
    garbage that the next run removes (a kill during the removal leaves no half journal)."""
    (Path(work_dir) / PROGRESS).unlink(missing_ok=True)
    _test_hook("journal-removed")
    shutil.rmtree(work_dir, ignore_errors=True)


TEST_KILL_ENV = "CELLSEG_TEST_KILL_AT"


def _test_hook(point: str) -> None:
    """Kills this process with SIGKILL at ``point`` when ``CELLSEG_TEST_KILL_AT`` names it
    (the kill-and-resume tests; never set in normal use)."""
    if os.environ.get(TEST_KILL_ENV) == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
