"""Planning of one slide's prediction: the options, the slide-anchored grid and the plan.

The first of the three parts of whole-slide prediction (issue 11 point 5): *planning* decides
everything before a tile is run (:class:`PredictOptions` -> :func:`plan_slide` ->
:class:`SlidePlan`: canvas on the slide's tile grid, layout, tissue tiles, ROI ownership, model
identity) and what a resumed run must share with the one it resumes (:func:`resume_fingerprint`);
the *runner* (:mod:`cellseg.pipeline`) reads, infers, stitches and labels; the *sinks*
(:mod:`cellseg.sinks`: GeoJSON, Zarr, journal, overlay) own the writes, and
:mod:`cellseg.predict` orchestrates the three. Reads only a thumbnail of the slide (and hashes
the slide file).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import __version__
from .errors import CellsegError, SlideError
from .geojson import OBJECT_TYPES
from .instances import PostProcess
from .rejection import Rejection, rejection_of
from .slide import Slide
from .tiling import (
    Box,
    Canvas,
    TileGrid,
    TileLayout,
    blend_weights,
    centre_weights,
    overlap_for_mpp,
    tiles_per_block_for,
    tissue_tiles,
)
from .tissue import tissue_area_mm2, tissue_mask

# Default tile overlap of whole-slide prediction, in µm at the model's mpp (32 px at 0.5 µm/px;
# the stride, 192 px, stays a multiple of the network's 32 px downsampling, which matters:
# benchmarks/README.md). Measured with benchmarks/translation_consistency.py on the v1 model: a
# half-stride grid shift keeps 0.84 of the nuclei (0.89 at 64 px for 1.44x the tiles, 0.92 at
# 96 px for 2.25x). 32 px keeps today's cost, which the speed goals of issues 10 and 11 need;
# `--overlap-px 64|96` buys consistency with tiles.
PREDICT_OVERLAP_UM = 16.0
BLENDINGS = ("centre", "linear")  # PredictOptions.blending
# What makes two runs' probabilities and nuclei differ beyond the options (journal fingerprint,
# provenance): the slide-anchored grid, float64 blending, float32 working probabilities and
# rank-ordered watershed (issue 11).
TILING_SCHEME = "slide grid; float64 blending; float32 watershed by rank"


class TilePredictor(Protocol):
    """What the pipeline needs from a model (``cellseg.inference.Predictor`` or a test oracle).

    ``predictor(tiles)`` maps ``N×tile_px×tile_px×3`` uint8 RGB tiles to ``N×C×tile_px×tile_px``
    float32 softmax probabilities (channel 0 background).
    """

    mpp: float
    tile_px: int
    num_classes: int

    def __call__(self, tiles: np.ndarray) -> np.ndarray: ...


@dataclass
class PredictOptions:
    """How a slide is predicted (the outputs are :class:`SlideOutputs`).

    Attributes:
        backend: slide reader, ``"openslide"`` or ``"tiffslide"`` (plain images fall back to a
            whole-image reader).
        mpp: level-0 µm per pixel overriding the slide's metadata.
        roi_xywh: restrict the work to this rectangle, in level-0 pixels as QuPath shows the
            slide (i.e. relative to OpenSlide's bounds origin, the frame of the GeoJSON).
        tissue_mask: skip tiles without tissue on a thumbnail's tissue mask.
        tissue_mpp: resolution of that thumbnail.
        batch_size: tiles per model call.
        workers: reader processes (0: a reader thread); None: :func:`default_workers`.
        label_workers: processes for instance extraction and polygons (0: the post-processing
            thread does it); None: :func:`default_label_workers`.
        overlap_px: tile overlap at the model's mpp; None: ``PREDICT_OVERLAP_UM``
            (:func:`overlap_for_mpp`; 32 px at 0.5 µm/px).
        region_px: side of a read block / labelling region at the model's mpp (``--block-px``),
            rounded to whole tile strides (1024: 960 px for 224 px tiles overlapping by 64 px).
            About 1000 px keeps the labelling windows, block images and blending sums small, so
            memory stays low while labelling runs beside the model; larger blocks mean fewer
            reads but more memory. It does not change the nuclei (issue 11).
        blending: tile weights, ``"linear"`` (:func:`cellseg.tiling.blend_weights`, the
            default) or ``"centre"`` (:func:`cellseg.tiling.centre_weights`: ~0 at the tile
            border). Linear measured slightly more translation-consistent (it averages the
            tiles more evenly; benchmarks/README.md); ``"centre"`` is kept for measurements.
        grid_offset_px: ``(x, y)`` shift of the slide's tile grid in model pixels, each in
            ``[0, stride)`` (a test hook: translation consistency is measured with half a
            stride; ``--grid-offset-px``, hidden).
        halo_um: context around a region for instance extraction (> 2 nucleus diameters).
        object_type: GeoJSON ``objectType``: detection, cell or annotation.
        cell_expansion_um: with ``object_type="cell"``, how far each cell grows from its nucleus
            (QuPath's "cell expansion", whose default is 5 µm); 0: the cell is the nucleus.
        postprocess: watershed parameters; None: the model's own (``meta["postprocess"]``).
        overwrite: replace existing outputs (otherwise they are an error).
        chunk_px: Zarr chunk side; None: the block size, so that each block's probabilities are
            written as whole chunks (several times faster than chunks across blocks).
        overlay_max_px: long side of the ``--overlay`` picture.
        model_name, model_sha256: recorded in the outputs; None: taken from the predictor's
            bundle when it has one.
    """

    backend: str = "openslide"
    mpp: float | None = None
    roi_xywh: tuple[int, int, int, int] | None = None
    tissue_mask: bool = True
    tissue_mpp: float = 8.0
    batch_size: int = 16
    workers: int | None = None
    label_workers: int | None = None
    overlap_px: int | None = None
    region_px: int = 1024
    halo_um: float = 32.0
    grid_offset_px: tuple[int, int] = (0, 0)
    blending: str = "linear"
    object_type: str = "detection"
    cell_expansion_um: float = 0.0
    postprocess: PostProcess | None = None
    overwrite: bool = False
    chunk_px: int | None = None
    overlay_max_px: int = 2048
    model_name: str | None = None
    model_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.object_type not in OBJECT_TYPES:
            raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {self.object_type!r}")
        if self.cell_expansion_um < 0 or not math.isfinite(self.cell_expansion_um):
            raise ValueError(f"cell_expansion_um must be >= 0, got {self.cell_expansion_um}")
        if self.cell_expansion_um > 0 and self.object_type != "cell":
            raise ValueError("cell_expansion_um needs object_type='cell'")
        if self.cell_expansion_um > self.halo_um / 2:
            raise ValueError(
                f"cell_expansion_um must be at most half the halo ({self.halo_um / 2:g} µm), "
                f"got {self.cell_expansion_um:g}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.region_px < 1:
            raise ValueError(f"region_px must be >= 1, got {self.region_px}")
        if self.blending not in BLENDINGS:
            raise ValueError(f"blending must be one of {BLENDINGS}, got {self.blending!r}")
        if len(self.grid_offset_px) != 2 or min(self.grid_offset_px) < 0:
            raise ValueError(f"grid_offset_px must be two integers >= 0, got {self.grid_offset_px}")
        if self.chunk_px is not None and self.chunk_px < 1:
            raise ValueError(f"chunk_px must be >= 1, got {self.chunk_px}")
        if self.roi_xywh is not None and (self.roi_xywh[2] <= 0 or self.roi_xywh[3] <= 0):
            raise ValueError(f"roi width and height must be > 0, got {self.roi_xywh}")


@dataclass
class SlidePlan:
    """Everything decided about a slide before any tile is run (see ``predict.plan_slide``)."""

    slide_path: Path
    slide_mpp: float
    mpp_source: str
    backend: str
    dimensions_xy: tuple[int, int]
    bounds_xy: tuple[int, int, int, int]
    area_xywh: tuple[int, int, int, int]
    model_mpp: float
    canvas: Canvas
    layout: TileLayout
    tile_mask: np.ndarray  # n_tiles_y × n_tiles_x bool
    tissue_area_mm2: float | None
    num_classes: int
    postprocess: PostProcess
    model_name: str
    model_sha256: str | None
    tta: bool = False  # the predictor averages the 8 D4 views of each tile
    precision: str = "fp32"  # the predictor's resolved precision (cellseg.precision)
    slide_sha256: str | None = None  # content hash: seeds the GeoJSON feature ids
    cell_expansion_px: int = 0  # > 0: cells grown from the nuclei (--object-type cell)
    rejection: Rejection | None = None  # the model's learned rejection (cellseg.rejection)
    # Canvas box of the processed area (the ROI, or the slide): its nuclei (by centroid) are
    # kept, and the Zarr image covers it; None: the whole canvas. The canvas itself covers the
    # slide-grid tiles around it (cellseg.tiling.Canvas.on_grid).
    owned_box: Box | None = None
    grid_offset_xy: tuple[int, int] = (0, 0)  # the slide grid's shift (a test hook)
    blending: str = "linear"  # PredictOptions.blending

    def blend_weights(self) -> np.ndarray:
        """``tile_px×tile_px`` float32 blending weights of :attr:`blending`."""
        t, ov = self.layout.tile_px, self.layout.overlap_px
        return centre_weights(t, ov) if self.blending == "centre" else blend_weights(t, ov)

    @property
    def output_box(self) -> Box:
        """:attr:`owned_box`, or the whole canvas."""
        if self.owned_box is None:
            return (0, self.layout.height_px, 0, self.layout.width_px)
        return self.owned_box

    def region_owned_box(self, region: tuple[int, int]) -> Box:
        """The region's core clipped to :attr:`owned_box` (may be empty)."""
        y0, y1, x0, x1 = self.layout.region_core(*region)
        if self.owned_box is None:
            return (y0, y1, x0, x1)
        oy0, oy1, ox0, ox1 = self.owned_box
        return (max(y0, oy0), min(y1, oy1), max(x0, ox0), min(x1, ox1))

    @property
    def block_tile_counts(self) -> np.ndarray:
        """``n_blocks_y×n_blocks_x`` number of tissue tiles per block."""
        k = self.layout.tiles_per_block
        ny, nx = self.layout.n_blocks_yx
        padded = np.zeros((ny * k, nx * k), dtype=np.int64)
        padded[: self.tile_mask.shape[0], : self.tile_mask.shape[1]] = self.tile_mask
        return padded.reshape(ny, k, nx, k).sum(axis=(1, 3))

    @property
    def qupath_offset_xy(self) -> tuple[float, float]:
        """Subtract from scaled canvas coordinates to get QuPath level-0 coordinates."""
        return (
            self.bounds_xy[0] - self.canvas.origin_xy[0],
            self.bounds_xy[1] - self.canvas.origin_xy[1],
        )

    def processed_area_mm2(self) -> float:
        return self.area_xywh[2] * self.area_xywh[3] * (self.slide_mpp / 1000.0) ** 2

    def rejection_entry(self) -> dict[str, Any]:
        """``{"rejection": ...}`` for provenance, fingerprint and Zarr attributes when the model
        has a learned rejection, else nothing (so results of models without one are described
        exactly as before)."""
        return {} if self.rejection is None else {"rejection": self.rejection.to_dict()}


def resume_fingerprint(
    plan: SlidePlan, options: PredictOptions, *, zarr_path: Path, with_labels: bool
) -> dict[str, Any]:
    """What must be equal for a journal to be resumed (inputs, model, geometry, outputs):
    ``zarr_path`` is where the partial Zarr is built, ``with_labels`` whether it is an output."""
    stat = plan.slide_path.stat()
    return {
        "cellseg": __version__,
        "slide": str(plan.slide_path.resolve()),
        "slide_size": stat.st_size,
        "slide_mtime_ns": stat.st_mtime_ns,
        "backend": plan.backend,
        "slide_mpp": plan.slide_mpp,
        "model": [plan.model_name, plan.model_sha256, plan.model_mpp, plan.num_classes, plan.tta],
        # bf16 and fp32 probabilities differ slightly: a partial run is finished in its precision.
        "precision": plan.precision,
        "canvas": asdict(plan.canvas),
        "layout": asdict(plan.layout),
        # Region geometry: a journal of an older version with other region cores must not resume.
        "regions": "block cores shifted up and left by halo_px",
        "tiling": [TILING_SCHEME, plan.blending, list(plan.grid_offset_xy), plan.owned_box],
        "tissue": [options.tissue_mask, options.tissue_mpp],
        "postprocess": plan.postprocess.to_dict(),
        **plan.rejection_entry(),
        "cell_expansion_px": plan.cell_expansion_px,  # the journal holds the cells' outlines
        "zarr": str(Path(zarr_path).resolve()),
        "with_labels": with_labels,
    }


def processing_area(
    slide: Slide, roi_xywh: tuple[int, int, int, int] | None
) -> tuple[int, int, int, int]:
    """Level-0 ``(x, y, w, h)`` to process: the ROI (given in QuPath's frame) or the bounds."""
    bx, by, bw, bh = slide.bounds_xy
    if roi_xywh is None:
        return (bx, by, bw, bh)
    x, y, w, h = roi_xywh
    width, height = slide.dimensions_xy
    x0, y0 = max(bx + x, 0), max(by + y, 0)
    x1, y1 = min(bx + x + w, width), min(by + y + h, height)
    if x1 <= x0 or y1 <= y0:
        raise SlideError(
            f"{slide.path}: --roi {x},{y},{w},{h} lies outside the slide ({bw}x{bh} px)"
        )
    return (x0, y0, x1 - x0, y1 - y0)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def model_identity(predictor: TilePredictor, options: PredictOptions) -> tuple[str, str | None]:
    bundle = getattr(predictor, "bundle", None)
    path = getattr(bundle, "path", None)
    name = options.model_name or getattr(bundle, "name", None) or type(predictor).__name__
    sha = options.model_sha256 or (_file_sha256(Path(path)) if path else None)
    return name, sha


def postprocess_for(predictor: TilePredictor, options: PredictOptions) -> PostProcess:
    if options.postprocess is not None:
        return options.postprocess
    meta = getattr(getattr(predictor, "bundle", None), "meta", None) or {}
    return PostProcess.from_dict(meta.get("postprocess", {}))


MIN_THUMBNAIL_PX = 16  # thumbnail side below which the tissue mask is made at a finer mpp


def _tissue_resolution(slide: Slide, tissue_mpp: float) -> tuple[float, int]:
    """``(mpp, min_object_px)`` of the tissue mask: ``tissue_mpp`` and 64 px, except for images
    so small (under ``MIN_THUMBNAIL_PX`` thumbnail pixels a side, e.g. a 50 px tile) that every
    tissue object would be dropped as dust; those get a finer thumbnail and a smaller minimum."""
    short_side_um = min(slide.dimensions_xy) * slide.mpp
    if short_side_um / tissue_mpp >= MIN_THUMBNAIL_PX:
        return tissue_mpp, 64
    return max(slide.mpp, short_side_um / MIN_THUMBNAIL_PX), 4


def plan_slide(slide: Slide, predictor: TilePredictor, options: PredictOptions) -> SlidePlan:
    """Canvas, tile grid and tissue tiles of an open slide (reads only a thumbnail)."""
    model_mpp = float(predictor.mpp)
    area = processing_area(slide, options.roi_xywh)
    tile_px = int(predictor.tile_px)
    overlap = (
        options.overlap_px
        if options.overlap_px is not None
        else overlap_for_mpp(model_mpp, tile_px, PREDICT_OVERLAP_UM)
    )
    per_block = tiles_per_block_for(options.region_px, tile_px, overlap)
    block_px = per_block * (tile_px - overlap)
    halo = math.ceil(options.halo_um / model_mpp)
    if halo > block_px - overlap:
        # A smaller halo would change the nuclei; the block size must not (issue 11).
        raise CellsegError(
            f"--block-px {options.region_px} gives {block_px} px blocks, too small for this "
            f"model's {halo} px halo and {overlap} px overlap; use at least "
            f"{halo + overlap + tile_px}"
        )
    stride = tile_px - overlap
    offset = tuple(int(v) % stride for v in options.grid_offset_px)  # a stride is no shift
    grid = TileGrid(tile_px, stride, offset, context_px=halo)
    canvas = Canvas.on_grid(area, tuple(slide.bounds_xy), slide.mpp, model_mpp, grid)
    layout = TileLayout(canvas.height_px, canvas.width_px, tile_px, overlap, per_block, halo)
    # The ROI or the slide: the outputs' extent.
    owned_box = _canvas_box(canvas, area, tuple(slide.bounds_xy))
    tissue_area = None
    if options.tissue_mask:
        tissue_mpp, min_object_px = _tissue_resolution(slide, options.tissue_mpp)
        thumbnail = slide.thumbnail(tissue_mpp)
        mask = tissue_mask(thumbnail, min_object_px=min_object_px)
        mask_scale = tissue_mpp / slide.mpp
        tile_mask = tissue_tiles(mask, (mask_scale, mask_scale), canvas, layout)
        x, y, w, h = area
        crop = mask[
            math.floor(y / mask_scale) : math.ceil((y + h) / mask_scale),
            math.floor(x / mask_scale) : math.ceil((x + w) / mask_scale),
        ]
        tissue_area = tissue_area_mm2(crop, tissue_mpp)
    else:
        tile_mask = np.ones(layout.n_tiles_yx, dtype=bool)
    name, sha = model_identity(predictor, options)
    cell_px = round(options.cell_expansion_um / model_mpp) if options.object_type == "cell" else 0
    return SlidePlan(
        slide_path=Path(slide.path),
        slide_mpp=slide.mpp,
        mpp_source=slide.mpp_source,
        backend=slide.backend,
        dimensions_xy=tuple(slide.dimensions_xy),
        bounds_xy=tuple(slide.bounds_xy),
        area_xywh=tuple(area),
        model_mpp=model_mpp,
        canvas=canvas,
        layout=layout,
        tile_mask=tile_mask,
        tissue_area_mm2=tissue_area,
        num_classes=int(predictor.num_classes),
        postprocess=postprocess_for(predictor, options),
        model_name=name,
        model_sha256=sha,
        tta=bool(getattr(predictor, "tta", False)),
        precision=str(getattr(predictor, "precision", "fp32")),
        slide_sha256=_file_sha256(Path(slide.path)) if Path(slide.path).is_file() else None,
        cell_expansion_px=cell_px,
        rejection=rejection_of(getattr(getattr(predictor, "bundle", None), "meta", None)),
        owned_box=owned_box,
        grid_offset_xy=offset,
        blending=options.blending,
    )


def _canvas_box(
    canvas: Canvas, area_xywh: tuple[int, int, int, int], bounds_xy: tuple[int, int, int, int]
) -> Box:
    """Canvas box ``(y0, y1, x0, x1)`` of a level-0 rectangle: its start rounded to a pixel of
    the slide's grid (so every canvas cut from the grid puts it on the same model pixel), its
    size as :meth:`Canvas.from_area` gives it (so an ROI's outputs keep their size)."""
    x, y, w, h = area_xywh
    scale = canvas.scale
    # The canvas starts on a whole model pixel of the grid: recover that integer exactly.
    cx = round((canvas.origin_xy[0] - bounds_xy[0]) / scale)
    cy = round((canvas.origin_xy[1] - bounds_xy[1]) / scale)
    y0 = max(0, round((y - bounds_xy[1]) / scale) - cy)
    x0 = max(0, round((x - bounds_xy[0]) / scale) - cx)
    height = max(1, math.ceil(round(h / scale, 6)))
    width = max(1, math.ceil(round(w / scale, 6)))
    return (y0, min(canvas.height_px, y0 + height), x0, min(canvas.width_px, x0 + width))
