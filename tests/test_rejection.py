"""The learned rejection of predicted nuclei (cellseg.rejection, issue 10 point 6)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from oracle import BACKGROUND_RGB, DiscOracle, draw_disc
from slides import make_pyramid_tiff

from cellseg.errors import ModelError
from cellseg.predict import PredictOptions, SlideOutputs, predict_slide
from cellseg.rejection import (
    DEFAULT_FEATURES,
    Rejection,
    feature_matrix,
    fit_logistic,
    rejection_of,
)

MPP = 0.5
AREA_FEATURE = "log:Nucleus: Area µm^2"


def test_fit_recovers_a_separation_along_one_feature():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    signal = np.where(y == 1, 5.0, 1.0) + rng.uniform(-1.5, 1.5, n)  # gap between 2.5 and 3.5
    noise = rng.normal(10.0, 3.0, (n, 2))
    x = np.column_stack([noise[:, 0], signal, noise[:, 1]])
    rejection = fit_logistic(x, y, ["a", "b", "c"], l2=1e-3)
    p = rejection.probability(x)
    np.testing.assert_array_equal(p >= 0.5, y == 1)
    coef = np.abs(rejection.coef)
    assert rejection.coef[1] > 0 and coef[1] > 5 * max(coef[0], coef[2])
    # The boundary lies in the gap between the classes.
    boundary = rejection.mean[1] - rejection.intercept * rejection.scale[1] / rejection.coef[1]
    assert 2.4 < boundary < 3.6


def test_fit_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        fit_logistic(np.ones((4, 1)), np.ones(4), ["a"])


def test_json_round_trip_and_bad_entries():
    rejection = Rejection(
        features=DEFAULT_FEATURES[:2],
        mean=(1.5, -0.25),
        scale=(0.5, 2.0),
        coef=(1.25, -0.75),
        intercept=0.1,
        threshold=0.3,
    )
    meta = json.loads(json.dumps({"rejection": rejection.to_dict()}))
    assert rejection_of(meta) == rejection
    assert rejection_of({}) is None and rejection_of(None) is None
    for bad in ({"scale": [0.0, 1.0]}, {"coef": [1.0]}, {"threshold": 1.5}, {"mean": "x"}):
        with pytest.raises(ModelError, match="invalid rejection"):
            rejection_of({"rejection": {**rejection.to_dict(), **bad}})
    with pytest.raises(ModelError, match="invalid rejection"):
        rejection_of({"rejection": {"features": ["a"]}})


def test_log_features_and_missing_measurements():
    x = feature_matrix([{"Nucleus: Area µm^2": math.e**2, "b": float("nan")}], [AREA_FEATURE, "b"])
    np.testing.assert_allclose(x, [[2.0, 0.0]])
    with pytest.raises(ModelError, match="Solidity"):
        feature_matrix([{"a": 1.0}], ["Nucleus: Solidity"])


def area_rejection(min_area_um2: float) -> Rejection:
    """Keeps nuclei of area >= ``min_area_um2`` (probability 0.5 there, threshold 0.5)."""
    return Rejection((AREA_FEATURE,), (math.log(min_area_um2),), (1.0,), (1.0,), 0.0, 0.5)


class BundledOracle(DiscOracle):
    """A :class:`DiscOracle` with a model meta, as a loaded bundle has."""

    def __init__(self, meta: dict) -> None:
        super().__init__(MPP)
        self.bundle = SimpleNamespace(meta=meta, path=None, name="oracle")


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    """A slide of big (r 9 px, ~64 µm²) and small (r 4 px, ~13 µm²) discs, some on seams."""
    image = np.empty((420, 640, 3), np.uint8)
    image[:] = BACKGROUND_RGB
    truth = np.zeros(image.shape[:2], np.int32)
    big = []
    label = 0
    for row, cy in enumerate(range(20, 420, 40)):
        for col, cx in enumerate(range(20, 640, 40)):
            label += 1
            is_big = (row + col) % 2 == 0
            draw_disc(image, truth, (cy, cx), 9.0 if is_big else 4.0, label)
            if is_big:
                big.append(label)
    path = make_pyramid_tiff(tmp_path_factory.mktemp("sizes") / "s.svs", image, MPP, levels=1)
    return path, truth, big


def run(path, oracle, folder, label_workers=0):
    outputs = SlideOutputs(geojson=folder / "n.geojson", zarr=folder / "n.zarr")
    opts = PredictOptions(region_px=256, chunk_px=256, workers=0, label_workers=label_workers)
    summary = predict_slide(path, oracle, outputs, opts)
    labels = zarr.open_group(str(folder / "n.zarr"), mode="r")["labels/nuclei/0"][:]
    features = json.loads((folder / "n.geojson").read_text())["features"]
    return summary, labels, features


@pytest.mark.parametrize("label_workers", [0, 1])  # 1: the rejection travels to a process
def test_predict_removes_exactly_the_rejected_nuclei(two_sizes, tmp_path, label_workers):
    path, truth, big = two_sizes
    (tmp_path / "all").mkdir()
    (tmp_path / "kept").mkdir()
    summary_all, labels_all, features_all = run(path, BundledOracle({}), tmp_path / "all")
    assert len(features_all) == truth.max() and "nuclei_rejected" not in summary_all
    np.testing.assert_array_equal(labels_all > 0, truth > 0)
    meta = {"rejection": area_rejection(30.0).to_dict()}
    summary, labels, features = run(path, BundledOracle(meta), tmp_path / "kept", label_workers)
    assert len(features) == summary["nuclei"] == len(big)
    assert summary["nuclei_rejected"] == truth.max() - len(big)
    # The label map holds the big discs, each whole under one id, and nothing else.
    np.testing.assert_array_equal(labels > 0, np.isin(truth, big))
    ids = {int(f["properties"]["measurements"]["Label"]) for f in features}
    assert ids == set(range(1, len(big) + 1)) == set(np.unique(labels[labels > 0]).tolist())
    # The kept nuclei are those of the run without rejection, measured the same.
    kept_before = {
        json.dumps(f["geometry"]["coordinates"])
        for f in features_all
        if f["properties"]["measurements"]["Nucleus: Area µm^2"] >= 30.0
    }
    assert {json.dumps(f["geometry"]["coordinates"]) for f in features} == kept_before


def test_polygon_match_iou():
    from shapely.geometry import box

    from cellseg.evaluation import polygon_match_iou

    gt = np.zeros((20, 20), np.int32)
    gt[0:4, 0:4] = 1  # 16 px
    gt[10:20, 10:20] = 2  # 100 px
    polygons = [box(0, 0, 4, 4), box(10, 10, 20, 15), box(5, 5, 8, 8)]  # x0, y0, x1, y1
    np.testing.assert_allclose(polygon_match_iou(polygons, gt), [1.0, 0.5, 0.0])
