"""The whole-slide pipeline (cellseg.predict) on synthetic slides with an oracle model.

Slides are 0.5 µm/px and read at the oracle's 0.5 µm/px; small blocks (384 px) and Zarr chunks
(256 px) put many seams into a 600×900 slide (2×3 regions). Discs painted ON every tile, block,
region (block seams less the 64 px halo) and chunk seam must each come out exactly once, uncut:
the same polygon as the disc alone gives, the same pixels in the Zarr labels.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from oracle import INTERIOR_RGB, RIM_RGB, DiscOracle, QuarterOracle, disc_image, seam_centres
from slides import make_pyramid_tiff

from cellseg import predict as predict_module
from cellseg.errors import CellsegError, SlideError
from cellseg.geojson import mask_polygon
from cellseg.instances import PostProcess
from cellseg.journal import Journal
from cellseg.measurements import stain_amounts
from cellseg.predict import PredictOptions, SlideOutputs, predict_slide
from cellseg.slide import open_slide
from cellseg.store import to_uint8

MPP = 0.5
HEIGHT, WIDTH = 600, 900
# Tile seams (stride 192, overlap band to +32), block seams (384), region seams (384·k - 64)
# and chunk seams (256).
SEAMS = [192, 224, 256, 320, 384, 416, 512, 576, 608, 704, 768, 800]
FAST = {
    "region_px": 384,
    "chunk_px": 256,
    "workers": 0,
    "label_workers": 0,
    "batch_size": 7,
    "overlap_px": 32,  # the seams above are laid out for stride 192
}


def options(**overrides) -> PredictOptions:
    return PredictOptions(**{**FAST, **overrides})


def outputs_in(folder: Path, **kinds: bool) -> SlideOutputs:
    names = {"geojson": "n.geojson", "zarr": "n.zarr", "overlay": "o.png", "summary": "s.json"}
    chosen = kinds or dict.fromkeys(names, True)
    return SlideOutputs(**{k: folder / names[k] for k, on in chosen.items() if on})


def features(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


def by_label(path: Path) -> dict[int, dict]:
    return {int(f["properties"]["measurements"]["Label"]): f for f in features(path)}


@pytest.fixture(scope="module")
def seam_slide(tmp_path_factory):
    image, truth = disc_image(HEIGHT, WIDTH, seam_centres(HEIGHT, WIDTH, SEAMS))
    path = make_pyramid_tiff(tmp_path_factory.mktemp("seam") / "seam.svs", image, MPP, levels=1)
    return path, truth


@pytest.fixture(scope="module")
def seam_run(seam_slide, tmp_path_factory):
    """One uninterrupted reference run with every output."""
    path, _ = seam_slide
    out = tmp_path_factory.mktemp("seam_out")
    summary = predict_slide(path, DiscOracle(), outputs_in(out), options())
    return out, summary


def test_seam_discs_are_found_once_and_never_cut(seam_slide, seam_run):
    _, truth = seam_slide
    out, summary = seam_run
    n_discs = int(truth.max())
    assert n_discs > 150 and summary["nuclei"] == n_discs
    labels = zarr.open_group(str(out / "n.zarr"), mode="r")["labels/nuclei/0"][:]
    np.testing.assert_array_equal(labels > 0, truth > 0)
    found = by_label(out / "n.geojson")
    assert sorted(found) == list(range(1, n_discs + 1))  # ids 1..n, no gaps, no repeats
    for disc in range(1, n_discs + 1):
        ids = np.unique(labels[truth == disc])
        assert len(ids) == 1, f"disc {disc} was cut into ids {ids}"
        assert np.count_nonzero(labels == ids[0]) == np.count_nonzero(truth == disc)
        rows, cols = np.nonzero(truth == disc)
        crop = truth[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] == disc
        expected = mask_polygon(crop, (cols.min(), rows.min()), 1.0)
        got = shapely.geometry.shape(found[int(ids[0])]["geometry"])
        assert shapely.equals_exact(got, expected, tolerance=0), f"disc {disc} outline differs"


def test_seams_really_cross_the_discs(seam_slide):
    """Guards the test above: discs straddle block, tile and chunk borders."""
    _, truth = seam_slide
    for seam in (384, 320, 192, 256):  # a block, a region, a tile and a chunk seam
        assert np.intersect1d(truth[:, seam - 1], truth[:, seam])[1:].size > 5
        assert np.intersect1d(truth[seam - 1, :], truth[seam, :])[1:].size > 5


def test_probability_map_equals_the_oracle_on_the_whole_slide(seam_slide, seam_run):
    _, truth = seam_slide
    out, _ = seam_run
    probability = zarr.open_group(str(out / "n.zarr"), mode="r")["0"][:]
    np.testing.assert_array_equal(probability, np.where(truth > 0, 255, 0))


@pytest.mark.parametrize("scale", [1, 2])
def test_graded_probability_round_trip(tmp_path, scale):
    """QuarterOracle, no tissue mask; scale 2 reads a 0.25 µm/px pyramid at 0.5 µm/px. Zarr
    chunks are the blocks (the default), so blocks are written as whole chunks."""
    rng = np.random.default_rng(scale)
    blocks = rng.integers(0, 256, (300 // 6, 500 // 6 + 1, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(blocks, 6 * scale, axis=0), 6 * scale, axis=1)[:, : 500 * scale]
    path = make_pyramid_tiff(tmp_path / "q.svs", image, MPP / scale, levels=1)
    none = PostProcess(min_area_um2=1e6)  # random blocks: skip hundreds of pointless polygons
    opts = options(tissue_mask=False, overlap_px=48, postprocess=none, chunk_px=None)
    predict_slide(path, QuarterOracle(), outputs_in(tmp_path, zarr=True), opts)
    with open_slide(path) as slide:
        whole = slide.read_region_at_mpp((0, 0), (500, 300), MPP)
    expected = to_uint8(1.0 - QuarterOracle.probabilities(whole[None])[0, 0])
    group = zarr.open_group(str(tmp_path / "n.zarr"), mode="r")
    np.testing.assert_array_equal(group["0"][:], expected)
    assert group.attrs["scale_to_level0"] == scale and group.attrs["mpp"] == MPP
    assert group.attrs["tiling"]["region_px"] == 2 * (224 - 48)  # round(384 / 176) tiles
    assert group["0"].chunks == (300, 352)  # one block, clipped to the canvas height


def test_zarr_layout_and_attributes(seam_run):
    out, summary = seam_run
    group = zarr.open_group(str(out / "n.zarr"), mode="r")
    assert group.metadata.zarr_format == 2  # OME-NGFF 0.4
    assert sorted(group.keys()) == ["0", "1", "2", "labels"]  # working arrays removed
    assert sorted(group["labels/nuclei"].keys()) == ["0", "1", "2"]
    labels, probability = group["labels/nuclei/0"], group["0"]
    assert labels.dtype == np.uint32 and probability.dtype == np.uint8
    assert labels.chunks == (256, 256) and labels.shape == (HEIGHT, WIDTH)
    assert group["2"].shape == group["labels/nuclei/2"].shape == (150, 225)
    # Level 1: 2×2 means of level 0, and the top-left id of each 2×2 of the labels.
    level0 = probability[:].astype(np.int64)
    means = (level0.reshape(300, 2, 450, 2).sum(axis=(1, 3)) + 2) // 4
    np.testing.assert_array_equal(group["1"][:], means)
    np.testing.assert_array_equal(group["labels/nuclei/1"][:], labels[:][::2, ::2])
    attrs = dict(group.attrs)
    assert attrs["complete"] is True and attrs["nuclei"] == summary["nuclei"]
    assert attrs["mpp"] == MPP and attrs["scale_to_level0"] == 1.0
    assert attrs["origin_xy_level0"] == [0.0, 0.0] and attrs["bounds_xy"] == [0, 0, WIDTH, HEIGHT]
    assert attrs["tiling"]["tile_px"] == 224 and attrs["tiling"]["overlap_px"] == 32
    assert attrs["model"]["name"] == "DiscOracle" and attrs["cellseg_version"]


def test_ome_zarr_py_reads_the_pyramid_and_the_labels(seam_run):
    """What napari-ome-zarr does: ome-zarr-py's reader finds the image and its label image."""
    io = pytest.importorskip("ome_zarr.io")
    reader = pytest.importorskip("ome_zarr.reader")
    out, summary = seam_run
    nodes = list(reader.Reader(io.parse_url(str(out / "n.zarr")))())
    image = next(n for n in nodes if n.load(reader.Multiscales) and not n.load(reader.Label))
    label = next(n for n in nodes if n.load(reader.Label))
    assert [tuple(level.shape) for level in image.data] == [(600, 900), (300, 450), (150, 225)]
    assert [tuple(level.shape) for level in label.data] == [(600, 900), (300, 450), (150, 225)]
    for node in (image, label):
        assert [a["unit"] for a in node.metadata["axes"]] == ["micrometer", "micrometer"]
        scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
        assert scales == [[MPP, MPP], [2 * MPP, 2 * MPP], [4 * MPP, 4 * MPP]]
    assert int(label.data[0].max().compute()) == summary["nuclei"]
    assert image.metadata["name"] == "nucleus probability"
    assert label.metadata["name"] == "nuclei"
    models = pytest.importorskip("ome_zarr_models.v04")  # the spec's own schema
    models.Image.from_zarr(zarr.open_group(str(out / "n.zarr"), mode="r"))


def test_geojson_is_qupath_ready(seam_run):
    out, _ = seam_run
    collection = json.loads((out / "n.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    # Every disc is a rim of one colour around an interior of another, on pink background: the
    # stain measurements see exactly these pixels (the slide's pixels are aligned with the
    # labels at the seams of blocks, regions and chunks too).
    rim_od, interior_od = stain_amounts(np.array([RIM_RGB, INTERIOR_RGB], np.uint8))
    for feature in collection["features"]:
        assert uuid.UUID(feature["id"]).version == 5  # deterministic ids
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert (
            props["classification"]["name"] == "Nucleus"
            and len(props["classification"]["color"]) == 3
        )
        m = props["measurements"]
        assert m["Nucleus: Perimeter µm"] > 0 and m["Nucleus probability"] == 1.0
        polygon = shapely.geometry.shape(feature["geometry"])
        assert polygon.is_valid and shapely.set_precision(polygon, 0.01).equals(polygon)
        assert m["Nucleus: Area µm^2"] == pytest.approx(polygon.area * MPP**2)
        for column, stain in enumerate(("Hematoxylin", "Eosin")):
            low, high = sorted([rim_od[column], interior_od[column]])
            assert m[f"Nucleus: {stain} OD min"] == pytest.approx(low, abs=1e-5)
            assert m[f"Nucleus: {stain} OD max"] == pytest.approx(high, abs=1e-5)
            assert low < m[f"Nucleus: {stain} OD mean"] < high
        assert 0.85 < m["Nucleus: Circularity"] <= 1 and 0.9 < m["Nucleus: Solidity"] <= 1


def test_geopandas_reads_every_geometry_as_valid(seam_run):
    geopandas = pytest.importorskip("geopandas")
    out, summary = seam_run
    frame = geopandas.read_file(out / "n.geojson")
    assert len(frame) == summary["nuclei"] and frame.geometry.is_valid.all()


def test_summary_and_overlay(seam_run):
    out, summary = seam_run
    assert json.loads((out / "s.json").read_text()) == summary
    assert summary["mpp"] == MPP and summary["mpp_source"] == "openslide.mpp-x"
    assert summary["tiles"] == 3 * 5 and summary["tiles_skipped"] == 0
    assert summary["tissue_area_mm2"] == pytest.approx(HEIGHT * WIDTH * MPP**2 / 1e6, rel=0.1)
    assert summary["resumed"] is False and summary["seconds"] > 0
    from PIL import Image

    with Image.open(out / "o.png") as picture:
        assert picture.size == (WIDTH, HEIGHT)
        pixels = np.asarray(picture)
    assert np.all(pixels == (0, 255, 0), axis=-1).sum() > 1000  # green outlines were drawn
    assert not list(out.glob("*.partial")) and not list(out.glob("*.cellseg-work"))


def test_summary_says_where_the_time_went(seam_run):
    _, summary = seam_run
    stages = summary["stages"]
    assert stages["tiles_run"] == summary["tiles_run_this_session"] == summary["tiles"] == 15
    assert all(value >= 0 for key, value in stages.items() if key.endswith("_s"))
    busy = stages["stitch_busy_s"] + stages["label_busy_s"] + stages["commit_busy_s"]
    assert stages["post_busy_s"] == pytest.approx(busy, abs=3e-3)  # rounded to ms
    assert min(stages["model_busy_s"], stages["stitch_busy_s"], stages["label_busy_s"]) > 0
    # The inference thread's busy and waiting times are disjoint parts of the pipeline's time.
    inference = ("reader_wait_s", "batch_busy_s", "model_busy_s", "queue_wait_s")
    assert sum(stages[key] for key in inference) <= stages["wall_s"] + 2e-3 <= summary["seconds"]
    assert stages["tail_s"] <= stages["wall_s"]
    share = stages["model_busy_s"] / stages["wall_s"]
    assert stages["model_share"] == pytest.approx(share, abs=0.01)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc and ru_maxrss in KiB are Linux's")
def test_peak_rss_is_vmhwm_with_a_getrusage_fallback(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 9999 kB\nVmHWM:\t    3072 kB\nVmRSS:\t 10 kB\n")
    assert predict_module._peak_rss_mb(status) == 3.0
    fallback = predict_module._peak_rss_mb(tmp_path / "absent")
    ru_maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    assert fallback == pytest.approx(ru_maxrss_mb, abs=1)
    assert 0 < predict_module._peak_rss_mb() <= fallback + 1  # VmHWM never exceeds ru_maxrss


class PausingOracle(DiscOracle):
    """Holds its second model call until the first region is committed (or a timeout)."""

    def __init__(self, region_committed: threading.Event) -> None:
        super().__init__()
        self.region_committed = region_committed
        self.batches = 0
        self.labelled_during_inference = False

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.batches += 1
        if self.batches == 2:
            self.labelled_during_inference = self.region_committed.wait(timeout=60)
        return super().__call__(tiles)


def test_a_region_is_labelled_right_after_its_block(seam_slide, tmp_path):
    """Region (0, 0) needs block (0, 0) only, so it is committed while block (0, 1) is being
    predicted (batches of 4 tiles = one 2×2-tile block), long before its block row ends."""
    path, _ = seam_slide
    committed = threading.Event()
    oracle = PausingOracle(committed)

    def on_region(done: int, total: int) -> None:
        committed.set()

    opts = options(batch_size=4)
    predict_slide(path, oracle, outputs_in(tmp_path, geojson=True), opts, on_region=on_region)
    assert oracle.labelled_during_inference and oracle.batches == 4  # 4 + 4 + 4 + 3 tiles


def test_glass_tiles_are_never_run(tmp_path):
    centres = [(y, x) for y in range(30, HEIGHT - 30, 45) for x in range(30, 400, 45)]
    image, truth = disc_image(HEIGHT, WIDTH, centres)
    image[:, 450:] = 255  # glass
    path = make_pyramid_tiff(tmp_path / "half.svs", image, MPP, levels=1)
    oracle = DiscOracle()
    summary = predict_slide(path, oracle, outputs_in(tmp_path, geojson=True), options())
    assert summary["nuclei"] == truth.max()
    assert summary["tiles_skipped"] >= 3 and oracle.calls == summary["tiles"] < 15
    assert summary["tissue_area_mm2"] < 0.6 * HEIGHT * WIDTH * MPP**2 / 1e6


def test_roi_is_in_qupath_coordinates_and_bounds_are_subtracted(seam_slide, tmp_path, monkeypatch):
    path, truth = seam_slide
    real_open = predict_module.open_slide

    def open_with_bounds(*args, **kwargs):
        slide = real_open(*args, **kwargs)
        slide.bounds_xy = (100, 50, 700, 600)  # as OpenSlide reports for e.g. MIRAX
        return slide

    monkeypatch.setattr(predict_module, "open_slide", open_with_bounds)
    roi = (200, 100, 300, 250)  # QuPath frame: level-0 x 300..600, y 150..400
    opts = options(roi_xywh=roi)
    summary = predict_slide(path, DiscOracle(), outputs_in(tmp_path, geojson=True), opts)
    assert summary["area_xywh_level0"] == [300, 150, 300, 250]
    found: dict[int, shapely.Polygon] = {}
    for feature in features(tmp_path / "n.geojson"):
        polygon = shapely.geometry.shape(feature["geometry"])
        x, y = polygon.centroid.x + 100, polygon.centroid.y + 50  # back to level 0
        assert 300 <= x < 600 and 150 <= y < 400
        disc = int(truth[int(y), int(x)])
        assert disc > 0 and disc not in found  # on a disc of the slide, once
        found[disc] = polygon
    inside = 0
    for disc in range(1, truth.max() + 1):
        rows, cols = np.nonzero(truth == disc)
        if rows.min() >= 150 and rows.max() < 400 and cols.min() >= 300 and cols.max() < 600:
            inside += 1
            crop = truth[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] == disc
            expected = mask_polygon(crop, (cols.min(), rows.min()), 1.0, (100, 50))
            assert shapely.equals_exact(found[disc], expected, tolerance=0)
    assert inside > 20


class Interrupt(Exception):
    pass


def interrupt_after(regions: int):
    def on_region(done: int, total: int) -> None:
        if done == regions:
            raise Interrupt(f"stopped after {done} of {total} regions")

    return on_region


def assert_same_results(a: Path, b: Path) -> None:
    fa, fb = by_label(a / "n.geojson"), by_label(b / "n.geojson")
    assert fa.keys() == fb.keys()
    for label in fa:
        assert fa[label]["geometry"] == fb[label]["geometry"]
        assert fa[label]["properties"]["measurements"] == fb[label]["properties"]["measurements"]
    za, zb = (zarr.open_group(str(p / "n.zarr"), mode="r") for p in (a, b))
    for name in ("labels/nuclei/0", "0", "labels/nuclei/1", "1"):
        np.testing.assert_array_equal(za[name][:], zb[name][:])


# Region (1, 2) needs blocks (0, 1), (0, 2), (1, 1), (1, 2): 4 + 2 + 2 + 1 tiles. Regions from
# (0, 2) on need every block (region (1, 0) needs block (0, 0)).
@pytest.mark.parametrize("regions_done, tiles_again", [(2, 15), (5, 9)])
def test_an_interrupted_run_resumes_to_the_same_nuclei(
    seam_slide, seam_run, tmp_path, regions_done, tiles_again
):
    path, _ = seam_slide
    reference, _ = seam_run
    outputs = outputs_in(tmp_path, geojson=True, zarr=True)
    with pytest.raises(Interrupt):
        on_region = interrupt_after(regions_done)
        predict_slide(path, DiscOracle(), outputs, options(), on_region=on_region)
    assert outputs.existing() == [] and outputs.is_resumable()
    assert not (tmp_path / "n.geojson.partial").exists()  # the writer discarded its file
    progress = json.loads((outputs.work_dir / "progress.json").read_text())
    assert progress["regions_done"] == regions_done and progress["next_id"] > 20
    oracle = DiscOracle()
    summary = predict_slide(path, oracle, outputs, options())
    assert summary["resumed"] is True and summary["tiles"] == 15
    assert oracle.calls == tiles_again  # only the unfinished regions' blocks again
    assert_same_results(reference, tmp_path)
    assert not outputs.work_dir.exists() and not outputs.zarr_partial.exists()


def test_a_run_with_tta_never_resumes_a_run_without(seam_slide, tmp_path):
    path, _ = seam_slide
    outputs = outputs_in(tmp_path, geojson=True, zarr=True)
    with pytest.raises(Interrupt):
        predict_slide(path, DiscOracle(), outputs, options(), on_region=interrupt_after(2))
    assert outputs.is_resumable()
    averaging = DiscOracle()
    averaging.tta = True  # another predictor: its partial results must not be mixed in
    summary = predict_slide(path, averaging, outputs, options())
    assert summary["resumed"] is False and averaging.calls == summary["tiles"]
    assert summary["model"]["tta"] is True
    attrs = zarr.open_group(str(tmp_path / "n.zarr"), mode="r").attrs
    assert attrs["model"]["tta"] is True


def test_a_bf16_partial_run_is_never_resumed_in_fp32(seam_slide, tmp_path):
    path, _ = seam_slide
    outputs = outputs_in(tmp_path, geojson=True, zarr=True)
    half = DiscOracle()
    half.precision = "bf16"
    with pytest.raises(Interrupt):
        predict_slide(path, half, outputs, options(), on_region=interrupt_after(2))
    assert outputs.is_resumable()
    full = DiscOracle()
    full.precision = "fp32"
    summary = predict_slide(path, full, outputs, options())
    assert summary["resumed"] is False and full.calls == summary["tiles"]
    assert summary["model"]["precision"] == "fp32"
    attrs = zarr.open_group(str(tmp_path / "n.zarr"), mode="r").attrs
    assert attrs["model"]["precision"] == "fp32"


def test_a_kill_between_nuclei_and_progress_is_rolled_back(
    seam_slide, seam_run, tmp_path, monkeypatch
):
    path, _ = seam_slide
    reference, _ = seam_run
    outputs = outputs_in(tmp_path, geojson=True, zarr=True)
    real_save, calls = Journal._save, []

    def dying_save(self):
        calls.append(1)
        if len(calls) == 5:  # region 4's nuclei are on disk, its progress is not
            raise Interrupt("killed")
        real_save(self)

    monkeypatch.setattr(Journal, "_save", dying_save)
    with pytest.raises(Interrupt):
        predict_slide(path, DiscOracle(), outputs, options())
    monkeypatch.setattr(Journal, "_save", real_save)
    assert predict_slide(path, DiscOracle(), outputs, options())["resumed"] is True
    assert_same_results(reference, tmp_path)


def test_existing_outputs_need_overwrite(tmp_path):
    image, _ = disc_image(250, 250, [(100, 120)])
    path = make_pyramid_tiff(tmp_path / "one.svs", image, MPP, levels=1)
    outputs = outputs_in(tmp_path, summary=True)
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(CellsegError, match="already exists"):
        predict_slide(path, DiscOracle(), outputs, options())
    summary = predict_slide(path, DiscOracle(), outputs, options(overwrite=True))
    assert json.loads((tmp_path / "s.json").read_text())["nuclei"] == summary["nuclei"] == 1


@pytest.fixture(scope="module")
def bad_slides(tmp_path_factory) -> dict[str, Path]:
    tmp_path = tmp_path_factory.mktemp("bad")
    truncated = tmp_path / "truncated.svs"
    image, _ = disc_image(600, 600, [(300, 300)])
    no_mpp = make_pyramid_tiff(tmp_path / "no_mpp.svs", image[:300], None, levels=1)
    full = make_pyramid_tiff(tmp_path / "full.svs", image, MPP, levels=1, tile_px=128).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])  # header intact, tile data missing
    (tmp_path / "garbage.svs").write_bytes(b"not a slide at all" * 100)
    return {
        "no mpp": no_mpp,
        "truncated": truncated,
        "garbage": tmp_path / "garbage.svs",
        "missing": tmp_path / "missing.svs",
    }


@pytest.mark.parametrize("case", ["no mpp", "truncated", "garbage", "missing"])
@pytest.mark.parametrize("tissue", [True, False])
def test_bad_slides_raise_one_line_and_leave_nothing(bad_slides, tmp_path, case, tissue):
    slide = bad_slides[case]
    out = tmp_path / "out"
    with pytest.raises(SlideError) as error:
        predict_slide(slide, DiscOracle(), outputs_in(out), options(tissue_mask=tissue))
    message = str(error.value)
    assert "\n" not in message and slide.name in message
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("name", ["broken/unopenable.tiff", "broken/unreadable.svs"])
def test_openslide_broken_fixtures(shared_wsi_dir, tmp_path, name):
    with pytest.raises(SlideError, match=Path(name).name):
        predict_slide(shared_wsi_dir / name, DiscOracle(), outputs_in(tmp_path / "o"), options())
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_worker_processes_give_the_same_result(seam_slide, seam_run, tmp_path):
    path, _ = seam_slide
    reference, _ = seam_run
    opts = options(workers=1, label_workers=1, batch_size=16)
    predict_slide(path, DiscOracle(), outputs_in(tmp_path, geojson=True, zarr=True), opts)
    assert_same_results(reference, tmp_path)


def test_two_identical_runs_give_byte_identical_geojson(seam_slide, seam_run, tmp_path):
    """Feature ids are uuid5 of the slide's content hash and the nucleus; nothing else in the
    file (timestamps, key order, floats) varies between runs, inline or in worker processes."""
    path, _ = seam_slide
    out, _ = seam_run
    again = outputs_in(tmp_path, geojson=True)
    predict_slide(path, DiscOracle(), again, options(label_workers=1))
    assert (tmp_path / "n.geojson").read_bytes() == (out / "n.geojson").read_bytes()
    ids = [f["id"] for f in features(out / "n.geojson")]
    assert len(set(ids)) == len(ids)


def test_cells_grow_from_the_nuclei_without_overlapping(seam_slide, seam_run, tmp_path):
    """--object-type cell: each cell contains its nucleus, reaches at most the expansion
    beyond it, and never overlaps another cell, across region seams too (discs on the seams
    are 4 px apart or more, so 5 µm = 10 px expansions collide everywhere)."""
    path, _ = seam_slide
    out, _ = seam_run
    opts = options(object_type="cell", cell_expansion_um=5.0)
    predict_slide(path, DiscOracle(), outputs_in(tmp_path, geojson=True), opts)
    cells = features(tmp_path / "n.geojson")
    assert len(cells) == len(features(out / "n.geojson"))
    outlines = []
    for feature in cells:
        nucleus = shapely.geometry.shape(feature["nucleusGeometry"])
        cell = shapely.geometry.shape(feature["geometry"])
        assert feature["properties"]["objectType"] == "cell" and cell.is_valid
        assert cell.buffer(1e-6).contains(nucleus)
        assert nucleus.buffer(10 + 1.5).contains(cell)  # 10 px, plus the pixel outline
        m = feature["properties"]["measurements"]
        assert m["Cell: Area µm^2"] == pytest.approx(cell.area * MPP**2)
        assert m["Nucleus/Cell area ratio"] == pytest.approx(nucleus.area / cell.area, abs=1e-4)
        assert m["Cell: Eosin OD mean"] > 0 and m["Nucleus: Eosin OD mean"] > 0
        outlines.append(cell)
    tree = shapely.STRtree(outlines)
    left, right = tree.query(outlines, predicate="intersects")
    pairs = left < right
    overlap = shapely.area(
        shapely.intersection(np.take(outlines, left[pairs]), np.take(outlines, right[pairs]))
    )
    assert pairs.sum() > 50 and overlap.max() < 1e-6  # neighbours touch, never overlap


class MemoryCanvas:
    """A working canvas in numpy arrays (``cellseg.pipeline.WorkingCanvas``): no Zarr."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        self.probs = np.zeros((channels, height, width), np.float32)
        self.rgb = np.full((height, width, 3), 255, np.uint8)

    def write_cells(self, cells) -> None:
        for (y0, y1, x0, x1), probs in cells:
            self.probs[:, y0:y1, x0:x1] = probs

    def read_float(self, box) -> np.ndarray:
        y0, y1, x0, x1 = box
        return self.probs[:, y0:y1, x0:x1].copy()

    def write_pixels(self, box, rgb) -> None:
        y0, y1, x0, x1 = box
        self.rgb[y0:y1, x0:x1] = rgb

    def read_pixels(self, box) -> np.ndarray:
        y0, y1, x0, x1 = box
        return self.rgb[y0:y1, x0:x1].copy()


class MemorySink:
    """Keeps every committed region (``cellseg.pipeline.RegionSink``): no file at all."""

    wants_labels = True

    def __init__(self) -> None:
        self.commits = []

    def commit_region(self, region) -> None:
        self.commits.append(region)


def test_the_runner_knows_no_file_format(seam_slide, seam_run):
    """run_pipeline into an in-memory canvas and sink gives predict's nuclei, ids and all, in
    region order; pipeline.py imports none of the output modules."""
    import ast

    from cellseg import pipeline
    from cellseg.pipeline import PipelineSettings, run_pipeline
    from cellseg.predict import plan_slide

    tree = ast.parse(Path(pipeline.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"geojson", "store", "journal", "sinks", "overlay", "predict"}
    path, _ = seam_slide
    out, _ = seam_run
    with open_slide(path) as slide:
        plan = plan_slide(slide, DiscOracle(), options())
    canvas = MemoryCanvas(plan.num_classes, plan.layout.height_px, plan.layout.width_px)
    sink = MemorySink()
    settings = PipelineSettings(batch_size=7, workers=0, label_workers=0)
    run_pipeline(plan, DiscOracle(), settings, canvas, sink)
    assert [c.index for c in sink.commits] == list(range(len(list(plan.layout.blocks()))))
    nuclei = [record for commit in sink.commits for record in commit.nuclei]
    expected = by_label(out / "n.geojson")
    assert [r.id for r in nuclei] == sorted(expected) == list(range(1, len(expected) + 1))
    for record in nuclei:
        written = shapely.geometry.shape(expected[record.id]["geometry"])
        assert record.polygon.equals_exact(written, 1e-6)
    labelled = [c for c in sink.commits if c.labels is not None]
    assert labelled and all(c.labels.dtype == np.uint32 for c in labelled)
