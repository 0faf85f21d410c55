"""Sub-pixel nucleus outlines (issue 10 point 5): accuracy on shapes of known size, validity,
QuPath's 0.01 px reduction, and no overlap between touching nuclei."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi
from scipy.special import expit
from shapely.geometry import Polygon

from cellseg.geojson import THIN_TOLERANCE_PX, _thin_rings, label_polygons
from cellseg.instances import PostProcess
from cellseg.nuclei import OUTLINE_LEVEL, RegionJob, extract_region

MODEL_MPP, SLIDE_MPP = 0.5, 0.25
SCALE = MODEL_MPP / SLIDE_MPP  # level-0 pixels per model pixel
# (semi-axis a, semi-axis b, rotation) in model pixels: discs of radius 3-20 and ellipses.
SHAPES = [(r, r, 0.0) for r in (3, 4, 6, 10, 15, 20)] + [
    (5, 3, 0.4),
    (8, 4, 1.1),
    (12, 6, 2.3),
    (20, 10, 0.7),
    (9, 6, 0.0),
]
CELL_PX = 48  # one shape per cell of a grid


def _ellipse_field(
    shape_hw: tuple[int, int], centre_yx: tuple[float, float], a: float, b: float, angle: float
) -> np.ndarray:
    """A model-like nucleus probability: 0.5 on the ellipse, a sigmoid ramp of ~1.5 px across.

    Pixel (r, c) is sampled at its centre (r, c) here, i.e. at (c + 0.5, r + 0.5) in the
    polygons' corner convention.
    """
    yy, xx = np.mgrid[: shape_hw[0], : shape_hw[1]].astype(np.float64)
    dy, dx = yy - centre_yx[0], xx - centre_yx[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    return expit(1.5 * (1.0 - np.hypot(u / a, v / b)) * math.sqrt(a * b))


def _ellipse_perimeter(a: float, b: float) -> float:
    """Ramanujan's second approximation (relative error < 1e-9 at these aspect ratios)."""
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


@pytest.fixture(scope="module")
def shapes_field() -> tuple[np.ndarray, list[tuple[float, float, float, float, float]]]:
    """Nucleus probability (uint8, as predict stores it) of SHAPES on a grid, and each shape's
    (centre y, centre x, a, b, angle) in model pixels, with random sub-pixel centres."""
    rng = np.random.default_rng(7)
    columns = 4
    rows = math.ceil(len(SHAPES) / columns)
    probability = np.zeros((rows * CELL_PX, columns * CELL_PX))
    truth = []
    for index, (a, b, angle) in enumerate(SHAPES):
        cy = (index // columns + 0.5) * CELL_PX + rng.uniform(-0.5, 0.5)
        cx = (index % columns + 0.5) * CELL_PX + rng.uniform(-0.5, 0.5)
        probability = np.maximum(
            probability, _ellipse_field(probability.shape, (cy, cx), a, b, angle)
        )
        truth.append((cy, cx, a, b, angle))
    return np.round(probability * 255).astype(np.uint8), truth


def _two_class(nucleus_u8: np.ndarray) -> np.ndarray:
    """``2×h×w`` float32 ``[1 - n, n]`` of a uint8 nucleus probability (what the blender gives)."""
    nucleus = nucleus_u8.astype(np.float32) / 255.0
    return np.stack([1.0 - nucleus, nucleus])


def _region(nucleus_u8: np.ndarray, params: PostProcess | None = None):
    """Everything predict's post-processing makes of one window covering the whole map."""
    h, w = nucleus_u8.shape
    job = RegionJob(
        window=(0, h, 0, w),
        core=(0, h, 0, w),
        canvas_hw=(h, w),
        model_mpp=MODEL_MPP,
        params=params or PostProcess(),
        scale=SCALE,
        offset_xy=(0.0, 0.0),
        slide_mpp=SLIDE_MPP,
    )
    return extract_region(_two_class(nucleus_u8), job)


def _match(polygons: list[Polygon], truth: list) -> list[tuple[Polygon, tuple]]:
    """Each true shape with the one polygon whose centroid is nearest its centre."""
    pairs = []
    for cy, cx, a, b, angle in truth:
        centre_xy = ((cx + 0.5) * SCALE, (cy + 0.5) * SCALE)  # pixel centres at c + 0.5
        nearest = min(polygons, key=lambda p: math.dist(p.centroid.coords[0], centre_xy))
        assert math.dist(nearest.centroid.coords[0], centre_xy) < 0.1 * SCALE
        pairs.append((nearest, (cy, cx, a, b, angle)))
    return pairs


@pytest.mark.parametrize("fg_threshold", [0.5, 0.6])  # PostProcess's default, the shipped model's
def test_discs_and_ellipses_have_their_true_area_and_perimeter(
    shapes_field, fg_threshold: float
) -> None:
    nucleus_u8, truth = shapes_field
    region = _region(nucleus_u8, PostProcess(fg_threshold=fg_threshold))
    assert len(region.nuclei) == len(SHAPES)  # one polygon per nucleus, none split or lost
    found = {id(polygon): (label, measured) for label, polygon, measured in region.nuclei}
    ids = [label for label, _, _ in region.nuclei]
    pixel_outlines = label_polygons(region.labels, ids, (0, 0), SCALE)
    subpixel_errors, pixel_errors = [], []
    for polygon, (_, _, a, b, _) in _match([p for _, p, _ in region.nuclei], truth):
        label, measured = found[id(polygon)]
        area_um2 = math.pi * a * b * MODEL_MPP**2
        perimeter_um = _ellipse_perimeter(a, b) * MODEL_MPP
        # The measurements are those of the exported polygon.
        assert measured["Nucleus: Area µm^2"] == pytest.approx(polygon.area * SLIDE_MPP**2, 1e-4)
        assert measured["Nucleus: Perimeter µm"] == pytest.approx(polygon.length * SLIDE_MPP, 1e-4)
        area_error = measured["Nucleus: Area µm^2"] / area_um2 - 1
        perimeter_error = measured["Nucleus: Perimeter µm"] / perimeter_um - 1
        assert abs(area_error) < 0.03, (a, b, area_error)
        assert abs(perimeter_error) < 0.03, (a, b, perimeter_error)
        if a == b:
            assert measured["Nucleus: Circularity"] > 0.97
        subpixel_errors.append(abs(perimeter_error))
        pixel_perimeter_um = pixel_outlines[label].length * SLIDE_MPP
        pixel_errors.append(abs(pixel_perimeter_um / perimeter_um - 1))
    # The pixel outlines (marching squares of the mask) overestimate perimeters by ~5 %.
    assert np.mean(subpixel_errors) < 0.25 * np.mean(pixel_errors)


def test_subpixel_outlines_are_closer_to_the_true_shape_than_pixel_outlines(shapes_field) -> None:
    nucleus_u8, truth = shapes_field
    region = _region(nucleus_u8)
    labels = region.labels
    ids = [label for label, _, _ in region.nuclei]
    probability = nucleus_u8 / 255.0
    fine = label_polygons(labels, ids, (0, 0), SCALE, probability=probability, level=0.5)
    coarse = label_polygons(labels, ids, (0, 0), SCALE)
    for polygon, (cy, cx, a, b, angle) in _match(list(fine.values()), truth):
        ellipse = shapely.affinity.rotate(
            shapely.affinity.scale(shapely.Point(0, 0).buffer(1, 256), a * SCALE, b * SCALE),
            angle,
            origin=(0, 0),
            use_radians=True,
        )
        ellipse = shapely.affinity.translate(ellipse, (cx + 0.5) * SCALE, (cy + 0.5) * SCALE)
        label = next(k for k, p in fine.items() if p is polygon)
        iou_fine = polygon.intersection(ellipse).area / polygon.union(ellipse).area
        iou_coarse = coarse[label].intersection(ellipse).area / coarse[label].union(ellipse).area
        assert iou_fine > 0.97 and iou_fine > iou_coarse, (a, b, iou_fine, iou_coarse)


def _qupath_accepts(polygon: Polygon) -> bool:
    """QuPath ≥ 0.6 reduces geometries to the 0.01 grid on import: it must stay valid and equal."""
    reduced = shapely.set_precision(polygon, 0.01)
    return (
        isinstance(polygon, Polygon)
        and polygon.is_valid
        and not polygon.interiors
        and reduced.is_valid
        and reduced.equals(polygon)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [2.0, 1.9961, 0.5])
def test_noisy_probabilities_give_valid_polygons_that_survive_the_qupath_snap(
    seed: int, scale: float
) -> None:
    """Ragged blobs, thin necks and noisy probabilities: one valid polygon per instance."""
    rng = np.random.default_rng(seed)
    probability = ndi.gaussian_filter(rng.random((120, 120)), 1.5)
    probability = (probability - probability.min()) / np.ptp(probability)
    probability += rng.normal(0, 0.05, probability.shape)  # pixel noise near the threshold
    labels, count = ndi.label(probability > 0.55)
    assert count > 10
    ids = np.arange(1, count + 1)
    pixel = label_polygons(labels, ids, (3, 5), scale, (0.25, 0.5))
    for level in (0.55, OUTLINE_LEVEL, 0.3):
        polygons = label_polygons(
            labels, ids, (3, 5), scale, (0.25, 0.5), probability=probability, level=level
        )
        assert sorted(polygons) == sorted(pixel)  # the same nuclei have outlines
        assert all(_qupath_accepts(polygon) for polygon in polygons.values())


def _touching_discs() -> tuple[np.ndarray, np.ndarray]:
    """A chain and a cluster of overlapping discs, split by watershed (real post-processing)."""
    shape_hw = (90, 120)
    centres = [(20, 20), (20, 31), (20, 41), (30, 26), (60, 70), (60, 82), (71, 76), (50, 100)]
    radii = [6, 6, 5, 5, 7, 7, 7, 4]
    probability = np.zeros(shape_hw)
    for (cy, cx), r in zip(centres, radii, strict=True):
        probability = np.maximum(
            probability, _ellipse_field(shape_hw, (cy + 0.3, cx + 0.2), r, r, 0)
        )
    return np.round(probability * 255).astype(np.uint8), np.asarray(centres)


def test_touching_nuclei_do_not_overlap() -> None:
    nucleus_u8, centres = _touching_discs()
    region = _region(nucleus_u8)
    polygons = [polygon for _, polygon, _ in region.nuclei]
    assert len(polygons) >= len(centres) - 1  # watershed split the touching discs
    touching = 0
    for first, second in itertools.combinations(polygons, 2):
        assert first.intersection(second).area == pytest.approx(0.0, abs=1e-9)
        touching += first.distance(second) == 0
    assert touching >= 4  # the test really has touching outlines
    # Also when only some of them are outlined (the others belong to a neighbouring region),
    # and with an awkward scale and offset.
    labels, probability = region.labels, nucleus_u8 / 255.0
    ids = np.unique(labels)[1:]
    for subset in (ids, ids[::2], ids[1::2]):
        outlines = label_polygons(
            labels, subset, (7, 3), 1.9961, (0.333, 17.7), probability=probability
        )
        everyone = label_polygons(
            labels, ids, (7, 3), 1.9961, (0.333, 17.7), probability=probability
        )
        for label, polygon in outlines.items():
            assert shapely.equals_exact(polygon, everyone[label], tolerance=0)
        for first, second in itertools.combinations(everyone.values(), 2):
            assert first.intersection(second).area == pytest.approx(0.0, abs=1e-9)


def test_binary_probabilities_give_the_pixel_outlines() -> None:
    """With 0/1 probabilities every crossing is the pixel-edge midpoint (what predict's seam
    tests compare with mask_polygon)."""
    nucleus_u8, _ = _touching_discs()
    binary = np.where(nucleus_u8 > 127, 255, 0).astype(np.uint8)
    region = _region(binary)
    pixel = label_polygons(region.labels, np.unique(region.labels)[1:], (0, 0), SCALE)
    for label, polygon, _ in region.nuclei:
        assert shapely.equals_exact(polygon, pixel[label], tolerance=0)


def test_thinning_keeps_pinned_vertices_and_stays_within_tolerance() -> None:
    rng = np.random.default_rng(3)
    angle = np.sort(rng.uniform(0, 2 * np.pi, 200))
    ring = np.stack([10 * np.sin(angle), 10 * np.cos(angle)], axis=1) + 20
    ring += rng.normal(0, 0.005, ring.shape)
    pinned = rng.random(len(ring)) < 0.2
    thinned, sizes = _thin_rings(ring, np.array([len(ring)]), pinned)
    assert sizes.tolist() == [len(thinned)] and len(thinned) < 0.7 * len(ring)
    kept = {tuple(point) for point in thinned.tolist()}
    assert all(tuple(point) in kept for point in ring[pinned].tolist())
    before, after = Polygon(ring), Polygon(thinned)
    assert before.hausdorff_distance(after) < 3 * THIN_TOLERANCE_PX


def test_cells_contain_their_sub_pixel_nuclei() -> None:
    """A nucleus outline reaching into a pixel the cell expansion gave to a neighbour is clipped
    to its own cell (QuPath's cells contain their nucleus); cells still do not overlap."""
    nucleus_u8, _ = _touching_discs()
    h, w = nucleus_u8.shape
    for expansion_px in (1, 3):
        job = RegionJob(
            window=(0, h, 0, w),
            core=(0, h, 0, w),
            canvas_hw=(h, w),
            model_mpp=MODEL_MPP,
            params=PostProcess(fg_threshold=0.6),
            scale=SCALE,
            offset_xy=(0.0, 0.0),
            slide_mpp=SLIDE_MPP,
            cell_expansion_px=expansion_px,
        )
        region = extract_region(_two_class(nucleus_u8), job)
        assert len(region.cells) == len(region.nuclei) >= 7
        for label, nucleus, measured in region.nuclei:
            cell = region.cells[label]
            assert cell.covers(nucleus) and _qupath_accepts(nucleus)
            ratio = measured["Nucleus/Cell area ratio"]
            assert ratio == pytest.approx(nucleus.area / cell.area, abs=1e-4)
        for first, second in itertools.combinations(region.cells.values(), 2):
            assert first.intersection(second).area == pytest.approx(0.0, abs=1e-9)


def test_probability_must_match_the_labels() -> None:
    labels = np.zeros((8, 8), np.int32)
    labels[2:5, 2:5] = 1
    with pytest.raises(ValueError, match="probability"):
        label_polygons(labels, [1], (0, 0), 1.0, probability=np.zeros((8, 7)))


def test_the_benchmark_rasterises_polygons_by_pixel_centre(tmp_path) -> None:
    """benchmarks/outline_accuracy.py: pixel (r, c) is the polygon's when (c + 0.5, r + 0.5) is
    inside, so a mask's pixel outline rasterises back to the mask."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import outline_accuracy

    from cellseg.geojson import GeoJSONWriter

    nucleus_u8, _ = _touching_discs()
    region = _region(nucleus_u8)
    ids = np.unique(region.labels)[1:]
    pixel = label_polygons(region.labels, ids, (0, 0), 1.0)
    with GeoJSONWriter(tmp_path / "n.geojson") as writer:
        for polygon in pixel.values():
            writer.write(polygon)
    labels, vertices = outline_accuracy.rasterise_geojson(tmp_path / "n.geojson", nucleus_u8.shape)
    np.testing.assert_array_equal(labels > 0, region.labels > 0)
    assert vertices == sum(len(p.exterior.coords) - 1 for p in pixel.values())
