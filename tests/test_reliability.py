"""Issue 13's remaining rows and issue 12's safe-concurrency parts, one test each: empty results
are never silent, provenance-checked skips, the slide lock, cohort.csv, logging, bugs that
surface as bugs, explicit invariant checks."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import cellseg.cli.predict as cli_predict
import numpy as np
import pytest
from cellseg.cli.main import cellseg
from click.testing import CliRunner
from oracle import DiscOracle, disc_image
from PIL import Image
from slides import make_pyramid_tiff

from cellseg import batch
from cellseg import slide as slide_module
from cellseg.batch import SlideJob, read_cohort, run_slide, update_cohort
from cellseg.errors import BusyError, OutputError
from cellseg.journal import Journal
from cellseg.outputs import LOCK_STALE_S, SlideLock
from cellseg.predict import PredictOptions, SlideOutputs, predict_slide

FAST = {"workers": 0, "label_workers": 0}


def opts(**overrides) -> PredictOptions:
    return PredictOptions(**{**FAST, **overrides})


@pytest.fixture
def oracle(monkeypatch):
    monkeypatch.setattr(cli_predict, "_load_predictor", lambda *a, **k: DiscOracle())
    from cellseg import predict

    monkeypatch.setattr(predict, "default_workers", lambda: 0)
    monkeypatch.setattr(predict, "default_label_workers", lambda: 0)


def discs(height: int, width: int, step: int = 50) -> np.ndarray:
    centres = [(y, x) for y in range(25, height - 20, step) for x in range(25, width - 20, step)]
    return disc_image(height, width, centres)[0]


@pytest.fixture(scope="module")
def disc_slide(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("disc")
    return make_pyramid_tiff(folder / "disc.svs", discs(300, 300), 0.5, levels=1)


# ---------------------------------------------------------------- empty results are never silent


def test_a_greyscale_image_finds_its_tissue(tmp_path):
    grey = np.asarray(Image.fromarray(discs(400, 400)).convert("L"))
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    outputs = SlideOutputs(summary=tmp_path / "s.json")
    summary = predict_slide(path, DiscOracle(), outputs, opts(mpp=0.5))
    assert summary["tiles"] > 0 and summary["nuclei"] >= 30 and summary["warnings"] == []


def test_a_50_px_tissue_image_is_predicted(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(disc_image(50, 50, [(25, 25)])[0]).save(path)
    outputs = SlideOutputs(summary=tmp_path / "s.json")
    summary = predict_slide(path, DiscOracle(), outputs, opts(mpp=0.5))
    assert summary["nuclei"] == 1 and summary["tiles"] == 1


def test_a_blank_image_warns_no_tissue_and_says_so_in_the_summary(tmp_path, oracle):
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 600, 3), 255, np.uint8)).save(path)
    result = CliRunner().invoke(
        cellseg, ["predict", str(path), "--mpp", "0.5", "--summary", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no tissue found" in warnings[0]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["nuclei"] == 0 and "no tissue found" in summary["warnings"][0]


# ------------------------------------------------------------------------- provenance and skips


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"input": True}, "input file changed"),
        ({"mpp": 0.25}, "--mpp None -> 0.25"),
        ({"tta": True}, "--tta False -> True"),
        ({"tissue_mask": False}, "--no-tissue-mask True -> False"),
        ({"object_type": "cell", "cell_expansion_um": 3.0}, "--cell-expansion-um 0.0 -> 3.0"),
    ],
)
def test_outputs_are_skipped_only_when_the_provenance_matches(tmp_path, change, reason):
    path = make_pyramid_tiff(tmp_path / "a.svs", discs(300, 300), 0.5, levels=1)
    outputs = SlideOutputs(geojson=tmp_path / "out" / "a.geojson")
    first = predict_slide(path, DiscOracle(), outputs, opts())
    again = predict_slide(path, DiscOracle(), outputs, opts())
    assert again["skipped"] is True and again["nuclei"] == first["nuclei"]
    predictor = DiscOracle()
    if change.get("tta"):
        predictor.tta = True
    if change.get("input"):  # same name and size, another scan
        make_pyramid_tiff(path, discs(300, 300, step=60), 0.5, levels=1)
    options = opts(**{k: v for k, v in change.items() if k not in ("input", "tta")})
    with pytest.raises(OutputError, match="already exists") as error:
        predict_slide(path, predictor, outputs, options)
    assert reason in str(error.value) and "--overwrite" in str(error.value)
    redone = predict_slide(
        path, predictor, outputs, PredictOptions(**{**vars(options), "overwrite": True})
    )
    assert not redone.get("skipped")


def test_outputs_of_an_older_format_are_not_skipped(tmp_path):
    path = make_pyramid_tiff(tmp_path / "a.svs", discs(300, 300), 0.5, levels=1)
    outputs = SlideOutputs(geojson=tmp_path / "out" / "a.geojson")
    predict_slide(path, DiscOracle(), outputs, opts())
    record = json.loads(outputs.provenance_path.read_text())
    del record["provenance"]["format"]  # as written before the OME-Zarr layout
    outputs.provenance_path.write_text(json.dumps(record))
    with pytest.raises(OutputError, match="older cellseg"):
        predict_slide(path, DiscOracle(), outputs, opts())


def test_the_cli_says_why_a_slide_is_refused(tmp_path, disc_slide, oracle):
    out = tmp_path / "out"
    assert (
        CliRunner().invoke(cellseg, ["predict", str(disc_slide), "--out-dir", str(out)]).exit_code
        == 0
    )
    result = CliRunner().invoke(
        cellseg, ["predict", str(disc_slide), "--out-dir", str(out), "--mpp", "0.25"]
    )
    assert result.exit_code == 1 and "--mpp None -> 0.25" in result.stderr
    row = read_cohort(out / "cohort.csv")[0]
    assert row["status"] == "failed" and "--overwrite" in row["error"]


# ---------------------------------------------------------------------------------- the lock


def test_a_locked_slide_is_busy_and_a_dead_owner_is_taken_over(tmp_path, disc_slide):
    outputs = SlideOutputs(geojson=tmp_path / "n.geojson")
    with SlideLock(outputs.lock_path):
        with pytest.raises(BusyError, match=f"pid {os.getpid()}"):
            predict_slide(disc_slide, DiscOracle(), outputs, opts())
        row = run_slide(disc_slide, SlideJob(outputs, opts()), DiscOracle())
        assert row["status"] == "busy"
    assert not outputs.geojson.exists()
    # A lock left by a process that died on this host.
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": time.time()}
    outputs.lock_path.write_text(json.dumps(dead))
    assert predict_slide(disc_slide, DiscOracle(), outputs, opts())["nuclei"] > 0
    assert not outputs.lock_path.exists()


def test_a_lock_from_another_host_is_stale_only_after_its_heartbeat_timeout(tmp_path):
    lock = SlideLock(tmp_path / "x.cellseg-lock")
    record = {"pid": 1, "host": "elsewhere", "started": time.time()}
    lock.path.write_text(json.dumps(record))
    with pytest.raises(BusyError, match="elsewhere"):
        lock.acquire()
    old = time.time() - LOCK_STALE_S - 5
    os.utime(lock.path, (old, old))
    with lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists()


def test_a_lock_whose_new_folder_is_removed_by_another_run_is_still_taken(tmp_path, monkeypatch):
    """Two slides of a cohort run in one process (dask workers as threads) share a new output
    folder; one that ends having written nothing removes the folder (it made it), which can
    happen between the other's mkdir and its open: the open is retried, not an internal error.
    """
    import cellseg.outputs as outputs

    lock = SlideLock(tmp_path / "results" / "s0.geojson.cellseg-lock")
    real_open, calls = os.open, []

    def racing_open(path, flags, mode=0o777):
        calls.append(path)
        if len(calls) == 1:  # the other run's release lands right here
            Path(path).parent.rmdir()
        return real_open(path, flags, mode)

    monkeypatch.setattr(outputs.os, "open", racing_open)
    with lock:
        assert lock.path.is_file() and len(calls) == 2
    assert not lock.path.exists() and not lock.path.parent.exists()  # its own folder, cleaned


# ---------------------------------------------------------------------------------- cohort.csv


def test_cohort_rows_merge_by_slide_and_busy_never_replaces(tmp_path):
    path = tmp_path / "cohort.csv"
    row = dict.fromkeys(batch.COHORT_COLUMNS, "")
    update_cohort(path, [{**row, "slide": "/a.svs", "status": "done", "nuclei": 5}])
    update_cohort(path, [{**row, "slide": "/b.svs", "status": "failed", "error": "bad"}])
    update_cohort(path, [{**row, "slide": "/a.svs", "status": "busy"}])
    update_cohort(path, [{**row, "slide": "/b.svs", "status": "done", "nuclei": 7}])
    rows = read_cohort(path)
    assert [(r["slide"], r["status"], r["nuclei"]) for r in rows] == [
        ("/a.svs", "done", "5"),
        ("/b.svs", "done", "7"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.csv"]  # no lock, no partial


def test_an_unexpected_failure_is_retried_once_then_recorded(tmp_path, disc_slide, monkeypatch):
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("network share went away")
        return {"nuclei": 3, "tissue_area_mm2": 0.5, "slide_mpp": 0.5, "warnings": []}

    monkeypatch.setattr(batch, "predict_slide", flaky)
    job = SlideJob(SlideOutputs(geojson=tmp_path / "n.geojson"), opts())
    row = run_slide(disc_slide, job, DiscOracle())
    assert len(calls) == 2 and row["status"] == "done" and row["nuclei_per_mm2"] == 6.0
    calls.clear()
    monkeypatch.setattr(batch, "predict_slide", lambda *a, **k: 1 / 0)
    row = run_slide(disc_slide, job, DiscOracle())
    assert row["status"] == "failed" and "internal error: ZeroDivisionError" in row["error"]


def test_the_job_pickles_and_runs_without_a_loaded_model(tmp_path, disc_slide, monkeypatch):
    import pickle

    job = SlideJob(SlideOutputs(geojson=tmp_path / "n.geojson"), opts(), model_path=None)
    monkeypatch.setattr(batch, "cached_predictor", lambda *a: DiscOracle())
    row = pickle.loads(pickle.dumps(run_slide))(disc_slide, pickle.loads(pickle.dumps(job)))
    assert row["status"] == "done" and int(row["nuclei"]) > 0


def test_overlays_in_batch_mode(tmp_path, disc_slide, oracle):
    other = make_pyramid_tiff(tmp_path / "other.svs", discs(300, 300), 0.5, levels=1)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cellseg, ["predict", str(disc_slide), str(other), "--out-dir", str(out), "--overlays"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "disc.png").stat().st_size > 0 and (out / "other.png").stat().st_size > 0


# -------------------------------------------------------------------- logging, bugs, invariants


def test_third_party_log_lines_only_with_verbose(capsys):
    from cellseg.cli.common import configure_logging

    try:
        for verbose, expected in [
            (0, ["warning: ours"]),
            (1, ["warning: ours", "warning: theirs"]),
        ]:
            configure_logging(verbose, quiet=False)
            logging.getLogger("cellseg.slide").warning("ours")
            logging.getLogger("tifffile").warning("theirs")
            assert capsys.readouterr().err.splitlines() == expected
        configure_logging(0, quiet=True)
        logging.getLogger("cellseg.slide").warning("ours")
        assert capsys.readouterr().err == ""
    finally:
        logging.getLogger().handlers.clear()
        logging.captureWarnings(False)


def test_info_logs_the_mpp_source_and_the_level(tmp_path, disc_slide, oracle):
    result = CliRunner().invoke(
        cellseg, ["-v", "predict", str(disc_slide), "--out", str(tmp_path / "n.geojson")]
    )
    assert result.exit_code == 0
    assert "0.5 µm/px from openslide.mpp-x" in result.stderr
    assert "pyramid level 0" in result.stderr


def test_verbosity_flags_work_after_the_sub_command_too(tmp_path, disc_slide, oracle):
    try:
        late = CliRunner().invoke(
            cellseg, ["predict", str(disc_slide), "--out", str(tmp_path / "a.geojson"), "-v"]
        )
        assert late.exit_code == 0, late.output
        assert "0.5 µm/px from openslide.mpp-x" in late.stderr
        both = CliRunner().invoke(
            cellseg, ["-v", "predict", str(disc_slide), "--out", str(tmp_path / "b.geojson"), "-q"]
        )
        assert both.exit_code == 2
        assert both.stderr.splitlines() == [
            "error: -v and -q contradict each other (see 'cellseg predict --help')"
        ]
        assert not (tmp_path / "b.geojson").exists()
    finally:
        logging.getLogger().handlers.clear()
        logging.captureWarnings(False)


def test_a_bug_inside_slide_reading_is_not_called_a_bad_slide(disc_slide, monkeypatch):
    def buggy(self, level, xy_level, size_xy):
        raise KeyError("a bug, not a broken file")

    monkeypatch.setattr(slide_module._OpenSlideLikeReader, "read_level", buggy)
    with slide_module.open_slide(disc_slide) as slide, pytest.raises(KeyError):
        slide.read_region_at_mpp((0, 0), (64, 64), 0.5)


def test_a_decoder_error_is_still_a_slide_error(disc_slide, monkeypatch):
    import imagecodecs

    def broken(self, level, xy_level, size_xy):
        raise imagecodecs.JpegError("bad Huffman table")

    monkeypatch.setattr(slide_module._OpenSlideLikeReader, "read_level", broken)
    with (
        slide_module.open_slide(disc_slide) as slide,
        pytest.raises(slide_module.SlideError, match="bad Huffman table"),
    ):
        slide.read_region_at_mpp((0, 0), (64, 64), 0.5)


def test_invariants_are_checked_without_assert(tmp_path):
    journal = Journal.open(tmp_path / "w", {"a": 1})
    journal.close()
    with pytest.raises(RuntimeError, match="not open"):
        journal.record_region([], 1, {})
    source = Path(slide_module.__file__).parent
    offenders = [p.name for p in source.glob("*.py") if "\n    assert " in p.read_text()]
    assert offenders == []


def test_evaluate_draws_no_progress_bar_off_a_terminal(tmp_path):
    pytest.importorskip("torch")
    image = disc_image(64, 64, [(32, 32)])[0]
    Image.fromarray(image).save(tmp_path / "a.tif")
    vertices = "".join(
        f'<Vertex X="{32 + 9 * np.cos(t):.2f}" Y="{32 + 9 * np.sin(t):.2f}"/>'
        for t in np.linspace(0, 2 * np.pi, 16, endpoint=False)
    )
    (tmp_path / "a.xml").write_text(
        '<Annotations MicronsPerPixel="0.5"><Annotation><Regions><Region Id="1"><Vertices>'
        f"{vertices}</Vertices></Region></Regions></Annotation></Annotations>"
    )
    args = ["evaluate", "--data", str(tmp_path), "--device", "cpu", "--protocol", "paper"]
    result = CliRunner().invoke(cellseg, args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no tqdm bar: stderr is not a terminal
