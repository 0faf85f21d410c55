"""``cellseg evaluate --protocol native`` scores what ``cellseg predict`` writes (issue 10 point 1).

Polygons are rasterised in predict's pixel convention (pixel (r, c) covers [c, c+1) × [r, r+1)),
checked on hand-computed shapes; with an oracle model standing in for the network, the native
evaluation of a tile equals the score of the GeoJSON that the ``predict`` command writes for it;
tuning runs the network once per tile and picks the candidate with the best AJI.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from cellseg.cli.main import cellseg
from click.testing import CliRunner
from oracle import DiscOracle, disc_image, use_oracle_in_cli
from PIL import Image
from shapely.geometry import Point, Polygon

from cellseg.data import Sample
from cellseg.evaluation import (
    TileCache,
    evaluate_samples,
    polygon_labels,
    read_geojson_polygons,
    score_labels,
    tune_postprocess,
)
from cellseg.geojson import label_polygons
from cellseg.instances import PostProcess

TILE_MPP = 0.25  # the tiles' resolution; the oracle works at 0.5 µm/px, as the shipped model


def test_square_covers_the_pixels_whose_centres_it_holds():
    # x in [2, 5], y in [1, 3]: pixel centres (c + 0.5, r + 0.5) inside for c = 2..4, r = 1..2.
    square = Polygon([(2, 1), (5, 1), (5, 3), (2, 3)])
    expected = np.zeros((5, 7), np.int32)
    expected[1:3, 2:5] = 1
    np.testing.assert_array_equal(polygon_labels([square], (5, 7)), expected)


def test_hole_is_left_out_and_ids_follow_the_polygons():
    ring = Polygon([(0, 0), (6, 0), (6, 6), (0, 6)], [[(2, 2), (4, 2), (4, 4), (2, 4)]])
    off_grid = Polygon([(20, 20), (22, 20), (22, 22)])
    inside_hole = Polygon([(2, 2), (3, 2), (3, 3), (2, 3)])  # the pixel (2, 2) in the hole
    labels = polygon_labels([ring, off_grid, inside_hole], (8, 8))
    expected = np.zeros((8, 8), np.int32)
    expected[0:6, 0:6] = 1
    expected[2:4, 2:4] = 0
    expected[2, 2] = 2  # the off-grid polygon got no id: ids stay consecutive
    np.testing.assert_array_equal(labels, expected)


def test_overlapping_polygons_keep_the_earlier_one():
    first = Polygon([(0, 0), (4, 0), (4, 4), (0, 4)])
    second = Polygon([(2, 0), (6, 0), (6, 4), (2, 4)])
    labels = polygon_labels([first, second], (4, 6))
    assert (labels[:, :4] == 1).all() and (labels[:, 4:] == 2).all()


def test_disc_matches_the_analytic_pixel_centres():
    centre_xy, radius = (10.2, 9.7), 6.3
    disc = Point(centre_xy).buffer(radius, quad_segs=256)  # polygon within 1e-4 px of the circle
    rows, cols = np.mgrid[0:20, 0:22]
    distance = np.hypot(cols + 0.5 - centre_xy[0], rows + 0.5 - centre_xy[1])
    assert np.abs(distance - radius).min() > 1e-3  # no pixel centre on the edge: exact answer
    np.testing.assert_array_equal(polygon_labels([disc], (20, 22)), distance < radius)
    assert abs((distance < radius).sum() - np.pi * radius**2) < 2 * np.pi * radius  # sanity


def test_predicts_outlines_rasterise_back_onto_their_masks():
    """Polygons traced by predict from a label map fall back onto the same pixels."""
    _, truth = disc_image(120, 140, [(30, 30), (30, 90), (85, 50), (80, 110)], radius=11.0)
    polygons = label_polygons(truth, np.arange(1, truth.max() + 1), (0, 0), 1.0)
    back = polygon_labels([polygons[i] for i in sorted(polygons)], truth.shape)
    assert back.max() == truth.max() == 4
    for label in range(1, 5):
        a, b = truth == label, back == label
        assert (a & b).sum() / (a | b).sum() > 0.97


@pytest.fixture(scope="module")
def tile() -> Sample:
    """A 600×520 px tile at 0.25 µm/px (2×2 model tiles at 0.5 µm/px) with 20-ish discs."""
    centres = [(y, x) for y in range(40, 580, 70) for x in range(45, 500, 75)]
    image, truth = disc_image(600, 520, centres, radius=13.0)
    return Sample("synthetic", image, truth, TILE_MPP)


def test_native_evaluation_scores_the_geojson_that_predict_writes(tile, tmp_path, monkeypatch):
    use_oracle_in_cli(monkeypatch)
    image_path = tmp_path / "tile.png"
    Image.fromarray(tile.image).save(image_path)
    geojson = tmp_path / "tile.geojson"
    args = ["predict", str(image_path), "--mpp", str(TILE_MPP), "--out", str(geojson)]
    result = CliRunner().invoke(cellseg, args)
    assert result.exit_code == 0, result.output
    written = read_geojson_polygons(geojson)
    assert len(written) == len(json.loads(geojson.read_text())["features"]) > 15
    expected = score_labels(tile.image_id, tile.labels, polygon_labels(written, tile.labels.shape))

    evaluated = evaluate_samples(DiscOracle(), [tile], "native")
    assert evaluated["per_image"] == [expected]
    assert expected["nuclei_pred"] == len(written) == expected["nuclei_true"]
    assert expected["dice"] > 0.9 and expected["aji"] > 0.8  # a real segmentation, not empty


def test_tile_cache_runs_the_model_once_per_distinct_tile():
    oracle = DiscOracle()
    cache = TileCache(oracle)
    image, _ = disc_image(224, 448, [(100, 100), (100, 300)])
    tiles = np.stack([image[:, :224], image[:, 224:], image[:, :224]])
    first = cache(tiles)
    again = cache(tiles[::-1].copy())
    assert oracle.calls == cache.tiles_run == 2
    np.testing.assert_array_equal(first, DiscOracle.probabilities(tiles))
    np.testing.assert_array_equal(again, first[::-1])
    assert (cache.mpp, cache.tile_px, cache.num_classes) == (0.5, 224, 3)


def test_tuning_runs_the_network_once_and_picks_the_best_aji(tile):
    oracle = DiscOracle()
    base = PostProcess(min_area_um2=60.0)  # above a disc's ~33 µm²: nothing survives
    grids = [{"min_area_um2": (3.0, 60.0)}, {"fg_threshold": (0.3, 0.5)}]
    best, rows = tune_postprocess(oracle, [tile], base, grids)
    one_pass = DiscOracle()
    evaluate_samples(one_pass, [tile], "native")
    assert oracle.calls == one_pass.calls  # four candidates, one network pass
    assert [row["stage"] for row in rows] == [0, 1, 2]  # (60, 0.5) was scored in stage 0
    assert rows[0]["aji"] == 0.0 and best.min_area_um2 == 3.0
    chosen = evaluate_samples(DiscOracle(), [tile], "native", post=best)["summary"]
    assert max(row["aji"] for row in rows) == chosen["aji"]["mean"] > 0.8
    assert {"pq", "dq", "sq", "dice"} <= set(rows[0])


def test_tuning_over_domains_weighs_each_domain_the_same(tile):
    grids = [{"min_area_um2": (3.0, 60.0)}]
    empty = dataclasses.replace(tile, image_id="empty", labels=np.zeros_like(tile.labels))
    _, rows = tune_postprocess(
        DiscOracle(), {"a": [tile], "b": [tile, tile, empty]}, PostProcess(), grids
    )
    for row in rows:
        assert row["aji"] == pytest.approx((row["aji_a"] + row["aji_b"]) / 2)
    alone = evaluate_samples(DiscOracle(), [tile, tile, empty], "native", post=PostProcess())
    alone = alone["summary"]
    assert rows[0]["aji_b"] == pytest.approx(alone["aji"]["mean"])
