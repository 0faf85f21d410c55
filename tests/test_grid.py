"""Tiling that does not move the answer (issue 11): the slide-anchored grid and dense tissue.

A slide of densely touching discs (every disc's rim touches its neighbours', so the foreground
is one component and the watershed's floods meet on rims of equal probability: ties
everywhere) is predicted with the disc oracle with two block sizes, with the grid shifted, and
as an ROI whose corner is off the grid. The nuclei must be the same polygons every time, never
overlap, and leave no nucleus pixel unlabelled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from oracle import DiscOracle, draw_disc
from shapely.strtree import STRtree
from slides import make_pyramid_tiff

from cellseg.errors import CellsegError
from cellseg.instances import flood_order
from cellseg.predict import PredictOptions, SlideOutputs, plan_slide, predict_slide
from cellseg.slide import open_slide
from cellseg.tiling import Canvas, TileGrid

MPP = 0.5
HEIGHT, WIDTH = 520, 700
RADIUS = 7.0
FAST = {"chunk_px": 256, "workers": 0, "label_workers": 0, "batch_size": 9, "overlap_px": 32}


def dense_discs(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(image, truth)``: discs on a jittered lattice 2·radius - 1 apart, so they touch."""
    from oracle import BACKGROUND_RGB

    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUND_RGB
    truth = np.zeros((height, width), np.int32)
    step = 2 * RADIUS - 1
    label = 0
    for cy in np.arange(RADIUS, height - RADIUS, step):
        for cx in np.arange(RADIUS, width - RADIUS, step):
            label += 1
            jitter = rng.uniform(-1.0, 1.0, 2)
            draw_disc(image, truth, (cy + jitter[0], cx + jitter[1]), RADIUS, label)
    return image, truth


@pytest.fixture(scope="module")
def dense_slide(tmp_path_factory):
    image, _ = dense_discs(HEIGHT, WIDTH)
    path = make_pyramid_tiff(tmp_path_factory.mktemp("dense") / "dense.svs", image, MPP, levels=1)
    return path, image


def run(path: Path, out: Path, **options) -> list[shapely.Polygon]:
    outputs = SlideOutputs(geojson=out / "n.geojson", zarr=out / "n.zarr")
    predict_slide(path, DiscOracle(), outputs, PredictOptions(**{**FAST, **options}))
    features = json.loads(outputs.geojson.read_text())["features"]
    return [shapely.geometry.shape(f["geometry"]) for f in features]


def geometry_set(polygons: list[shapely.Polygon]) -> set[bytes]:
    return {shapely.normalize(p).wkb for p in polygons}


def assert_no_overlaps(polygons: list[shapely.Polygon]) -> None:
    tree = STRtree(polygons)
    left, right = tree.query(polygons, predicate="intersects")
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        if i < j:
            assert polygons[i].intersection(polygons[j]).area == 0, (i, j)


@pytest.fixture(scope="module")
def dense_runs(dense_slide, tmp_path_factory):
    """The dense slide with blocks of one tile (192 px) and of three tiles (576 px)."""
    path, _ = dense_slide
    runs = {}
    for region_px in (192, 576):
        out = tmp_path_factory.mktemp(f"dense{region_px}")
        runs[region_px] = (out, run(path, out, region_px=region_px))
    return runs


def test_two_block_sizes_give_identical_nuclei(dense_runs):
    (_, small), (_, large) = dense_runs[192], dense_runs[576]
    assert len(small) > 1500  # dense: ~1800 discs on the slide
    assert geometry_set(small) == geometry_set(large)


@pytest.mark.parametrize("region_px", [192, 576])
def test_dense_nuclei_never_overlap_and_cover_the_foreground(dense_slide, dense_runs, region_px):
    _, image = dense_slide
    out, polygons = dense_runs[region_px]
    assert_no_overlaps(polygons)
    labels = zarr.open_group(str(out / "n.zarr"), mode="r")["labels/nuclei/0"][:]
    foreground = DiscOracle.probabilities(image[None])[0, 0] == 0
    assert labels.shape == foreground.shape
    assert np.count_nonzero(foreground & (labels == 0)) == 0
    assert np.count_nonzero(~foreground & (labels > 0)) == 0


def test_a_shifted_grid_gives_the_same_nuclei_with_other_tiles(dense_slide, dense_runs, tmp_path):
    """The oracle has no context, so the nuclei do not move; the tiles do (a test hook)."""
    path, _ = dense_slide
    with open_slide(path) as slide:
        shifted = plan_slide(slide, DiscOracle(), PredictOptions(**FAST, grid_offset_px=(96, 40)))
        plain = plan_slide(slide, DiscOracle(), PredictOptions(**FAST))
    assert shifted.canvas.origin_xy == (96 - 192, 40 - 192)  # the grid's first tile
    assert plain.canvas.origin_xy == (0, 0)
    polygons = run(path, tmp_path, region_px=384, grid_offset_px=(96, 40))
    assert geometry_set(polygons) == geometry_set(dense_runs[192][1])


def pixel_centroids(labels: np.ndarray) -> dict[int, tuple[int, int]]:
    """``{id: (x, y)}`` integer centroids (floor of the pixel means), as the pipeline's."""
    rows, cols = np.nonzero(labels)
    ids = labels[rows, cols]
    count = np.bincount(ids)
    ys = np.bincount(ids, weights=rows).astype(np.int64)
    xs = np.bincount(ids, weights=cols).astype(np.int64)
    return {int(i): (xs[i] // count[i], ys[i] // count[i]) for i in np.flatnonzero(count)}


def test_an_off_grid_roi_keeps_exactly_the_whole_slide_nuclei_inside_it(
    dense_slide, dense_runs, tmp_path
):
    path, _ = dense_slide
    x, y, w, h = roi = (151, 97, 333, 250)
    with open_slide(path) as slide:
        plan = plan_slide(slide, DiscOracle(), PredictOptions(**FAST, roi_xywh=roi))
    # The ROI's canvas starts on the whole-slide grid (stride 192) and reaches past the ROI.
    assert plan.canvas.origin_xy[0] % 192 == 0 and plan.canvas.origin_xy[1] % 192 == 0
    assert plan.canvas.origin_xy[0] <= x - 64 and plan.canvas.origin_xy[1] <= y - 64
    polygons = run(path, tmp_path, region_px=384, roi_xywh=roi)
    out = dense_runs[576][0]
    labels = zarr.open_group(str(out / "n.zarr"), mode="r")["labels/nuclei/0"][:]
    inside = {
        i for i, (cx, cy) in pixel_centroids(labels).items() if x <= cx < x + w and y <= cy < y + h
    }
    features = json.loads((out / "n.geojson").read_text())["features"]
    whole = [
        shapely.geometry.shape(f["geometry"])
        for f in features
        if f["properties"]["measurements"]["Label"] in inside
    ]
    assert len(whole) > 200
    assert len(polygons) == len(whole)
    assert geometry_set(polygons) == geometry_set(whole)


@pytest.mark.parametrize("offset", [(0, 0), (50, 150)])
def test_roi_canvases_are_cut_from_the_whole_slide_grid(offset):
    """An ROI's canvas starts at a whole-slide tile and holds every whole-slide tile that covers
    the ROI grown by the context, and no tile before those (slide at 0.25, model at 0.5)."""
    grid = TileGrid(224, 160, offset, context_px=64)
    bounds = (0, 0, 5000, 4000)
    whole = Canvas.on_grid(bounds, bounds, 0.25, 0.5, grid)
    whole_hw = (whole.width_px, whole.height_px)
    rng = np.random.default_rng(1)
    for _ in range(50):
        area = (*rng.integers(0, 4000, 2).tolist(), *rng.integers(1, 900, 2).tolist())
        roi = Canvas.on_grid(area, bounds, 0.25, 0.5, grid)
        for axis in (0, 1):
            start_px = (roi.origin_xy[axis] - whole.origin_xy[axis]) / 2.0  # model pixels
            assert start_px == int(start_px) and start_px % 160 == 0  # a whole-slide tile
            lo = max(0.0, area[axis] / 2 - 64)
            hi = min(
                whole_hw[axis] + whole.origin_xy[axis] / 2, (area[axis] + area[axis + 2]) / 2 + 64
            )
            origin_px = roi.origin_xy[axis] / 2
            assert origin_px <= lo and (origin_px + 224 > lo or start_px == 0)
            assert origin_px - 160 + 224 <= lo or start_px == 0  # the tile before misses it
            size = roi.width_px if axis == 0 else roi.height_px
            assert origin_px + size >= hi


def test_flood_order_is_unique_and_the_same_in_every_window():
    """Ranks order the mask pixels by (value, raster position), negative values and ties
    included, so any window orders its pixels as the whole map does."""
    rng = np.random.default_rng(5)
    elevation = rng.choice(np.float32([-1.5, -0.25, 0.0, 0.25, 1.0]), size=(60, 80))
    mask = rng.random((60, 80)) > 0.2
    ranks = flood_order(elevation, mask)
    flat = np.flatnonzero(mask)
    assert sorted(ranks.ravel()[flat]) == list(range(1, len(flat) + 1)) and not ranks[~mask].any()
    expected = flat[np.lexsort((flat, elevation.ravel()[flat]))]
    np.testing.assert_array_equal(flat[np.argsort(ranks.ravel()[flat])], expected)
    window = (slice(10, 50), slice(5, 70))
    inner = flood_order(elevation[window], mask[window])
    inside = mask[window]
    np.testing.assert_array_equal(np.argsort(inner[inside]), np.argsort(ranks[window][inside]))


class Interrupt(Exception):
    pass


def test_an_interrupted_roi_run_resumes_on_the_same_grid(dense_slide, tmp_path):
    path, _ = dense_slide
    opts = PredictOptions(**{**FAST, "region_px": 192, "roi_xywh": (151, 97, 333, 250)})
    reference = run(path, tmp_path / "a", region_px=192, roi_xywh=(151, 97, 333, 250))
    outputs = SlideOutputs(geojson=tmp_path / "b" / "n.geojson", zarr=tmp_path / "b" / "n.zarr")

    def stop(done: int, total: int) -> None:
        if done == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        predict_slide(path, DiscOracle(), outputs, opts, on_region=stop)
    summary = predict_slide(path, DiscOracle(), outputs, opts)
    assert summary["resumed"]
    features = json.loads(outputs.geojson.read_text())["features"]
    resumed = [shapely.geometry.shape(f["geometry"]) for f in features]
    assert geometry_set(resumed) == geometry_set(reference)
    za, zb = (
        zarr.open_group(str(p / "n.zarr"), mode="r") for p in (tmp_path / "a", tmp_path / "b")
    )
    np.testing.assert_array_equal(za["labels/nuclei/0"][:], zb["labels/nuclei/0"][:])
    assert za["0"].shape == (250, 333)  # the ROI's Zarr covers the ROI


def test_blocks_too_small_for_the_halo_are_refused_not_shrunk(dense_slide):
    """Shrinking the halo to fit would change the nuclei; the block size must not."""
    path, _ = dense_slide
    with open_slide(path) as slide, pytest.raises(CellsegError, match="--block-px 100"):
        plan_slide(
            slide, DiscOracle(), PredictOptions(**{**FAST, "region_px": 100, "overlap_px": 96})
        )
