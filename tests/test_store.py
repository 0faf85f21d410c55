"""The OME-Zarr store's pyramids (cellseg.store), on small arrays."""

from __future__ import annotations

import numpy as np
import zarr

from cellseg.store import (
    INTERIOR,
    LABELS,
    PIXELS,
    PredictionStore,
    downsample_mean,
    downsample_nearest,
    pyramid_shapes,
)


def test_downsampling_by_hand():
    block = np.array([[0, 2, 9], [4, 6, 9], [255, 255, 1]], np.uint8)
    # Means of 2×2 (rounded half up), of 2×1, 1×2 and 1×1 on the odd edges.
    np.testing.assert_array_equal(downsample_mean(block), [[3, 9], [255, 1]])
    np.testing.assert_array_equal(downsample_nearest(block.astype(np.uint32)), [[0, 9], [255, 1]])


def test_pyramid_shapes_halve_down_to_256_with_at_least_two_levels():
    assert pyramid_shapes((600, 900)) == [(600, 900), (300, 450), (150, 225)]
    assert pyramid_shapes((100, 60)) == [(100, 60), (50, 30)]
    assert pyramid_shapes((1, 1)) == [(1, 1)]


def test_finish_builds_the_pyramids_and_can_run_again(tmp_path):
    """A finish() interrupted after some levels (a killed run that resumes) is simply redone."""
    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    store = PredictionStore.create(
        path, (300, 520), num_classes=3, with_labels=True, chunk_px=128, attrs={"mpp": 0.5}
    )
    probs = rng.dirichlet(np.ones(3), size=(300, 520)).transpose(2, 0, 1).astype(np.float32)
    store.write_probabilities((0, 300, 0, 520), probs)
    ids = rng.integers(0, 50, (300, 520)).astype(np.uint32)
    store.write_labels((0, 300, 0, 520), ids, first_id=1)
    store.write_pixels((0, 300, 0, 520), rng.integers(0, 256, (300, 520, 3), dtype=np.uint8))
    store.finish({"nuclei": 49})
    first = {k: zarr.open_group(str(path))[k][:] for k in ("1", "2", "labels/nuclei/1")}
    again = PredictionStore.open(path, (300, 520))
    again.finish({"nuclei": 49})
    group = zarr.open_group(str(path), mode="r")
    assert sorted(group.keys()) == ["0", "1", "2", "labels"]
    for key, level in first.items():
        np.testing.assert_array_equal(group[key][:], level)
    np.testing.assert_array_equal(group["1"][:], downsample_mean(group["0"][:]))
    np.testing.assert_array_equal(group["labels/nuclei/1"][:], group[LABELS][:][::2, ::2])
    scales = [
        d["coordinateTransformations"][0]["scale"]
        for d in group.attrs["multiscales"][0]["datasets"]
    ]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    assert group["labels"].attrs["labels"] == ["nuclei"]
    assert group["labels/nuclei"].attrs["image-label"]["source"] == {"image": "../../"}
    assert group.attrs["complete"] is True


def test_finish_removes_chunk_folders_that_lost_their_metadata(tmp_path):
    """zarr deletes an array's metadata before its chunks: a run killed in between leaves chunk
    folders that zarr no longer lists. finish() leaves exactly the pyramids (issue 13)."""
    path = tmp_path / "s.zarr"
    store = PredictionStore.create(path, (300, 200), num_classes=3, with_labels=True, chunk_px=128)
    store.write_pixels((0, 300, 0, 200), np.zeros((300, 200, 3), np.uint8))  # rgb chunks on disk
    for name in (INTERIOR, PIXELS):
        (path / name / ".zarray").unlink()  # metadata gone, chunks kept
    (path / "labels" / "nuclei" / "7").mkdir()  # e.g. a level of another shape
    (path / "labels" / "nuclei" / "7" / "0").write_bytes(b"x")
    reopened = PredictionStore.open(path, (300, 200))
    assert not reopened.has_pixels and not reopened.has_interior
    reopened.finish({})
    assert sorted(p.name for p in path.iterdir()) == [".zattrs", ".zgroup", "0", "1", "labels"]
    nuclei = path / "labels" / "nuclei"
    assert sorted(p.name for p in nuclei.iterdir()) == [".zattrs", ".zgroup", "0", "1"]
    assert sorted(zarr.open_group(str(path), mode="r").keys()) == ["0", "1", "labels"]
