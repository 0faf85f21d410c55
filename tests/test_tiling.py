"""Geometry of whole-slide tiling (cellseg.tiling), seam-free blending (cellseg.stitch) and the
block-at-once probability writes (cellseg.store)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from oracle import DiscOracle, QuarterOracle

from cellseg.stitch import Stitcher
from cellseg.store import PredictionStore, to_uint8
from cellseg.tiling import (
    Canvas,
    TileLayout,
    blend_weights,
    overlap_for_mpp,
    tiles_per_block_for,
    tissue_tiles,
)


def test_canvas_from_area_covers_the_area_at_the_model_resolution():
    same = Canvas.from_area((10, 20, 1500, 1200), slide_mpp=0.5, model_mpp=0.5)
    assert (same.width_px, same.height_px, same.scale) == (1500, 1200, 1.0)
    half = Canvas.from_area((0, 0, 2048, 1535), slide_mpp=0.25, model_mpp=0.5)
    assert (half.width_px, half.height_px, half.scale) == (1024, 768, 2.0)  # 767.5 rounds up
    assert half.level0_xy(3, 4) == (6.0, 8.0)
    assert same.level0_xy(0, 0) == (10.0, 20.0)


def test_overlap_and_block_size_defaults():
    assert overlap_for_mpp(0.5) == 32  # 16 µm
    assert overlap_for_mpp(0.25) == 64
    assert overlap_for_mpp(0.1) == 110  # capped below half a tile
    assert tiles_per_block_for(2048, 224, 32) == 11  # 11 × 192 = 2112 px


@pytest.mark.parametrize("length, expected", [(1, 1), (224, 1), (225, 2), (416, 2), (417, 3)])
def test_tile_count_reaches_the_canvas_end(length, expected):
    layout = TileLayout(length, length, overlap_px=32, tiles_per_block=2, halo_px=0)
    assert layout.n_tiles_yx == (expected, expected)
    last = (expected - 1) * layout.stride_px + layout.tile_px
    assert last >= length > last - layout.stride_px or expected == 1


def test_layout_rejects_a_halo_that_reaches_beyond_the_neighbours():
    with pytest.raises(ValueError, match="halo_px"):
        TileLayout(1000, 1000, overlap_px=32, tiles_per_block=2, halo_px=353)
    with pytest.raises(ValueError, match="overlap_px"):
        TileLayout(1000, 1000, overlap_px=112)


def _covering_blocks(layout: TileLayout, axis: int) -> list[tuple[int, ...]]:
    """Brute force: for every pixel of an axis, the blocks whose footprint covers it."""
    length = layout.height_px if axis == 0 else layout.width_px
    spans = []
    for c in range(layout.n_blocks_yx[axis]):
        box = layout.block_footprint(c, c) if axis == 0 else layout.block_footprint(0, c)
        spans.append(box[0:2] if axis == 0 else box[2:4])
    return [tuple(c for c, (a, b) in enumerate(spans) if a <= p < b) for p in range(length)]


@pytest.mark.parametrize("height, width", [(1200, 1500), (385, 1000), (100, 200)])
def test_segments_partition_the_axes_by_covering_blocks(height, width):
    layout = TileLayout(height, width, overlap_px=32, tiles_per_block=2, halo_px=64)
    for axis, length in ((0, height), (1, width)):
        segments = layout.segments(axis)
        assert segments[0].start == 0 and segments[-1].end == length
        assert all(a.end == b.start for a, b in itertools.pairwise(segments))
        brute = _covering_blocks(layout, axis)
        for seg in segments:
            assert all(brute[p] == seg.blocks for p in range(seg.start, seg.end))


def _blocks_under_window(layout: TileLayout, window) -> set[tuple[int, int]]:
    """Brute force: the blocks owning some tile that overlaps ``window``."""
    y0, y1, x0, x1 = window
    ny, nx = layout.n_tiles_yx
    k = layout.tiles_per_block
    found = set()
    for ty, tx in itertools.product(range(ny), range(nx)):
        ty0, ty1, tx0, tx1 = layout.tiles_box(ty, ty + 1, tx, tx + 1)
        if ty0 < y1 and ty1 > y0 and tx0 < x1 and tx1 > x0:
            found.add((ty // k, tx // k))
    return found


@pytest.mark.parametrize("height, width", [(1300, 1500), (700, 420), (2000, 1000)])
def test_region_cores_tile_the_canvas(height, width):
    layout = TileLayout(height, width, overlap_px=32, tiles_per_block=2, halo_px=64)
    owners = np.zeros((height, width), np.int32)
    for by, bx in layout.blocks():
        y0, y1, x0, x1 = layout.region_core(by, bx)
        owners[y0:y1, x0:x1] += 1
        # Cores are the block cores (384 px) moved up and left by the halo.
        assert y0 == (0 if by == 0 else 384 * by - 64) and x0 == (0 if bx == 0 else 384 * bx - 64)
    assert np.all(owners == 1)


@pytest.mark.parametrize("halo_px", [0, 64, 352])
def test_a_region_depends_on_its_own_block_and_earlier_ones_only(halo_px):
    """The invariant that lets a region be labelled right after its block is predicted."""
    layout = TileLayout(1300, 1500, overlap_px=32, tiles_per_block=2, halo_px=halo_px)
    for by, bx in layout.blocks():
        needed = layout.region_blocks(by, bx)
        assert set(needed) == _blocks_under_window(layout, layout.region_window(by, bx))
        assert max(needed) == (by, bx)  # the last one in raster order is its own block
        assert all(y <= by and x <= bx for y, x in needed)
        if 2 * halo_px + layout.overlap_px <= layout.block_px:
            assert all(y >= by - 1 and x >= bx - 1 for y, x in needed)  # 2×2 at most


def test_tissue_tiles_keeps_exactly_the_tiles_over_tissue():
    layout = TileLayout(1000, 1000, overlap_px=32, tiles_per_block=2, halo_px=0)
    canvas = Canvas((0.0, 0.0), 1.0, 1000, 1000)
    mask = np.zeros((63, 63), bool)  # 16 level-0 px per mask pixel
    mask[25, 10] = True  # level-0 rows 400-416, cols 160-176
    keep = tissue_tiles(mask, (16.0, 16.0), canvas, layout)
    # Tile t spans level-0 [192·t, 192·t + 224), i.e. mask pixels [12·t, 12·t + 14): rows 24-26
    # fall in tiles 1 and 2, columns 9-11 in tile 0 only.
    expected = np.zeros(layout.n_tiles_yx, bool)
    expected[1:3, 0] = True
    np.testing.assert_array_equal(keep, expected)


def _stitch(image, oracle, layout, skip=None, active=None):
    """Runs the stitcher block by block over an in-memory image; returns the C×H×W result."""
    h, w = image.shape[:2]
    padded = np.full((h + layout.tile_px, w + layout.tile_px, 3), 255, np.uint8)
    padded[:h, :w] = image
    stitcher = Stitcher(layout, 3, blend_weights(layout.tile_px, layout.overlap_px), active)
    out = np.full((3, h, w), np.nan, np.float32)
    s, t = layout.stride_px, layout.tile_px
    for block in layout.blocks():
        if active is not None and not active[block]:
            continue
        ty0, ty1, tx0, tx1 = layout.block_tiles(*block)
        tiles = [
            (ty, tx)
            for ty, tx in itertools.product(range(ty0, ty1), range(tx0, tx1))
            if skip is None or not skip[ty, tx]
        ]
        if tiles:
            batch = np.stack([padded[ty * s : ty * s + t, tx * s : tx * s + t] for ty, tx in tiles])
            stitcher.add_tiles(block, tiles, oracle.probabilities(batch))
        for cell in stitcher.finish_block(block):
            y0, y1, x0, x1 = cell.box
            assert np.isnan(out[:, y0:y1, x0:x1]).all(), "a cell was emitted twice"
            out[:, y0:y1, x0:x1] = cell.probs
    assert stitcher.pending_cells == 0
    return out


def test_stitched_probabilities_equal_the_oracle_on_the_whole_image():
    """0/1 probabilities: Σ w·p / Σ w is exact in float32, so the round trip is bit-exact."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    layout = TileLayout(700, 900, overlap_px=32, tiles_per_block=2, halo_px=64)
    stitched = _stitch(image, DiscOracle, layout)
    np.testing.assert_array_equal(stitched, DiscOracle.probabilities(image[None])[0])


def test_graded_probabilities_round_trip_to_float_precision_and_exactly_in_uint8():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (500, 700, 3), dtype=np.uint8)
    layout = TileLayout(500, 700, overlap_px=48, tiles_per_block=3, halo_px=64)
    stitched = _stitch(image, QuarterOracle, layout)
    expected = QuarterOracle.probabilities(image[None])[0]
    np.testing.assert_allclose(stitched, expected, rtol=0, atol=3e-7)
    np.testing.assert_array_equal(to_uint8(stitched), to_uint8(expected))


def test_blending_is_a_weighted_mean_for_tiles_that_disagree():
    """A tile-position-dependent model: the blend is smooth and stays a convex combination."""

    class TileIndexOracle:
        count = 0

        @classmethod
        def probabilities(cls, tiles):
            out = np.zeros((len(tiles), 3, 224, 224), np.float32)
            for i in range(len(tiles)):
                cls.count += 1
                out[i, 1] = (cls.count % 2) * 1.0  # alternating tiles say 0 or 1
                out[i, 0] = 1.0 - out[i, 1]
            return out

    layout = TileLayout(400, 400, overlap_px=32, tiles_per_block=1, halo_px=0)
    stitched = _stitch(np.zeros((400, 400, 3), np.uint8), TileIndexOracle, layout)
    assert np.all((stitched >= 0) & (stitched <= 1))
    np.testing.assert_allclose(stitched.sum(axis=0), 1.0, atol=1e-6)
    band = stitched[1, 100, 192:224]  # overlap of tiles (0, 0) and (0, 1): a monotone cross-fade
    assert band[0] > 0.9 and band[-1] < 0.1 and np.all(np.diff(band) < 0)


def test_skipped_tiles_leave_background_and_do_not_bias_neighbours():
    image = np.full((500, 500, 3), 20, np.uint8)  # all "interior" for DiscOracle
    layout = TileLayout(500, 500, overlap_px=32, tiles_per_block=2, halo_px=0)
    skip = np.zeros(layout.n_tiles_yx, bool)
    skip[0, 0] = True
    stitched = _stitch(image, DiscOracle, layout, skip=skip)
    assert np.all(stitched[:, :192, :192] == [[[1.0]], [[0.0]], [[0.0]]])  # only tile (0,0)
    assert np.all(stitched[1, 192:, :] == 1.0) and np.all(stitched[1, :, 224:] == 1.0)


def test_inactive_blocks_emit_no_cells_that_depend_on_them():
    image = np.full((800, 800, 3), 20, np.uint8)
    layout = TileLayout(800, 800, overlap_px=32, tiles_per_block=2, halo_px=64)
    active = np.ones(layout.n_blocks_yx, bool)
    active[0, :] = False  # a resumed run that skips the first block row
    stitched = _stitch(image, DiscOracle, layout, active=active)
    assert np.isnan(stitched[:, : layout.block_px + layout.overlap_px]).all()
    assert np.all(stitched[1, layout.block_px + layout.overlap_px :] == 1.0)


@pytest.mark.parametrize("chunk_px", [384, 256])
def test_a_block_written_at_once_equals_its_cells_written_one_by_one(tmp_path, chunk_px):
    """``write_cells`` assembles a block's cells (aligned with the chunks or not) into one write;
    a set of cells that is not a rectangle (a resumed run) falls back to cell by cell."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    layout = TileLayout(700, 900, overlap_px=32, tiles_per_block=2, halo_px=64)
    stitcher = Stitcher(layout, 3, blend_weights(layout.tile_px, layout.overlap_px))
    stores = [
        PredictionStore.create(
            tmp_path / f"{name}.zarr",
            (700, 900),
            num_classes=3,
            with_labels=False,
            chunk_px=chunk_px,
        )
        for name in ("cells", "blocks", "partial")
    ]
    s, t = layout.stride_px, layout.tile_px
    padded = np.pad(image, ((0, t), (0, t), (0, 0)))
    for block in layout.blocks():
        ty0, ty1, tx0, tx1 = layout.block_tiles(*block)
        tiles = list(itertools.product(range(ty0, ty1), range(tx0, tx1)))
        batch = np.stack([padded[ty * s : ty * s + t, tx * s : tx * s + t] for ty, tx in tiles])
        stitcher.add_tiles(block, tiles, QuarterOracle.probabilities(batch))
        cells = [(cell.box, cell.probs) for cell in stitcher.finish_block(block)]
        # The cells final after a block are its core: one rectangle, one write.
        y0, y1, x0, x1 = layout.block_core(*block)
        assert sum((b[1] - b[0]) * (b[3] - b[2]) for b, _ in cells) == (y1 - y0) * (x1 - x0)
        assert all(y0 <= b[0] and b[1] <= y1 and x0 <= b[2] and b[3] <= x1 for b, _ in cells)
        for box, probs in cells:
            stores[0].write_probabilities(box, probs)
        stores[1].write_cells(cells)
        stores[2].write_cells(cells[:-1])  # not a rectangle: one by one
        stores[2].write_cells(cells[-1:])
    expected = to_uint8(1.0 - QuarterOracle.probabilities(image[None])[0, 0])
    for store in stores:
        np.testing.assert_array_equal(store.read_probabilities((0, 700, 0, 900))[0], expected)
    interiors = [store.read_probabilities((0, 700, 0, 900))[1] for store in stores]
    np.testing.assert_array_equal(interiors[0], interiors[1])
    np.testing.assert_array_equal(interiors[0], interiors[2])
