"""Seam-free blending of overlapping tile probabilities, streamed block by block.

Every canvas pixel gets ``Σ w_t·p_t / Σ w_t`` over the tiles ``t`` that cover it, with the
plan's blending weights (:func:`cellseg.tiling.blend_weights` or
:func:`cellseg.tiling.centre_weights`; Cellpose's ``average_tiles`` idea, PEERS.md §2B): no
seams, and a pixel seen by one tile keeps that tile's value. Tiles that were not run (glass)
simply do not contribute; a pixel no tile covered is background.

The sums are float64: each ``w·p`` of two float32 numbers is exact in float64, and the at most
four terms of a pixel are added in an order that depends on how tiles fall into blocks. In
float64 the grouping changes the sum by about 1e-16 relative, which the final float32 rounding
absorbs (it shows only when the float64 sum lies within that of a float32 rounding boundary,
about one pixel in 10⁸), so the probabilities do not depend on the block size or on where an
ROI starts: the post-processing sees the same float32 values (issue 11).

The canvas is cut into *cells* (:meth:`cellseg.tiling.TileLayout.segments`): a cell inside one
block's core depends on that block alone and is final as soon as the block is; a cell in the
``overlap_px`` band between blocks waits for its 2 (or 4) blocks. Only the pending bands are kept
in memory, never a whole-slide array: the band below the current block row (a strip
``overlap_px`` tall across the canvas: ``(C + 1)·overlap_px·8`` bytes per canvas pixel of width,
1 KiB at 32 px overlap in float64, 50 MB for a canvas 50 000 px wide) and the band right of the
current block.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .tiling import Box, TileLayout


@dataclass
class FinalCell:
    """Blended probabilities of one canvas cell.

    Attributes:
        box: ``(y0, y1, x0, x1)`` canvas box of the cell.
        probs: ``C×h×w`` float32 probabilities (channel 0 background).
    """

    box: Box
    probs: np.ndarray


@dataclass
class _Sum:
    """Running ``Σ w·p`` (``C×h×w``) and ``Σ w`` (``h×w``); ``None`` while nothing was added."""

    num: np.ndarray | None
    den: np.ndarray | None
    received: int = 0

    def add(self, num: np.ndarray | None, den: np.ndarray | None, copy: bool = True) -> None:
        self.received += 1
        if num is None:
            return
        if self.num is None:
            self.num, self.den = (num.copy(), den.copy()) if copy else (num, den)
        else:
            self.num += num
            self.den += den


class Stitcher:
    """Accumulates tile probabilities per block and emits cells once they are final.

    Blocks must be finished in the same order on every run (raster order) so that the floating-
    point sums, and therefore the probabilities, are reproducible.

    Args:
        layout: canvas, tile and block geometry.
        num_classes: ``C``, channels of the probabilities.
        weights: ``tile_px×tile_px`` float32 blending weights, > 0.
        active: ``n_blocks_y×n_blocks_x`` bool, the blocks this run will finish; cells that also
            depend on an inactive block are never emitted (on resume they were written before).
            ``None``: all blocks.
    """

    def __init__(
        self,
        layout: TileLayout,
        num_classes: int,
        weights: np.ndarray,
        active: np.ndarray | None = None,
    ) -> None:
        if weights.shape != (layout.tile_px, layout.tile_px) or not np.all(weights > 0):
            raise ValueError(f"weights must be {layout.tile_px}² and > 0, got {weights.shape}")
        self.layout = layout
        self.num_classes = num_classes
        self.weights = weights.astype(np.float32).astype(np.float64)
        shape = layout.n_blocks_yx
        self.active = np.ones(shape, dtype=bool) if active is None else np.asarray(active, bool)
        self._segments = (layout.segments(0), layout.segments(1))
        self._cells_of = tuple(
            [[i for i, s in enumerate(segs) if c in s.blocks] for c in range(n)]
            for segs, n in zip(self._segments, shape, strict=True)
        )
        self._blocks: dict[tuple[int, int], _Sum] = {}
        self._pending: dict[tuple[int, int], _Sum] = {}

    def add_tiles(
        self, block_yx: tuple[int, int], tiles_yx: Sequence[tuple[int, int]], probs: np.ndarray
    ) -> None:
        """Adds the weighted probabilities of some of a block's tiles.

        Args:
            block_yx: the block the tiles belong to.
            tiles_yx: global tile indices ``(ty, tx)``, one per probability map.
            probs: ``N×C×tile_px×tile_px`` float32 softmax probabilities.
        """
        acc = self._blocks.get(block_yx)
        fy0, fy1, fx0, fx1 = self.layout.block_footprint(*block_yx)
        if acc is None or acc.num is None:
            acc = _Sum(
                np.zeros((self.num_classes, fy1 - fy0, fx1 - fx0), np.float64),
                np.zeros((fy1 - fy0, fx1 - fx0), np.float64),
            )
            self._blocks[block_yx] = acc
        s, t = self.layout.stride_px, self.layout.tile_px
        for (ty, tx), p in zip(tiles_yx, probs, strict=True):
            y0, x0 = ty * s - fy0, tx * s - fx0
            h, w = min(t, fy1 - fy0 - y0), min(t, fx1 - fx0 - x0)  # clip at the canvas edge
            wt = self.weights[:h, :w]
            acc.num[:, y0 : y0 + h, x0 : x0 + w] += p[:, :h, :w] * wt
            acc.den[y0 : y0 + h, x0 : x0 + w] += wt

    def finish_block(self, block_yx: tuple[int, int]) -> list[FinalCell]:
        """Declares a block complete and returns the cells that became final, in raster order."""
        acc = self._blocks.pop(block_yx, None)
        by, bx = block_yx
        fy0, _, fx0, _ = self.layout.block_footprint(by, bx)
        ysegs, xsegs = self._segments
        done: list[FinalCell] = []
        for iy, ix in itertools.product(self._cells_of[0][by], self._cells_of[1][bx]):
            ys, xs = ysegs[iy], xsegs[ix]
            contributors = list(itertools.product(ys.blocks, xs.blocks))
            if not all(self.active[c] for c in contributors):
                continue
            num = den = None
            if acc is not None and acc.num is not None:
                sy = slice(ys.start - fy0, ys.end - fy0)
                sx = slice(xs.start - fx0, xs.end - fx0)
                num, den = acc.num[:, sy, sx], acc.den[sy, sx]
            total = self._pending.pop((iy, ix), None) or _Sum(None, None)
            # A cell that waits for other blocks must not keep this block's array alive.
            total.add(num, den, copy=len(contributors) > 1)
            box = (ys.start, ys.end, xs.start, xs.end)
            if total.received == len(contributors):
                done.append(FinalCell(box, self._normalise(total, box)))
            else:
                self._pending[(iy, ix)] = total
        return done

    @property
    def pending_cells(self) -> int:
        """Cells waiting for more blocks (the bands of about one block row)."""
        return len(self._pending)

    def _normalise(self, total: _Sum, box: Box) -> np.ndarray:
        h, w = box[1] - box[0], box[3] - box[2]
        out = np.zeros((self.num_classes, h, w), np.float64)
        out[0] = 1.0  # pixels that no tile covered are background
        if total.num is not None:
            covered = total.den > 0
            np.divide(total.num, total.den, out=out, where=covered[None])
        return out.astype(np.float32)
