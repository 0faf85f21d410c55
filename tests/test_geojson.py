"""QuPath GeoJSON: polygon geometry by hand, validity after the 0.01 px snap, schema, streaming."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import geopandas
import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon, box
from skimage import draw

from cellseg.geojson import (
    AREA_KEY,
    PERIMETER_KEY,
    GeoJSONWriter,
    feature_namespace,
    label_polygons,
    mask_polygon,
    measure_polygons,
    polygon_measurements,
    snap_polygon,
)


def _square_mask(size: int, pad: int) -> np.ndarray:
    mask = np.zeros((size + 2 * pad, size + 2 * pad), bool)
    mask[pad : pad + size, pad : pad + size] = True
    return mask


def _random_nuclei(count: int, seed: int = 0) -> list[np.ndarray]:
    """Irregular blob masks: unions of random ellipses, some touching the crop edge."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        mask = np.zeros((24, 24), bool)
        for _ in range(rng.integers(1, 4)):
            rr, cc = draw.ellipse(
                rng.uniform(4, 20),
                rng.uniform(4, 20),
                rng.uniform(1, 8),
                rng.uniform(1, 8),
                shape=mask.shape,
                rotation=rng.uniform(0, np.pi),
            )
            mask[rr, cc] = True
        masks.append(mask)
    return masks


def _on_grid(values: np.ndarray) -> bool:
    return bool(np.all(np.abs(values * 100 - np.round(values * 100)) < 1e-6))


def _qupath_accepts(polygon: Polygon) -> bool:
    """QuPath ≥ 0.6 reduces geometries to the 0.01 grid on import: it must stay valid and equal."""
    reduced = shapely.set_precision(polygon, 0.01)
    return reduced.is_valid and reduced.equals(polygon) and len(polygon.exterior.coords) >= 4


# ------------------------------------------------------------------------------------- polygons


def test_square_mask_polygon_by_hand() -> None:
    # A 4×4 square at mask pixels [1, 5) in a crop whose pixel (0, 0) is raster pixel (10, 20),
    # 2 level-0 px per raster px, shifted by OpenSlide bounds (1, 3):
    # x = ([1, 5] + 10)·2 − 1 = [21, 29], y = ([1, 5] + 20)·2 − 3 = [39, 47].
    polygon = mask_polygon(_square_mask(4, 1), origin_xy=(10, 20), scale=2.0, offset_xy=(1, 3))
    assert polygon.bounds == (21.0, 39.0, 29.0, 47.0)
    # Marching squares cuts each of the 4 corners by 1/8 raster px²: (16 − 0.5) · 2².
    assert polygon.area == pytest.approx(62.0)
    assert polygon.is_valid and not polygon.interiors
    assert len(polygon.exterior.coords) == 9  # 4 edges + 4 cut corners, collinear points dropped
    assert _qupath_accepts(polygon)


def test_single_pixel_is_a_diamond_inside_the_pixel() -> None:
    mask = np.zeros((3, 3), bool)
    mask[1, 2] = True  # pixel (c=2, r=1) covers [2, 3) × [1, 2)
    polygon = mask_polygon(mask, origin_xy=(0, 0), scale=1.0)
    assert polygon.bounds == (2.0, 1.0, 3.0, 2.0)
    assert polygon.area == pytest.approx(0.5)


def test_mask_touching_the_crop_edge_is_closed_at_the_edge() -> None:
    polygon = mask_polygon(np.ones((5, 3), bool), origin_xy=(0, 0), scale=1.0)
    assert polygon.bounds == (0.0, 0.0, 3.0, 5.0)
    assert polygon.area == pytest.approx(15 - 0.5)


def test_holes_are_filled() -> None:
    mask = _square_mask(7, 1)
    mask[3:6, 3:6] = False
    polygon = mask_polygon(mask, origin_xy=(0, 0), scale=1.0)
    assert not polygon.interiors
    assert polygon.area == pytest.approx(49 - 0.5)


def test_largest_component_is_kept() -> None:
    mask = np.zeros((12, 12), bool)
    mask[1:3, 1:3] = True
    mask[5:11, 4:10] = True
    polygon = mask_polygon(mask, origin_xy=(0, 0), scale=1.0)
    assert polygon.bounds == (4.0, 5.0, 10.0, 11.0)


def test_empty_mask_gives_none_and_bad_shapes_raise() -> None:
    assert mask_polygon(np.zeros((4, 4), bool), (0, 0), 1.0) is None
    with pytest.raises(ValueError, match="mask"):
        mask_polygon(np.zeros((4, 4, 1), bool), (0, 0), 1.0)


def test_random_nuclei_survive_the_qupath_snap() -> None:
    # A scale and offsets that put every vertex off the 0.01 grid before snapping.
    polygons = [
        mask_polygon(mask, origin_xy=(1234.5, 987.25), scale=1.9961, offset_xy=(0.333, 17.777))
        for mask in _random_nuclei(200)
    ]
    assert sum(p is not None for p in polygons) >= 190
    for polygon in filter(None, polygons):
        coords = np.asarray(polygon.exterior.coords)
        assert _on_grid(coords)
        assert _qupath_accepts(polygon)
        assert shapely.is_ccw(polygon.exterior)  # RFC 7946 winding


def test_polygon_rasterises_back_to_the_filled_mask() -> None:
    # Every pixel centre of the mask lies inside the outline and every other centre outside, so
    # rasterising the polygon (centre rule) gives the mask back: the Zarr labels and the
    # GeoJSON polygons of the pipeline describe the same pixels.
    rng = np.random.default_rng(7)
    for _ in range(50):
        mask = np.zeros((26, 26), bool)
        rr, cc = draw.ellipse(
            13,
            13,
            rng.uniform(2, 11),
            rng.uniform(2, 11),
            shape=mask.shape,
            rotation=rng.uniform(0, np.pi),
        )
        mask[rr, cc] = True
        polygon = mask_polygon(mask, origin_xy=(0, 0), scale=1.0)
        xy = np.asarray(polygon.exterior.coords)
        rows, cols = draw.polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=mask.shape)
        raster = np.zeros_like(mask)
        raster[rows, cols] = True
        np.testing.assert_array_equal(raster, mask)


def test_snap_repairs_a_bow_tie_and_drops_slivers() -> None:
    bow_tie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    assert not bow_tie.is_valid
    repaired = snap_polygon(bow_tie)
    assert repaired.is_valid and repaired.area == pytest.approx(25.0)
    sliver = Polygon([(0, 0), (10, 0.001), (10, 0.002), (0, 0.003)])  # collapses on the grid
    assert snap_polygon(sliver) is None


def test_polygon_measurements_by_hand() -> None:
    values = polygon_measurements(box(0, 0, 10, 20), level0_mpp=0.5)
    assert values == {AREA_KEY: pytest.approx(50.0), PERIMETER_KEY: pytest.approx(30.0)}
    assert AREA_KEY == "Area µm^2" and PERIMETER_KEY == "Perimeter µm"


# ------------------------------------------------------------------------------ batch outlines


def test_label_polygons_by_hand() -> None:
    # Two touching 2×2 squares; map pixel (0, 0) is raster pixel (10, 20), scale 2, offset (1, 3):
    # square 1: x = ([0, 2] + 10)·2 − 1 = [19, 23], y = ([0, 2] + 20)·2 − 3 = [37, 41].
    labels = np.array([[1, 1, 2, 2], [1, 1, 2, 2]], dtype=np.int32)
    polygons = label_polygons(labels, [1, 2], origin_xy=(10, 20), scale=2.0, offset_xy=(1, 3))
    assert sorted(polygons) == [1, 2]
    assert polygons[1].bounds == (19.0, 37.0, 23.0, 41.0)
    assert polygons[2].bounds == (23.0, 37.0, 27.0, 41.0)
    assert polygons[1].area == polygons[2].area == pytest.approx((4 - 0.5) * 4)


def _blob_labels(shape: tuple[int, int], count: int, seed: int) -> np.ndarray:
    """Random ellipses painted over each other: touching nuclei, nuclei cut in several parts
    or left with holes by later ones, nuclei on the map's edge."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for index in range(1, count + 1):
        rr, cc = draw.ellipse(
            rng.uniform(0, shape[0]),
            rng.uniform(0, shape[1]),
            rng.uniform(1, 9),
            rng.uniform(1, 9),
            shape=shape,
            rotation=rng.uniform(0, np.pi),
        )
        labels[rr, cc] = index
    return labels


def _assert_same_as_mask_polygon(labels, ids, origin_xy, scale, offset_xy) -> int:
    """label_polygons equals mask_polygon on each id's bounding box, vertex for vertex."""
    polygons = label_polygons(labels, ids, origin_xy, scale, offset_xy)
    boxes = ndi.find_objects(labels)
    compared = 0
    for index in ids:
        rows, cols = boxes[index - 1] or (slice(0, 0), slice(0, 0))
        crop_origin = (origin_xy[0] + cols.start, origin_xy[1] + rows.start)
        crop = labels[rows, cols] == index
        expected = mask_polygon(crop, crop_origin, scale, offset_xy) if crop.any() else None
        if expected is None:
            assert index not in polygons
            continue
        got = np.asarray(polygons[index].exterior.coords)
        np.testing.assert_array_equal(got, np.asarray(expected.exterior.coords))
        compared += 1
    assert set(polygons) <= set(ids)
    return compared


@pytest.mark.parametrize("seed", [0, 1])
def test_label_polygons_equal_mask_polygon_on_touching_nuclei(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if seed == 1:  # trace a few instances at a time, as on maps of speckle
        monkeypatch.setattr("cellseg.geojson._BATCH_SEGMENTS", 200)
    labels = _blob_labels((120, 160), 150, seed)
    ids = list(range(1, 151))
    # Scale and offsets put the vertices off the 0.01 grid before snapping.
    assert _assert_same_as_mask_polygon(labels, ids, (1234, 987), 1.9961, (0.333, 17.777)) > 100
    # A subset of ids, the others treated as background, and a fractional origin.
    assert _assert_same_as_mask_polygon(labels, ids[::3], (0.5, 2.25), 2.0, (0, 0)) > 30
    # So small a scale that many rings fold over on the grid: repaired by snap_polygon, or
    # dropped when nothing with area is left, in both functions alike.
    assert _assert_same_as_mask_polygon(labels, ids, (1234, 987), 0.0071, (0.333, 17.777)) < 145


def test_label_polygons_equal_mask_polygon_on_pixel_noise() -> None:
    # Diagonal contacts (marching-squares saddles), one-pixel parts and equal-area parts.
    rng = np.random.default_rng(2)
    for _ in range(20):
        labels = rng.integers(0, 5, size=(17, 23)).astype(np.int32)
        _assert_same_as_mask_polygon(labels, [1, 2, 3, 4], (7, 3), 1.0, (0.25, 0.5))


def test_label_polygons_leave_out_missing_ids_and_reject_bad_input() -> None:
    labels = np.zeros((6, 6), np.int32)
    labels[1:4, 1:4] = 3
    assert sorted(label_polygons(labels, [3, 5, 3], (0, 0), 1.0)) == [3]
    assert label_polygons(labels, [], (0, 0), 1.0) == {}
    with pytest.raises(ValueError, match="positive"):
        label_polygons(labels, [0, 3], (0, 0), 1.0)
    with pytest.raises(ValueError, match="integer label map"):
        label_polygons(labels > 0, [1], (0, 0), 1.0)


def test_measure_polygons_equal_polygon_measurements(nuclei: list[Polygon]) -> None:
    assert measure_polygons(nuclei, 0.2527) == [polygon_measurements(p, 0.2527) for p in nuclei]
    assert measure_polygons([], 0.5) == []


# --------------------------------------------------------------------------------------- writer


def _write(path: Path, polygons: list[Polygon], **kwargs) -> list[str]:
    with GeoJSONWriter(path, **kwargs) as writer:
        ids = [writer.write(p, {"Probability": 0.5 + i / 100}) for i, p in enumerate(polygons)]
        assert writer.features_written == len(polygons)
    return ids


@pytest.fixture(scope="module")
def nuclei() -> list[Polygon]:
    polygons = [
        mask_polygon(mask, origin_xy=(40 * i, 30 * (i % 7)), scale=1.5, offset_xy=(0.5, 0.25))
        for i, mask in enumerate(_random_nuclei(60, seed=1))
    ]
    return [p for p in polygons if p is not None]


def test_feature_schema(tmp_path: Path, nuclei: list[Polygon]) -> None:
    path = tmp_path / "nuclei.geojson"
    with GeoJSONWriter(path, class_name="Nucleus", color=(1, 2, 3)) as writer:
        ids = [writer.write(nuclei[0], polygon_measurements(nuclei[0], 0.25))]
        ids.append(writer.write(nuclei[1], {"nan": np.nan, "inf": np.inf, "ninf": -np.inf}))
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["type"] == "FeatureCollection"
    first, second = document["features"]
    assert set(first) == {"type", "id", "geometry", "properties"}
    assert first["type"] == "Feature"
    assert [f["id"] for f in document["features"]] == ids
    assert all(uuid.UUID(i).version == 4 for i in ids)
    assert first["properties"] == {
        "objectType": "detection",
        "classification": {"name": "Nucleus", "color": [1, 2, 3]},
        "measurements": {
            "Area µm^2": pytest.approx(nuclei[0].area / 16),
            "Perimeter µm": pytest.approx(nuclei[0].length / 4),
        },
    }
    assert second["properties"]["measurements"] == {"nan": "NaN", "inf": "Inf", "ninf": "-Inf"}
    ring = first["geometry"]["coordinates"][0]
    assert first["geometry"]["type"] == "Polygon"
    assert ring[0] == ring[-1] and len(ring) >= 4
    assert Polygon(ring).equals(nuclei[0])
    assert "NaN" not in path.read_text().replace('"NaN"', "")  # never a bare NaN token


def test_coordinates_are_rounded_to_two_decimals(tmp_path: Path) -> None:
    path = tmp_path / "round.geojson"
    _write(path, [Polygon([(0.123456, 0.0), (10.987654, 0.0), (10.5, 9.999999)])])
    ring = json.loads(path.read_text())["features"][0]["geometry"]["coordinates"][0]
    assert ring == [[0.12, 0.0], [10.99, 0.0], [10.5, 10.0], [0.12, 0.0]]


def test_unique_ids(tmp_path: Path, nuclei: list[Polygon]) -> None:
    ids = _write(tmp_path / "ids.geojson", nuclei)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("object_type", ["detection", "cell", "annotation"])
def test_object_types(tmp_path: Path, nuclei: list[Polygon], object_type: str) -> None:
    path = tmp_path / "typed.geojson"
    _write(path, nuclei[:2], object_type=object_type)
    for feature in json.loads(path.read_text())["features"]:
        assert feature["properties"]["objectType"] == object_type
        if object_type == "cell":
            assert feature["nucleusGeometry"] == feature["geometry"]
        else:
            assert "nucleusGeometry" not in feature


def test_bad_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="object_type"):
        GeoJSONWriter(tmp_path / "x.geojson", object_type="tile")
    with pytest.raises(ValueError, match="color"):
        GeoJSONWriter(tmp_path / "x.geojson", color=(300, 0, 0))


def test_invalid_polygon_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.geojson"
    with GeoJSONWriter(path) as writer, pytest.raises(ValueError, match="invalid"):
        writer.write(Polygon([(0, 0), (10, 10), (10, 0), (0, 10)]))
    assert json.loads(path.read_text())["features"] == []


def test_write_outside_the_context_is_an_error(tmp_path: Path) -> None:
    writer = GeoJSONWriter(tmp_path / "x.geojson")
    with pytest.raises(RuntimeError, match="with"):
        writer.write(box(0, 0, 1, 1))


def test_gzip_round_trip(tmp_path: Path, nuclei: list[Polygon]) -> None:
    plain, packed = tmp_path / "n.geojson", tmp_path / "n.geojson.gz"
    _write(plain, nuclei)
    _write(packed, nuclei)
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    with gzip.open(packed, "rt", encoding="utf-8") as stream:
        unpacked = json.load(stream)
    expected = json.loads(plain.read_text())
    for feature in (*unpacked["features"], *expected["features"]):
        feature.pop("id")
    assert unpacked == expected


def test_streams_to_a_partial_file_then_renames(tmp_path: Path, nuclei: list[Polygon]) -> None:
    path = tmp_path / "n.geojson"
    with GeoJSONWriter(path) as writer:
        writer.write(nuclei[0])
        assert not path.exists()
        assert writer.partial_path.exists()
    assert path.exists() and not writer.partial_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.geojson"]


@pytest.mark.parametrize("name", ["n.geojson", "n.geojson.gz"])
def test_exception_leaves_no_file(tmp_path: Path, nuclei: list[Polygon], name: str) -> None:
    path = tmp_path / name
    with pytest.raises(KeyError), GeoJSONWriter(path) as writer:
        writer.write(nuclei[0])
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_complete_file(
    tmp_path: Path, nuclei: list[Polygon]
) -> None:
    path = tmp_path / "n.geojson"
    _write(path, nuclei[:3])
    before = path.read_bytes()
    with pytest.raises(RuntimeError), GeoJSONWriter(path) as writer:
        writer.write(nuclei[4])
        raise RuntimeError("killed")
    assert path.read_bytes() == before


def test_failure_while_finishing_leaves_no_file(
    tmp_path: Path, nuclei: list[Polygon], monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cellseg.atomic.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"), GeoJSONWriter(tmp_path / "n.geojson.gz") as w:
        w.write(nuclei[0])
    assert list(tmp_path.iterdir()) == []


def test_multipolygons_are_refused(tmp_path: Path) -> None:
    with GeoJSONWriter(tmp_path / "m.geojson") as writer, pytest.raises(TypeError, match="one"):
        writer.write(box(0, 0, 1, 1).union(box(2, 2, 3, 3)))


def test_empty_collection_is_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "empty.geojson"
    _write(path, [])
    assert json.loads(path.read_text()) == {"type": "FeatureCollection", "features": []}


@pytest.mark.parametrize("name", ["n.geojson", "n.geojson.gz"])
def test_gis_and_jts_style_readers_load_every_geometry(
    tmp_path: Path, nuclei: list[Polygon], name: str
) -> None:
    path = tmp_path / name
    ids = _write(path, nuclei, object_type="cell")
    gdal_path = f"/vsigzip/{path}" if name.endswith(".gz") else path
    frame = geopandas.read_file(gdal_path)
    assert len(frame) == len(nuclei)
    assert frame.geometry.is_valid.all()
    assert (frame.geometry.geom_type == "Polygon").all()
    assert sorted(frame["id"]) == sorted(ids)
    # QuPath (JTS) reduces every geometry to the 0.01 px grid and rejects the file on any error.
    reduced = shapely.set_precision(frame.geometry.to_numpy(), 0.01)
    assert shapely.is_valid(reduced).all()
    assert not shapely.is_empty(reduced).any()
    assert np.allclose(shapely.area(reduced), shapely.area(frame.geometry.to_numpy()))


def test_keyed_ids_are_uuid5_of_the_slide_and_the_nucleus(tmp_path: Path, nuclei) -> None:
    a, b = feature_namespace("ab" * 32), feature_namespace("cd" * 32)
    runs = []
    for name, namespace in (("1", a), ("2", a), ("3", b)):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "n.geojson.gz"
        with GeoJSONWriter(path, id_namespace=namespace) as writer:
            ids = [writer.write(p, {"x": 1.5}, key=f"{i}") for i, p in enumerate(nuclei[:5])]
        runs.append((path.read_bytes(), ids))
    assert runs[0] == runs[1]  # byte-identical, gzip header included
    assert runs[0][1][0] == str(uuid.uuid5(a, "0")) and uuid.UUID(runs[0][1][0]).version == 5
    assert not set(runs[0][1]) & set(runs[2][1])  # another slide: other ids


def test_a_cell_has_its_own_geometry_and_the_nucleus_geometry(tmp_path: Path, nuclei) -> None:
    path = tmp_path / "cells.geojson"
    nucleus = nuclei[0]
    cell = nucleus.buffer(3, join_style="mitre")
    with GeoJSONWriter(path, object_type="cell") as writer:
        writer.write(nucleus, {}, cell=cell)
    (feature,) = json.loads(path.read_text())["features"]
    assert Polygon(feature["nucleusGeometry"]["coordinates"][0]).equals(nucleus)
    assert Polygon(feature["geometry"]["coordinates"][0]).equals(snap_polygon(cell))
