"""The resume journal (cellseg.journal): commits, fingerprints and rollback of torn writes."""

from __future__ import annotations

import json

import shapely
from shapely.geometry import Polygon

from cellseg.journal import NUCLEI, PROGRESS, Journal, NucleusRecord

FINGERPRINT = {"slide": "/x/a.svs", "canvas": {"origin_xy": (0.0, 0.0)}}  # tuples as in asdict


def record(i: int) -> NucleusRecord:
    square = Polygon([(i, 0), (i + 1.25, 0), (i + 1.25, 1.5), (i, 1.5)])
    return NucleusRecord(i, square, {"Area µm^2": 0.46875, "Label": float(i)})


def test_records_round_trip_exactly():
    original = record(7)
    copy = NucleusRecord.from_json(original.to_json())
    assert copy.id == 7 and copy.measurements == original.measurements
    assert shapely.equals_exact(copy.polygon, original.polygon, tolerance=0)


def test_a_reopened_journal_continues_where_it_stopped(tmp_path):
    journal = Journal.open(tmp_path / "w", FINGERPRINT)
    assert not journal.resumed and journal.next_id == 1
    journal.record_region([record(1), record(2)], next_id=3, counters={"seconds": 1.5})
    journal.record_region([], next_id=3, counters={"seconds": 2.0})
    journal.close()
    again = Journal.open(tmp_path / "w", FINGERPRINT)
    assert again.resumed and again.regions_done == 2 and again.next_id == 3
    assert again.counters == {"seconds": 2.0}
    assert [r.id for r in again.nuclei()] == [1, 2]


def test_bytes_of_an_uncommitted_region_are_dropped(tmp_path):
    journal = Journal.open(tmp_path / "w", FINGERPRINT)
    journal.record_region([record(1)], next_id=2, counters={})
    journal.close()
    with open(tmp_path / "w" / NUCLEI, "a") as f:  # a region killed before its commit
        f.write(record(2).to_json() + "\n" + '{"id": 3, "ri')
    again = Journal.open(tmp_path / "w", FINGERPRINT)
    assert [r.id for r in again.nuclei()] == [1]
    again.record_region([record(2)], next_id=3, counters={})
    assert [r.id for r in again.nuclei()] == [1, 2]


def test_another_fingerprint_starts_afresh(tmp_path):
    journal = Journal.open(tmp_path / "w", FINGERPRINT)
    journal.record_region([record(1)], next_id=2, counters={})
    journal.close()
    (tmp_path / "w" / "leftover.bin").write_bytes(b"x")
    other = Journal.open(tmp_path / "w", {**FINGERPRINT, "slide": "/x/b.svs"})
    assert not other.resumed and other.regions_done == 0 and list(other.nuclei()) == []
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [NUCLEI, PROGRESS]
    saved = json.loads((tmp_path / "w" / PROGRESS).read_text())
    assert saved["fingerprint"]["slide"] == "/x/b.svs"


def test_remove_deletes_the_work_folder(tmp_path):
    journal = Journal.open(tmp_path / "w", FINGERPRINT)
    journal.remove()
    assert not (tmp_path / "w").exists()
