"""Instance post-processing on synthetic probability maps with known nuclei."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellseg import metrics
from cellseg.instances import (
    PostProcess,
    _fill_instance_holes,
    label_instances,
    nucleus_probability,
)

MONUSEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg"

CONFIDENCE = 0.9


def _disc(shape: tuple[int, int], centre_yx: tuple[float, float], radius_px: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre_yx[0]) ** 2 + (xx - centre_yx[1]) ** 2 <= radius_px**2


def _probs3(interior: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """3×H×W softmax-like map: CONFIDENCE on the true class, the rest split evenly."""
    classes = np.where(interior, 1, np.where(boundary & ~interior, 2, 0))
    probs = np.full((3, *classes.shape), (1 - CONFIDENCE) / 2, dtype=np.float32)
    for c in range(3):
        probs[c][classes == c] = CONFIDENCE
    return probs


def _probs2(nucleus: np.ndarray) -> np.ndarray:
    """2×H×W map for a binary (background, nucleus) model."""
    p1 = np.where(nucleus, CONFIDENCE, 1 - CONFIDENCE).astype(np.float32)
    return np.stack([1 - p1, p1])


def _nuclei_with_rings(shape, centres_yx, radius_px, ring_px=2):
    """Discs whose outer ``ring_px`` is the boundary class; returns (probs, union, discs)."""
    discs = [_disc(shape, c, radius_px) for c in centres_yx]
    cores = [_disc(shape, c, radius_px - ring_px) for c in centres_yx]
    union = np.logical_or.reduce(discs)
    return _probs3(np.logical_or.reduce(cores), union), union, discs


def test_two_touching_discs_with_boundary_are_two_instances():
    shape = (48, 64)
    # Radius 10 at 18 px apart: the discs overlap; only the boundary band lies between them.
    probs, union, _ = _nuclei_with_rings(shape, [(24, 22), (24, 40)], radius_px=10)
    labels = label_instances(probs, mpp=0.5, params=PostProcess())
    assert labels.max() == 2
    assert labels[24, 22] != labels[24, 40]
    np.testing.assert_array_equal(labels > 0, union)  # no nucleus pixel lost
    # Against the ideal split along the bisector x = 31: both matched, almost pixel-exact.
    expected = np.where(union, np.where(np.arange(shape[1]) < 31, 1, 2), 0)
    scores = metrics.pq(expected, labels)
    assert scores["tp"] == 2
    assert scores["sq"] > 0.9


def test_split_follows_the_valley_of_interior_probability():
    # A 60 px wide foreground bar whose interior probability falls from 0.9 (x <= 12) to 0.05 at
    # x = 40 and rises back to 0.9 (x >= 48): markers cover x < 26 and x > 44. The floods must
    # meet in the valley at x = 40, not halfway between the markers (x ≈ 35).
    x = np.arange(60, dtype=np.float32)
    p1_x = np.interp(x, [0, 12, 40, 48, 59], [0.9, 0.9, 0.05, 0.9, 0.9]).astype(np.float32)
    p1 = np.zeros((20, 60), np.float32)
    p1[5:15] = p1_x
    p0 = np.where(p1 > 0, 0.05, 0.95).astype(np.float32)
    probs = np.stack([p0, p1, 1 - p0 - p1])
    labels = label_instances(probs, mpp=0.5, params=PostProcess())
    assert labels.max() == 2
    left = labels[10] == labels[10, 0]
    assert np.flatnonzero(~left)[0] in (40, 41)


def test_same_discs_without_boundary_class_merge():
    # Control for the test above: when everything is interior, nothing separates the nuclei.
    shape = (48, 64)
    union = _disc(shape, (24, 22), 10) | _disc(shape, (24, 40), 10)
    labels = label_instances(_probs3(union, union), mpp=0.5, params=PostProcess())
    assert labels.max() == 1


def test_single_disc_is_one_instance_covering_the_disc():
    probs, union, _ = _nuclei_with_rings((40, 40), [(20, 19)], radius_px=9)
    labels = label_instances(probs, mpp=0.5, params=PostProcess())
    np.testing.assert_array_equal(labels, union.astype(np.int32))


def test_foreground_without_marker_is_still_a_nucleus():
    shape = (40, 60)
    probs, _, _ = _nuclei_with_rings(shape, [(20, 15)], radius_px=9)
    faint = _disc(shape, (20, 45), 4)  # boundary class only: no interior above the threshold
    probs[:, faint] = np.array([0.05, 0.05, 0.9], dtype=np.float32)[:, None]
    labels = label_instances(probs, mpp=0.5, params=PostProcess())
    assert labels.max() == 2
    np.testing.assert_array_equal(labels == labels[20, 45], faint)


def test_noise_markers_are_dropped_by_min_marker_area():
    shape = (40, 40)
    probs, union, _ = _nuclei_with_rings(shape, [(20, 20)], radius_px=10, ring_px=3)
    probs[:, 20, 29] = np.array([0.05, 0.9, 0.05], dtype=np.float32)  # 1-px interior speck
    # At 0.5 µm/px the speck is 0.25 µm² < 1 µm²: it seeds nothing and the disc stays whole.
    labels = label_instances(probs, mpp=0.5, params=PostProcess(min_marker_area_um2=1.0))
    np.testing.assert_array_equal(labels, union.astype(np.int32))
    # Kept as a marker (and with no size filter), the speck claims part of the boundary band.
    no_filters = PostProcess(min_marker_area_um2=0.0, min_area_um2=0.0)
    assert label_instances(probs, mpp=0.5, params=no_filters).max() == 2


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_area_filter_uses_physical_units(mpp):
    # A 2 µm-radius nucleus (12.6 µm²) and a 0.8 µm-radius speck (2.0 µm²), drawn at `mpp`.
    shape = (int(30 / mpp), int(30 / mpp))
    big = _disc(shape, (10 / mpp, 10 / mpp), 2.0 / mpp)
    small = _disc(shape, (20 / mpp, 20 / mpp), 0.8 / mpp)
    probs = _probs3(big | small, big | small)
    params = PostProcess(min_area_um2=3.0, min_marker_area_um2=0.0)
    labels = label_instances(probs, mpp=mpp, params=params)
    np.testing.assert_array_equal(labels, big.astype(np.int32))
    # The same pixels read as a 4× coarser map: the speck now covers 16× more µm² and stays.
    assert label_instances(probs, mpp=4 * mpp, params=params).max() == 2


def test_fill_holes():
    shape = (32, 32)
    disc = _disc(shape, (16, 16), 10)
    hole = _disc(shape, (16, 16), 2)
    probs = _probs3(disc & ~hole, disc & ~hole)
    filled = label_instances(probs, mpp=0.5, params=PostProcess(fill_holes=True))
    np.testing.assert_array_equal(filled, disc.astype(np.int32))
    kept = label_instances(probs, mpp=0.5, params=PostProcess(fill_holes=False))
    np.testing.assert_array_equal(kept, (disc & ~hole).astype(np.int32))


def test_hole_filling_by_hand():
    labels = np.array(
        [
            [1, 1, 1, 2, 2, 2, 0, 3, 3, 3],
            [1, 0, 2, 2, 0, 2, 0, 3, 0, 3],
            [1, 1, 1, 2, 2, 2, 0, 3, 3, 3],
        ],
        dtype=np.int32,
    )
    expected = labels.copy()
    expected[1, 4] = 2  # enclosed by 2 alone
    expected[1, 8] = 3  # enclosed by 3 alone
    # (1, 1) is enclosed by 1 and 2 together, by neither alone: it stays background.
    np.testing.assert_array_equal(_fill_instance_holes(labels.copy()), expected)


def test_hole_enclosed_by_nested_instances_goes_to_the_lowest_label():
    labels = np.zeros((9, 9), np.int32)
    labels[[0, -1], :] = labels[:, [0, -1]] = 1  # a ring of 1 around a ring of 2
    labels[2:7, 2:7] = 2
    labels[3:6, 3:6] = 0
    filled = _fill_instance_holes(labels.copy())
    assert (filled[1, 1:-1] == 1).all()  # the gap between the rings: enclosed by 1 only
    assert (filled[3:6, 3:6] == 1).all()  # inside ring 2 and ring 1: the lower label
    assert (filled[2:7, 2:7] != 0).all()


def _fill_each_instance(labels: np.ndarray) -> np.ndarray:
    """Reference: ``binary_fill_holes`` of every instance's crop, in label order."""
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is not None:
            crop = labels[box]
            crop[ndi.binary_fill_holes(crop == index) & (crop == 0)] = index
    return labels


def test_hole_filling_equals_filling_each_instance_alone():
    rng = np.random.default_rng(3)
    changed = 0
    for _ in range(400):
        shape = tuple(rng.integers(1, 16, size=2))
        labels = rng.integers(0, rng.integers(2, 7), size=shape).astype(np.int32)
        if rng.random() < 0.5:  # 2×2 blocks: rings, nested rings, shared enclosures
            labels = np.kron(labels, np.ones((2, 2), np.int32))[: shape[0], : shape[1]].copy()
        expected = _fill_each_instance(labels.copy())
        np.testing.assert_array_equal(_fill_instance_holes(labels.copy()), expected)
        changed += not np.array_equal(expected, labels)
    assert changed > 20  # the maps do have holes to fill


def test_speckle_keeps_only_objects_above_the_area_limit():
    # Random probabilities (an untrained model): ~10^4 specks in a 200×200 map.
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(200, 200)).transpose(2, 0, 1).astype(np.float32)
    labels = label_instances(probs, mpp=0.5, params=PostProcess())
    areas = np.bincount(labels.ravel())[1:]
    assert len(areas) > 100 and areas.min() >= 12  # 3 µm² at 0.5 µm/px
    np.testing.assert_array_equal(np.unique(labels), np.arange(len(areas) + 1))


def test_two_channel_fallback_splits_overlapping_discs():
    shape = (48, 64)
    union = _disc(shape, (24, 22), 10) | _disc(shape, (24, 38), 10)  # 16 px apart: a clear neck
    labels = label_instances(_probs2(union), mpp=0.5, params=PostProcess())
    assert labels.max() == 2
    np.testing.assert_array_equal(labels > 0, union)
    expected = np.where(union, np.where(np.arange(shape[1]) < 30, 1, 2), 0)
    scores = metrics.pq(expected, labels)
    assert scores["tp"] == 2
    assert scores["sq"] > 0.9


def test_two_channel_single_disc_is_not_oversegmented():
    disc = _disc((40, 40), (20, 20), 12)
    labels = label_instances(_probs2(disc), mpp=0.5, params=PostProcess())
    np.testing.assert_array_equal(labels, disc.astype(np.int32))


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_two_channel_elongated_nucleus_stays_whole(mpp):
    # A 16×4 µm ellipse (a fibroblast-like nucleus): its distance ridge must seed only once.
    yy, xx = np.mgrid[: int(24 / mpp), : int(24 / mpp)]
    centre = 12 / mpp
    ellipse = ((yy - centre) / (2 / mpp)) ** 2 + ((xx - centre) / (8 / mpp)) ** 2 <= 1
    labels = label_instances(_probs2(ellipse), mpp=mpp, params=PostProcess())
    np.testing.assert_array_equal(labels, ellipse.astype(np.int32))
    # The smoothing of the distance transform is what keeps the ridge to one seed.
    unsmoothed = PostProcess(distance_sigma_um=0.0)
    assert label_instances(_probs2(ellipse), mpp=mpp, params=unsmoothed).max() > 1


def test_output_dtype_shape_and_sequential_labels():
    shape = (50, 70)
    centres = [(12, 12), (12, 40), (35, 20), (38, 55)]
    probs, _, _ = _nuclei_with_rings(shape, centres, radius_px=7)
    tiny = _disc(shape, (40, 4), 1)  # 5 px = 1.25 µm² at 0.5 µm/px: removed
    probs[:, tiny] = np.array([0.05, 0.9, 0.05], dtype=np.float32)[:, None]
    labels = label_instances(probs, mpp=0.5, params=PostProcess())
    assert labels.dtype == np.int32
    assert labels.shape == shape
    np.testing.assert_array_equal(np.unique(labels), np.arange(5))
    assert labels[40, 4] == 0


def test_empty_map_gives_no_instances():
    probs = _probs3(np.zeros((16, 24), bool), np.zeros((16, 24), bool))
    labels = label_instances(probs, mpp=0.5, params=PostProcess())
    assert labels.dtype == np.int32
    assert labels.shape == (16, 24)
    assert not labels.any()


def test_nucleus_probability_is_one_minus_background():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 6))
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    nucleus = nucleus_probability(probs)
    assert nucleus.dtype == np.float32
    np.testing.assert_array_equal(nucleus, 1 - probs[0])
    np.testing.assert_allclose(nucleus, probs[1] + probs[2], atol=1e-6)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="C = 2, 3 or 4"):
        label_instances(np.zeros((5, 8, 8), np.float32), mpp=0.5)
    with pytest.raises(ValueError, match="C = 2, 3 or 4"):
        label_instances(np.zeros((8, 8), np.float32), mpp=0.5)
    with pytest.raises(ValueError, match="floating-point"):
        label_instances(np.zeros((3, 8, 8), np.uint8), mpp=0.5)
    with pytest.raises(ValueError, match="mpp"):
        label_instances(np.zeros((3, 8, 8), np.float32), mpp=0.0)


def test_oracle_probabilities_of_a_real_tile_recover_its_nuclei():
    """Ideal 3-class maps built from a MoNuSeg label map give back (almost) the same nuclei."""
    mask_path = MONUSEG / "train" / "instance_masks" / "TCGA-18-5592-01Z-00-DX1.png"
    if not mask_path.is_file():
        pytest.skip(f"MoNuSeg masks not available at {mask_path.parent}")
    from PIL import Image
    from skimage.segmentation import find_boundaries

    gt = np.asarray(Image.open(mask_path)).astype(np.int32)
    boundary = find_boundaries(gt, mode="inner")
    probs = _probs3((gt > 0) & ~boundary, gt > 0)
    labels = label_instances(probs, mpp=0.25, params=PostProcess())
    scores = metrics.instance_metrics(gt, labels)
    assert scores["aji"] > 0.99
    # Only annotated specks below min_area_um2 (3 µm² = 48 px at 0.25 µm/px) may be lost.
    n_specks = int(np.count_nonzero(np.bincount(gt.ravel())[1:] < 48))
    assert scores["fp"] == 0
    assert scores["fn"] <= n_specks


# --------------------------------------------------------------------------- PostProcess


def test_postprocess_round_trips_through_json():
    params = PostProcess(fg_threshold=0.4, min_area_um2=5.5, fill_holes=False)
    restored = PostProcess.from_dict(json.loads(json.dumps(params.to_dict())))
    assert restored == params
    assert PostProcess.from_dict({}) == PostProcess()


def test_postprocess_from_dict_accepts_ints_and_rejects_unknown_keys():
    assert PostProcess.from_dict({"min_area_um2": 8}).min_area_um2 == 8.0
    assert isinstance(PostProcess.from_dict({"min_area_um2": 8}).min_area_um2, float)
    with pytest.raises(ValueError, match=r"unknown post-processing key.*min_area_px"):
        PostProcess.from_dict({"min_area_px": 30})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fg_threshold", 1.5),
        ("marker_threshold", -0.1),
        ("min_area_um2", -1.0),
        ("min_marker_area_um2", float("nan")),
        ("min_peak_distance_um", "3"),
        ("distance_sigma_um", float("inf")),
        ("fill_holes", 1),
    ],
)
def test_postprocess_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        replace(PostProcess(), **{field: value})


def test_component_peaks_are_skimages_peak_local_max_per_component():
    # the vectorised peak finder must give skimage's peaks, in skimage's order (marker ids)
    from skimage.feature import peak_local_max

    from cellseg.instances import component_peaks

    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = rng.integers(5, 70, 2)
        blobs = ndi.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 3))
        mask = blobs > rng.uniform(0.45, 0.55)
        image = ndi.gaussian_filter(ndi.distance_transform_edt(mask), rng.uniform(0, 1.5))
        image = image.astype(np.float32)
        if trial % 3 == 0:
            image = np.round(image * 2) / 2  # plateaus and ties between neighbours
        if trial % 7 == 0:
            image = mask.astype(np.float32)  # every component flat
        components, _ = ndi.label(mask)
        min_distance = int(rng.integers(1, 6))
        expected = peak_local_max(
            image, min_distance=min_distance, labels=components, exclude_border=False
        )
        found = component_peaks(image, components, min_distance)
        assert np.array_equal(found, expected), (trial, min_distance)
