"""Geometry of whole-slide prediction: the model-resolution canvas, its tiles, blocks and regions.

Three nested grids live on one *canvas*, the raster of the processed slide area resampled to the
model's mpp (array axis order y, x; all sizes in canvas pixels):

The canvas is cut from the slide's global tile grid (:class:`TileGrid`, :meth:`Canvas.on_grid`):
its pixel 0 is a tile start of that grid, so a whole-slide run, an ROI and a resumed run run the
same tiles over the same pixels (issue 11).

* **tiles** (``tile_px``, 224) are what the network sees. Tile ``(ty, tx)`` covers
  ``[ty·S, ty·S + tile_px) × [tx·S, tx·S + tile_px)`` with stride ``S = tile_px - overlap_px``,
  so neighbouring tiles share ``overlap_px`` pixels that are blended with taper weights.
* **blocks** of ``tiles_per_block²`` tiles are the unit of reading: one ``read_region`` call
  fetches a block's footprint and the tiles are cut from it in memory (PEERS.md §7: decouple the
  read region from the network tile). Block ``(by, bx)`` owns the *core*
  ``[by·B, (by+1)·B) × [bx·B, (bx+1)·B)`` with ``B = tiles_per_block·S``; its footprint reaches
  ``overlap_px`` further, into the next block's core.
* **regions** are the unit of instance extraction and of resume, one per block. A region is
  labelled on its core plus a ``halo_px`` margin (its *window*), and keeps only the nuclei whose
  centroid lies in its core, so a nucleus on a seam is found exactly once and never cut
  (StarDist's ``big.py`` "responsible block" rule, PEERS.md §2B). Region cores are the block
  cores shifted up and left by ``halo_px`` (the first region of a row or column starts at 0, the
  last reaches the canvas edge): ``[by·B - halo, (by+1)·B - halo)``, so a region's window ends
  exactly where the tiles of the next block row and column begin.

A pixel's probabilities depend on the tiles covering it, and the tiles of block ``c`` start at
``c·B``. A window that ends at ``(by+1)·B`` therefore depends on block ``(by, bx)`` and blocks
before it in raster order only (:meth:`TileLayout.region_blocks`): region ``(by, bx)`` can be
labelled as soon as block ``(by, bx)`` is predicted, so labelling trails inference by one block,
not one block row, and nothing of a block row is held back for it. When ``2·halo_px +
overlap_px <= B`` (the defaults: 2·64 + 32 <= 960) those blocks are the 2×2 neighbourhood ending at
``(by, bx)``, which bounds what a resumed run recomputes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

Box = tuple[int, int, int, int]
"""A canvas rectangle ``(y0, y1, x0, x1)``, half-open, in canvas pixels."""


@dataclass(frozen=True)
class Canvas:
    """Where the model-resolution canvas lies on the slide.

    Canvas pixel ``(x, y)`` covers level-0 pixels ``origin + [x, x+1)·scale`` (OpenSlide level-0
    coordinates, before any QuPath bounds offset).

    Attributes:
        origin_xy: level-0 coordinates of the canvas's top-left corner.
        scale: level-0 pixels per canvas pixel (``model_mpp / slide_mpp``).
        width_px, height_px: canvas size in canvas (model-resolution) pixels.
    """

    origin_xy: tuple[float, float]
    scale: float
    width_px: int
    height_px: int

    @classmethod
    def from_area(
        cls, area_xywh: tuple[int, int, int, int], slide_mpp: float, model_mpp: float
    ) -> Canvas:
        """The canvas covering a level-0 rectangle ``(x, y, w, h)`` at ``model_mpp``.

        The size is rounded up so the whole area is covered; the rounding to 6 decimals first
        keeps an exact multiple (e.g. 1500 px at scale 1.0) from growing by one pixel.
        """
        x, y, w, h = area_xywh
        scale = model_mpp / slide_mpp
        width = max(1, math.ceil(round(w / scale, 6)))
        height = max(1, math.ceil(round(h / scale, 6)))
        return cls((float(x), float(y)), scale, width, height)

    @classmethod
    def on_grid(
        cls,
        area_xywh: tuple[int, int, int, int],
        bounds_xywh: tuple[int, int, int, int],
        slide_mpp: float,
        model_mpp: float,
        grid: TileGrid,
    ) -> Canvas:
        """The canvas of the slide-anchored tiles that cover a level-0 area (an ROI or the bounds).

        The global tile grid (:class:`TileGrid`) is fixed by the slide, not by the area: tile
        ``k`` starts at canvas-independent model pixel ``offset + k·stride`` from the bounds
        origin. The canvas starts at the first tile of that grid covering the area grown by
        ``grid.context_px`` (so the ROI's tiles are the whole-slide tiles around it and every pixel
        within ``context_px`` of the ROI is blended from the same tiles as in a whole-slide run),
        never before the grid's first tile (the last start at or before the bounds origin), and
        ends with the last such tile, clipped to the bounds. For the whole slide with offset 0
        this is :meth:`from_area` of the bounds.
        """
        scale = model_mpp / slide_mpp
        spans = [
            grid.span(
                (area_xywh[axis] - bounds_xywh[axis]) / scale,
                (area_xywh[axis] + area_xywh[axis + 2] - bounds_xywh[axis]) / scale,
                math.ceil(round(bounds_xywh[axis + 2] / scale, 6)),
                axis,
            )
            for axis in (0, 1)
        ]
        (x0, x1), (y0, y1) = spans
        origin = (bounds_xywh[0] + x0 * scale, bounds_xywh[1] + y0 * scale)
        return cls(origin, scale, max(1, x1 - x0), max(1, y1 - y0))

    def level0_xy(self, x_px: float, y_px: float) -> tuple[float, float]:
        """Level-0 coordinates of canvas point ``(x_px, y_px)``."""
        return (self.origin_xy[0] + x_px * self.scale, self.origin_xy[1] + y_px * self.scale)


@dataclass(frozen=True)
class TileGrid:
    """The slide's global tile grid at the model's mpp (issue 11: tiling that does not move the
    answer). Tile starts along x are ``offset_xy[0] + k·stride_px`` model pixels from the slide's
    bounds origin (likewise y), for ``k`` from the last start at or before the origin on; every
    run of a slide (whole slide, ROI, resumed) cuts its tiles from this grid.

    Attributes:
        tile_px, stride_px: tile side and stride (``tile_px - overlap_px``).
        offset_xy: grid shift in model pixels, ``0 <= offset < stride_px`` (a test hook:
            translation consistency is measured by shifting it by half a stride).
        context_px: an ROI's canvas covers the tiles of the ROI grown by this much (the
            labelling halo), so that its nuclei are the whole-slide ones.
    """

    tile_px: int
    stride_px: int
    offset_xy: tuple[int, int] = (0, 0)
    context_px: int = 0

    def __post_init__(self) -> None:
        if not all(0 <= v < self.stride_px for v in self.offset_xy):
            raise ValueError(
                f"grid offset must be in [0, {self.stride_px}) px, got {self.offset_xy}"
            )

    def span(self, start_px: float, end_px: float, length_px: int, axis: int) -> tuple[int, int]:
        """Canvas span ``[a, b)`` along an axis, in model pixels from the bounds origin, for an
        area ``[start_px, end_px)`` of a slide ``length_px`` long (``axis``: 0 for x, 1 for y).
        ``a`` is a tile start of the grid; ``b`` the end of the last covering tile, clipped."""
        offset, s, t = self.offset_xy[axis], self.stride_px, self.tile_px
        first = math.floor(-offset / s)  # the grid's first tile: at or before the origin
        lo = max(0.0, start_px - self.context_px)
        hi = min(float(length_px), end_px + self.context_px)
        # First tile whose end passes lo, last tile whose start is before hi.
        k0 = max(first, math.floor((lo - offset - t) / s) + 1)
        k1 = max(k0, math.ceil((hi - offset) / s) - 1)
        # The layout then runs the fewest tiles from the start that reach the end: on the slide's
        # last stretch, the same tiles as a whole-slide run.
        end = min(offset + k1 * s + t, length_px)
        return offset + k0 * s, max(end, offset + k0 * s + 1)


@dataclass(frozen=True)
class TileLayout:
    """Tiles, blocks and regions on a ``height_px × width_px`` canvas (see the module docstring).

    Attributes:
        height_px, width_px: canvas size.
        tile_px: network tile side.
        overlap_px: pixels shared by neighbouring tiles (must exceed a nucleus diameter).
        tiles_per_block: tiles per block side; ``block_px = tiles_per_block · stride_px``.
        halo_px: context around a region's core for instance extraction (more than a nucleus
            diameter plus the reach of its neighbours' watershed).
    """

    height_px: int
    width_px: int
    tile_px: int = 224
    overlap_px: int = 32
    tiles_per_block: int = 11
    halo_px: int = 64

    def __post_init__(self) -> None:
        if self.height_px < 1 or self.width_px < 1:
            raise ValueError(
                f"canvas must be at least 1×1 px, got {self.height_px}×{self.width_px}"
            )
        if not 0 <= self.overlap_px < self.tile_px / 2:
            raise ValueError(
                f"overlap_px must be in [0, tile_px/2) = [0, {self.tile_px / 2:g}), "
                f"got {self.overlap_px}"
            )
        if self.tiles_per_block < 1:
            raise ValueError(f"tiles_per_block must be >= 1, got {self.tiles_per_block}")
        if not 0 <= self.halo_px <= self.block_px - self.overlap_px:
            # Keeps the first region's core (block core minus the halo) non-empty, and a
            # region's window within the blocks at most two rows and columns back.
            raise ValueError(
                f"halo_px must be in [0, block_px - overlap_px] = "
                f"[0, {self.block_px - self.overlap_px}], got {self.halo_px}; "
                "use larger blocks or a smaller halo"
            )

    @property
    def stride_px(self) -> int:
        return self.tile_px - self.overlap_px

    @property
    def block_px(self) -> int:
        return self.tiles_per_block * self.stride_px

    @property
    def n_tiles_yx(self) -> tuple[int, int]:
        return (self._n_tiles(self.height_px), self._n_tiles(self.width_px))

    @property
    def n_blocks_yx(self) -> tuple[int, int]:
        ny, nx = self.n_tiles_yx
        return (math.ceil(ny / self.tiles_per_block), math.ceil(nx / self.tiles_per_block))

    def _n_tiles(self, length_px: int) -> int:
        """Tiles needed along an axis so that the last one reaches ``length_px``."""
        if length_px <= self.tile_px:
            return 1
        return math.ceil((length_px - self.tile_px) / self.stride_px) + 1

    def block_tiles(self, by: int, bx: int) -> tuple[int, int, int, int]:
        """Tile index ranges ``(ty0, ty1, tx0, tx1)`` (half-open) of block ``(by, bx)``."""
        ny, nx = self.n_tiles_yx
        k = self.tiles_per_block
        return (by * k, min((by + 1) * k, ny), bx * k, min((bx + 1) * k, nx))

    def tiles_box(self, ty0: int, ty1: int, tx0: int, tx1: int) -> Box:
        """Canvas box covered by tiles ``[ty0, ty1) × [tx0, tx1)`` (may extend past the canvas)."""
        s, t = self.stride_px, self.tile_px
        return (ty0 * s, (ty1 - 1) * s + t, tx0 * s, (tx1 - 1) * s + t)

    def block_footprint(self, by: int, bx: int) -> Box:
        """Canvas box covered by all tiles of block ``(by, bx)``, clipped to the canvas."""
        y0, y1, x0, x1 = self.tiles_box(*self.block_tiles(by, bx))
        return (y0, min(y1, self.height_px), x0, min(x1, self.width_px))

    def block_core(self, by: int, bx: int) -> Box:
        """Canvas box of block ``(by, bx)``'s core (the last ones reach the canvas edge).

        In a run over all blocks, the stitcher's cells that become final when the block is
        finished are exactly this box.
        """
        y0, y1 = self._core_span(by, 0)
        x0, x1 = self._core_span(bx, 1)
        return (y0, y1, x0, x1)

    def region_core(self, by: int, bx: int) -> Box:
        """Canvas box owned by region ``(by, bx)``: its nuclei have their centroid here.

        The block core shifted up and left by ``halo_px``; the cores tile the canvas (the first
        region of a row or column starts at 0, the last one reaches the canvas edge).
        """
        y0, y1 = self._region_span(by, 0)
        x0, x1 = self._region_span(bx, 1)
        return (y0, y1, x0, x1)

    def _region_span(self, c: int, axis: int) -> tuple[int, int]:
        length = self.height_px if axis == 0 else self.width_px
        last = c == self.n_blocks_yx[axis] - 1
        start = 0 if c == 0 else c * self.block_px - self.halo_px
        return start, length if last else (c + 1) * self.block_px - self.halo_px

    def _core_span(self, c: int, axis: int) -> tuple[int, int]:
        """Block ``c``'s core along an axis (the last one reaches the canvas edge)."""
        length = self.height_px if axis == 0 else self.width_px
        last = c == self.n_blocks_yx[axis] - 1
        return c * self.block_px, length if last else (c + 1) * self.block_px

    def region_window(self, by: int, bx: int) -> Box:
        """Region core grown by ``halo_px`` on every side, clipped to the canvas."""
        y0, y1, x0, x1 = self.region_core(by, bx)
        h = self.halo_px
        return (
            max(0, y0 - h),
            min(self.height_px, y1 + h),
            max(0, x0 - h),
            min(self.width_px, x1 + h),
        )

    def region_blocks(self, by: int, bx: int) -> list[tuple[int, int]]:
        """Blocks whose tiles cover some pixel of region ``(by, bx)``'s window, in raster order.

        The region can be labelled once these are predicted; the last of them is block
        ``(by, bx)`` itself (see the module docstring).
        """
        y0, y1, x0, x1 = self.region_window(by, bx)
        rows = self._blocks_covering(y0, y1, 0)
        cols = self._blocks_covering(x0, x1, 1)
        return [(y, x) for y in rows for x in cols]

    def _blocks_covering(self, start: int, end: int, axis: int) -> list[int]:
        """Blocks whose footprint ``[c·B, (c+1)·B + overlap)`` meets ``[start, end)`` on an axis."""
        b, ov = self.block_px, self.overlap_px
        n = self.n_blocks_yx[axis]
        return [c for c in range(n) if c * b < end and start < (c + 1) * b + ov]

    def blocks(self) -> Iterator[tuple[int, int]]:
        """All blocks (= regions) in raster order, the order of processing and of nucleus ids."""
        ny, nx = self.n_blocks_yx
        for by in range(ny):
            for bx in range(nx):
                yield (by, bx)

    def block_index(self, by: int, bx: int) -> int:
        """Position of block ``(by, bx)`` in :meth:`blocks` order."""
        return by * self.n_blocks_yx[1] + bx

    def segments(self, axis: int) -> list[Segment]:
        """Partition of one canvas axis by which blocks' footprints cover it.

        Along an axis, block ``c``'s footprint is ``[c·B, (c+1)·B + overlap)``: the interval
        ``[c·B, c·B + overlap)`` is shared by blocks ``c-1`` and ``c`` (a *band*), the rest of the
        core belongs to block ``c`` alone. The product of the two axes' segments gives the
        *cells* that the stitcher finalises once every contributing block is done. Along an
        axis, blocks ``c-1`` and ``c`` share the band, so a cell waits for at most one block
        row (the band below a row) and one block (the band right of a block).

        Args:
            axis: 0 for y, 1 for x.
        """
        length = self.height_px if axis == 0 else self.width_px
        n_blocks = self.n_blocks_yx[axis]
        b, ov = self.block_px, self.overlap_px
        out: list[Segment] = []
        for c in range(n_blocks):
            start = c * b
            if c > 0 and ov > 0:
                out.append(Segment(start, min(start + ov, length), (c - 1, c)))
                start += ov
            end = self._core_span(c, axis)[1]
            if start < end:
                out.append(Segment(start, end, (c,)))
        return out


@dataclass(frozen=True)
class Segment:
    """A half-open interval ``[start, end)`` of one canvas axis and the blocks covering it."""

    start: int
    end: int
    blocks: tuple[int, ...]


def blend_weights(tile_px: int, overlap_px: int) -> np.ndarray:
    """Separable linear taper over the overlap: ``tile_px×tile_px`` float32 weights in (0, 1].

    Weights rise from ``1/(overlap+1)`` at the tile edge to 1 at ``overlap_px`` inside, so two tiles
    overlapping by ``overlap_px`` cross-fade and the blended sum never has a step (no seams).
    They are > 0 everywhere, so a pixel covered by a single tile keeps its prediction exactly.
    """
    ramp = np.ones(tile_px, dtype=np.float32)
    if overlap_px > 0:
        edge = np.arange(1, overlap_px + 1, dtype=np.float32) / (overlap_px + 1)
        ramp[:overlap_px] = edge
        ramp[-overlap_px:] = np.minimum(ramp[-overlap_px:], edge[::-1])
    return np.outer(ramp, ramp)


def centre_weights(tile_px: int, overlap_px: int) -> np.ndarray:
    """Centre-weighted blending: ``tile_px×tile_px`` float32 weights, separable, in (0, 1].

    Along each axis the weight rises as ``sin²(π/2 · (i + ½) / overlap_px)`` over the outer
    ``overlap_px`` pixels and is 1 inside. Two tiles overlapping by ``overlap_px`` cross-fade
    with weights that add up to 1 (``sin² + cos²``), like :func:`blend_weights`, but the pixels
    at a tile's border, where the network lacks context, barely count: the weight there is
    ``sin²(π / (4·overlap_px))`` (1.5e-4 at 64 px) instead of ``1 / (overlap_px + 1)``. Weights
    stay > 0, so a pixel covered by one tile only (the canvas edge) keeps its prediction.
    """
    ramp = np.ones(tile_px, dtype=np.float64)
    if overlap_px > 0:
        edge = np.sin(np.pi / 2 * (np.arange(overlap_px) + 0.5) / overlap_px) ** 2
        ramp[:overlap_px] = edge
        ramp[-overlap_px:] = np.minimum(ramp[-overlap_px:], edge[::-1])
    return np.outer(ramp, ramp).astype(np.float32)


def tile_origins(length_px: int, tile_px: int, stride_px: int) -> list[int]:
    """Start offsets covering ``[0, length_px)`` with the last tile flush with the end."""
    if length_px <= tile_px:
        return [0]
    starts = list(range(0, length_px - tile_px, stride_px))
    starts.append(length_px - tile_px)
    return starts


def overlap_for_mpp(mpp: float, tile_px: int = 224, overlap_um: float = 16.0) -> int:
    """Tile overlap in pixels: ``overlap_um`` (larger than a nucleus) rounded to an even number.

    16 µm is about three diameters of a typical nucleus (the median MoNuSeg nucleus covers
    18 µm², about 5 µm across); it gives 32 px at 0.5 µm/px and 64 px at 0.25 µm/px, and is
    capped below half a tile.
    """
    overlap = 2 * math.ceil(overlap_um / mpp / 2)
    return int(min(overlap, tile_px // 2 - 2))


def tiles_per_block_for(region_px: int, tile_px: int, overlap_px: int) -> int:
    """Tiles per block side so that a block is about ``region_px`` canvas pixels wide."""
    return max(1, round(region_px / (tile_px - overlap_px)))


def tissue_tiles(
    mask: np.ndarray,
    mask_scale_xy: tuple[float, float],
    canvas: Canvas,
    layout: TileLayout,
) -> np.ndarray:
    """Which tiles touch tissue, from a low-resolution tissue mask of the whole slide.

    A tile is kept when any mask pixel inside its level-0 footprint is tissue; the mask is grown
    by one pixel first, so tissue cut by the coarse mask grid at a tile edge is never lost.
    Counting uses a summed-area table, so the cost is one pass over the mask plus O(1) per tile.

    Args:
        mask: ``h×w`` bool, True on tissue; mask pixel ``(u, v)`` covers level-0
            ``[u·sx, (u+1)·sx) × [v·sy, (v+1)·sy)``.
        mask_scale_xy: ``(sx, sy)``, level-0 pixels per mask pixel along x and y.
        canvas: where the canvas lies on level 0.
        layout: the tile grid.

    Returns:
        ``n_tiles_y × n_tiles_x`` bool.
    """
    grown = ndi.binary_dilation(np.asarray(mask, dtype=bool), iterations=1)
    table = np.zeros((grown.shape[0] + 1, grown.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = grown.cumsum(0).cumsum(1)
    ny, nx = layout.n_tiles_yx
    ys = _mask_spans(
        ny, layout, canvas.origin_xy[1], canvas.scale, mask_scale_xy[1], grown.shape[0]
    )
    xs = _mask_spans(
        nx, layout, canvas.origin_xy[0], canvas.scale, mask_scale_xy[0], grown.shape[1]
    )
    y0, y1 = ys[:, 0][:, None], ys[:, 1][:, None]
    x0, x1 = xs[:, 0][None, :], xs[:, 1][None, :]
    counts = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return counts > 0


def _mask_spans(
    n_tiles: int,
    layout: TileLayout,
    origin_l0: float,
    canvas_scale: float,
    mask_scale: float,
    mask_size: int,
) -> np.ndarray:
    """``n_tiles×2`` int mask-pixel spans ``[floor(start), ceil(end))`` of the tiles on one axis,
    clipped to ``[0, mask_size]``."""
    starts_px = np.arange(n_tiles, dtype=np.float64) * layout.stride_px
    lo = (origin_l0 + starts_px * canvas_scale) / mask_scale
    hi = (origin_l0 + (starts_px + layout.tile_px) * canvas_scale) / mask_scale
    spans = np.stack([np.floor(lo), np.ceil(hi)], axis=1)
    return np.clip(spans, 0, mask_size).astype(np.int64)
