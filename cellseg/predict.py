"""Whole-slide prediction: slide -> network tiles -> blended probabilities -> nuclei -> files.

The pipeline (issue 3; overlap of stages for issue 5, PEERS.md §3 and §5) has three concurrent
stages connected by bounded queues, so reading, the model and post-processing overlap and none of
them holds more than a few blocks:

1. **read-ahead** (:mod:`cellseg.readahead`): worker processes read whole blocks (about
   2000 px at the model's mpp, one reader call each) of the tissue tiles, ahead of use;
2. **inference** (the calling thread): 224 px tiles are cut from the blocks in memory and run
   through the predictor in batches;
3. **post-processing** (one thread): tile probabilities are blended into final cells
   (:mod:`cellseg.stitch`) and written to Zarr (:mod:`cellseg.store`); each region, once its
   3×3 block neighbourhood is done, is labelled on core + halo, keeps the nuclei it owns
   (:mod:`cellseg.nuclei`), writes their ids into ``labels``, streams their polygons to the
   GeoJSON and commits them to the resume journal (:mod:`cellseg.journal`).

A run that is killed resumes from the journal: regions are labelled in raster order, so the
completed ones are a prefix, and only the blocks that unfinished regions depend on are read and
run again. Outputs appear under their final names only when complete.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import queue
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import __version__
from .errors import CellsegError, SlideError
from .geojson import OBJECT_TYPES, GeoJSONWriter
from .instances import PostProcess, label_instances
from .journal import Journal, NucleusRecord
from .nuclei import (
    nucleus_measurements,
    nucleus_outline,
    owned_nuclei,
    probabilities_from_store,
)
from .overlay import draw_overlay, overlay_format
from .readahead import ReadRequest, RegionReader, SlideSource
from .slide import Slide, open_slide
from .stitch import Stitcher
from .store import PredictionStore
from .tiling import (
    Canvas,
    TileLayout,
    overlap_for_mpp,
    tiles_per_block_for,
    tissue_tiles,
)
from .tissue import tissue_area_mm2, tissue_mask

log = logging.getLogger(__name__)

ZARR_FORMAT_VERSION = 1
QUEUE_BATCHES = 4  # probability batches waiting for post-processing at most


class TilePredictor(Protocol):
    """What the pipeline needs from a model (``cellseg.inference.Predictor`` or a test oracle).

    ``predictor(tiles)`` maps ``N×tile_px×tile_px×3`` uint8 RGB tiles to ``N×C×tile_px×tile_px``
    float32 softmax probabilities (channel 0 background).
    """

    mpp: float
    tile_px: int
    num_classes: int

    def __call__(self, tiles: np.ndarray) -> np.ndarray: ...


def default_workers() -> int:
    """Reader processes: half the CPU cores (the model and post-processing need the rest), 1-4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


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
        overlap_px: tile overlap at the model's mpp; None: 16 µm (:func:`overlap_for_mpp`).
        region_px: side of a read block / labelling region at the model's mpp.
        halo_um: context around a region for instance extraction (> 2 nucleus diameters).
        object_type: GeoJSON ``objectType``: detection, cell or annotation.
        postprocess: watershed parameters; None: the model's own (``meta["postprocess"]``).
        overwrite: replace existing outputs (otherwise they are an error).
        chunk_px: Zarr chunk side.
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
    overlap_px: int | None = None
    region_px: int = 2048
    halo_um: float = 32.0
    object_type: str = "detection"
    postprocess: PostProcess | None = None
    overwrite: bool = False
    chunk_px: int = 1024
    overlay_max_px: int = 2048
    model_name: str | None = None
    model_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.object_type not in OBJECT_TYPES:
            raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {self.object_type!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.roi_xywh is not None and (self.roi_xywh[2] <= 0 or self.roi_xywh[3] <= 0):
            raise ValueError(f"roi width and height must be > 0, got {self.roi_xywh}")


@dataclass(frozen=True)
class SlideOutputs:
    """Where one slide's results go; at least one must be set.

    Attributes:
        geojson: nuclei as a QuPath FeatureCollection (``.geojson`` or ``.geojson.gz``).
        zarr: Zarr v3 group with ``probability`` and ``labels``.
        overlay: downsampled picture with the outlines (``.png``, ``.jpg``, ``.tif``).
        summary: JSON run summary.
    """

    geojson: Path | None = None
    zarr: Path | None = None
    overlay: Path | None = None
    summary: Path | None = None

    @classmethod
    def in_dir(cls, out_dir: Path, slide_path: Path) -> SlideOutputs:
        """``out_dir/<stem>.geojson``, ``<stem>.zarr`` and ``<stem>.json`` for a batch run."""
        stem = Path(slide_path).stem
        out_dir = Path(out_dir)
        return cls(
            geojson=out_dir / f"{stem}.geojson",
            zarr=out_dir / f"{stem}.zarr",
            summary=out_dir / f"{stem}.json",
        )

    def paths(self) -> list[Path]:
        return [p for p in (self.geojson, self.zarr, self.overlay, self.summary) if p is not None]

    def existing(self) -> list[Path]:
        return [p for p in self.paths() if p.exists()]

    @property
    def work_dir(self) -> Path:
        """Folder of the resume journal, beside the first output."""
        primary = self.paths()[0]
        return primary.with_name(primary.name + ".cellseg-work")

    @property
    def zarr_partial(self) -> Path:
        """Where the Zarr group is built (beside its final name, or in the work folder)."""
        if self.zarr is not None:
            return self.zarr.with_name(self.zarr.name + ".partial")
        return self.work_dir / "work.zarr"

    def is_resumable(self) -> bool:
        return (self.work_dir / "progress.json").is_file()


# ------------------------------------------------------------------------------------- planning


@dataclass
class SlidePlan:
    """Everything decided about a slide before any tile is run."""

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


def processing_area(slide: Slide, roi_xywh: tuple[int, int, int, int] | None):
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


def _model_identity(predictor: TilePredictor, options: PredictOptions) -> tuple[str, str | None]:
    bundle = getattr(predictor, "bundle", None)
    path = getattr(bundle, "path", None)
    name = options.model_name or getattr(bundle, "name", None) or type(predictor).__name__
    sha = options.model_sha256 or (_file_sha256(Path(path)) if path else None)
    return name, sha


def _postprocess_for(predictor: TilePredictor, options: PredictOptions) -> PostProcess:
    if options.postprocess is not None:
        return options.postprocess
    meta = getattr(getattr(predictor, "bundle", None), "meta", None) or {}
    return PostProcess.from_dict(meta.get("postprocess", {}))


def plan_slide(slide: Slide, predictor: TilePredictor, options: PredictOptions) -> SlidePlan:
    """Canvas, tile grid and tissue tiles of an open slide (reads only a thumbnail)."""
    model_mpp = float(predictor.mpp)
    area = processing_area(slide, options.roi_xywh)
    canvas = Canvas.from_area(area, slide.mpp, model_mpp)
    tile_px = int(predictor.tile_px)
    overlap = (
        options.overlap_px if options.overlap_px is not None else overlap_for_mpp(model_mpp, tile_px)
    )
    per_block = tiles_per_block_for(options.region_px, tile_px, overlap)
    block_px = per_block * (tile_px - overlap)
    halo = min(math.ceil(options.halo_um / model_mpp), block_px - overlap)
    layout = TileLayout(canvas.height_px, canvas.width_px, tile_px, overlap, per_block, halo)
    tissue_area = None
    if options.tissue_mask:
        thumbnail = slide.thumbnail(options.tissue_mpp)
        mask = tissue_mask(thumbnail)
        mask_scale = options.tissue_mpp / slide.mpp
        tile_mask = tissue_tiles(mask, (mask_scale, mask_scale), canvas, layout)
        x, y, w, h = area
        crop = mask[
            math.floor(y / mask_scale) : math.ceil((y + h) / mask_scale),
            math.floor(x / mask_scale) : math.ceil((x + w) / mask_scale),
        ]
        tissue_area = tissue_area_mm2(crop, options.tissue_mpp)
    else:
        tile_mask = np.ones(layout.n_tiles_yx, dtype=bool)
    name, sha = _model_identity(predictor, options)
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
        postprocess=_postprocess_for(predictor, options),
        model_name=name,
        model_sha256=sha,
    )


def _fingerprint(plan: SlidePlan, options: PredictOptions, outputs: SlideOutputs) -> dict:
    """What must be equal for a journal to be resumed (inputs, model, geometry, outputs)."""
    stat = plan.slide_path.stat()
    return {
        "cellseg": __version__,
        "slide": str(plan.slide_path.resolve()),
        "slide_size": stat.st_size,
        "slide_mtime_ns": stat.st_mtime_ns,
        "backend": plan.backend,
        "slide_mpp": plan.slide_mpp,
        "model": [plan.model_name, plan.model_sha256, plan.model_mpp, plan.num_classes],
        "canvas": asdict(plan.canvas),
        "layout": asdict(plan.layout),
        "tissue": [options.tissue_mask, options.tissue_mpp],
        "postprocess": plan.postprocess.to_dict(),
        "zarr": str(outputs.zarr_partial.resolve()),
        "with_labels": outputs.zarr is not None,
    }


def zarr_attributes(plan: SlidePlan) -> dict[str, Any]:
    """Attributes of the output group: geometry, model, tiling and versions."""
    layout = plan.layout
    return {
        "cellseg_zarr_format": ZARR_FORMAT_VERSION,
        "cellseg_version": __version__,
        "slide": str(plan.slide_path),
        "mpp": plan.model_mpp,
        "slide_mpp": plan.slide_mpp,
        "mpp_source": plan.mpp_source,
        "scale_to_level0": plan.canvas.scale,
        "origin_xy_level0": list(plan.canvas.origin_xy),
        "bounds_xy": list(plan.bounds_xy),
        "pixel_convention": (
            "array pixel (y, x) covers level-0 [origin + x·scale, origin + (x+1)·scale) "
            "horizontally (likewise y); QuPath coordinates = level-0 - bounds_xy[:2]"
        ),
        "model": {"name": plan.model_name, "sha256": plan.model_sha256},
        "num_classes": plan.num_classes,
        "postprocess": plan.postprocess.to_dict(),
        "tiling": {
            "tile_px": layout.tile_px,
            "overlap_px": layout.overlap_px,
            "stride_px": layout.stride_px,
            "region_px": layout.block_px,
            "halo_px": layout.halo_px,
            "blending": "taper-weighted mean (cellseg.inference.blend_weights)",
            "ownership": "nucleus kept by the region containing its centroid",
        },
        "probability": "nucleus probability (p_interior + p_boundary) x 255, uint8",
        "labels": "instance ids, uint32, 0 = background; = GeoJSON measurement 'Label'",
    }


# ------------------------------------------------------------------------------ post-processing


class _PostProcessor:
    """Blends tile probabilities, writes them, and labels regions as soon as they are ready.

    Runs in its own thread, fed in block raster order by :class:`_PostThread`.
    """

    def __init__(
        self,
        plan: SlidePlan,
        store: PredictionStore,
        journal: Journal,
        writer: GeoJSONWriter | None,
        active: np.ndarray,
        weights: np.ndarray,
        on_region: Callable[[int, int], None] | None,
        started: float,
    ) -> None:
        self.plan = plan
        self.layout = plan.layout
        self.store = store
        self.journal = journal
        self.writer = writer
        self.on_region = on_region
        self.started = started
        self.stitcher = Stitcher(plan.layout, plan.num_classes, weights, active)
        self.done = np.zeros(plan.layout.n_blocks_yx, dtype=bool)
        self.regions = list(plan.layout.blocks())
        self.next_region = journal.regions_done
        counts = plan.block_tile_counts
        self.region_has_tiles = {
            r: any(counts[b] > 0 for b in plan.layout.neighbourhood(*r)) for r in self.regions
        }

    def add_tiles(self, block: tuple[int, int], tiles: list, probs: np.ndarray) -> None:
        self.stitcher.add_tiles(block, tiles, probs)

    def finish_block(self, block: tuple[int, int]) -> None:
        for cell in self.stitcher.finish_block(block):
            self.store.write_probabilities(cell.box, cell.probs)
        self.done[block] = True
        self._label_ready_regions()

    def finish(self) -> None:
        self._label_ready_regions()
        if self.next_region != len(self.regions):
            raise RuntimeError(
                f"{self.next_region} of {len(self.regions)} regions labelled at the end"
            )

    def _label_ready_regions(self) -> None:
        while self.next_region < len(self.regions):
            region = self.regions[self.next_region]
            if not all(self.done[b] for b in self.layout.neighbourhood(*region)):
                return
            self._label_region(region)
            self.next_region += 1
            if self.on_region is not None:
                self.on_region(self.next_region, len(self.regions))

    def _label_region(self, region: tuple[int, int]) -> None:
        plan, layout = self.plan, self.layout
        window, core = layout.region_window(*region), layout.region_core(*region)
        first_id = self.journal.next_id
        records: list[NucleusRecord] = []
        dropped = 0
        if self.region_has_tiles[region]:
            nucleus_u8, interior_u8 = self.store.read_probabilities(window)
            probs = probabilities_from_store(nucleus_u8, interior_u8)
            labels = label_instances(probs, plan.model_mpp, plan.postprocess)
            canvas_hw = (layout.height_px, layout.width_px)
            owned, dropped = owned_nuclei(labels, 1.0 - probs[0], window, core, canvas_hw)
            ids = np.zeros(labels.shape, dtype=np.uint32)
            for nucleus in owned:
                record = self._record(labels, nucleus, window, first_id + len(records))
                if record is not None:
                    rows, cols = nucleus.slices
                    ids[rows, cols][labels[rows, cols] == nucleus.local_label] = record.id
                    records.append(record)
            self.store.write_labels(window, ids, first_id)
        if self.writer is not None:
            for record in records:
                self.writer.write(record.polygon, record.measurements)
        counters = dict(self.journal.counters)
        counters["dropped"] = counters.get("dropped", 0) + dropped
        counters["seconds"] = self.journal.base_seconds + time.monotonic() - self.started
        self.journal.record_region(records, first_id + len(records), counters)

    def _record(self, labels, nucleus, window, label_id: int) -> NucleusRecord | None:
        plan = self.plan
        polygon = nucleus_outline(labels, nucleus, window, plan.canvas.scale, plan.qupath_offset_xy)
        if polygon is None:
            return None
        measurements = nucleus_measurements(polygon, nucleus, label_id, plan.slide_mpp)
        return NucleusRecord(label_id, polygon, measurements)


class _PostThread:
    """Runs a :class:`_PostProcessor` in a thread behind a bounded queue.

    Errors raised in the thread are re-raised in the caller at the next :meth:`put` or at
    :meth:`close`; :meth:`abort` stops the thread without finishing.
    """

    def __init__(self, post: _PostProcessor, maxsize: int) -> None:
        self.post = post
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cellseg-postprocess", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    message = self.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if message is None:
                    self.post.finish()
                    return
                kind, *args = message
                getattr(self.post, kind)(*args)
        except BaseException as exc:  # handed to the main thread
            self.error = exc

    def put(self, message: tuple | None) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if not self._thread.is_alive():
                raise RuntimeError("post-processing thread stopped unexpectedly")
            try:
                self.queue.put(message, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Finishes all queued work and the remaining regions; re-raises thread errors."""
        self.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------ inference


def _block_jobs(plan: SlidePlan, active: np.ndarray) -> list[tuple[tuple[int, int], list]]:
    """Active blocks in raster order with their tissue tiles ``(ty, tx)``."""
    jobs = []
    for block in plan.layout.blocks():
        if not active[block]:
            continue
        ty0, ty1, tx0, tx1 = plan.layout.block_tiles(*block)
        ys, xs = np.nonzero(plan.tile_mask[ty0:ty1, tx0:tx1])
        jobs.append((block, [(ty0 + int(y), tx0 + int(x)) for y, x in zip(ys, xs, strict=True)]))
    return jobs


def _read_request(plan: SlidePlan, tiles: list) -> tuple[tuple[int, int], ReadRequest]:
    """Canvas origin ``(y0, x0)`` and read request of the box covering ``tiles``."""
    tys = [t[0] for t in tiles]
    txs = [t[1] for t in tiles]
    y0, y1, x0, x1 = plan.layout.tiles_box(min(tys), max(tys) + 1, min(txs), max(txs) + 1)
    origin = plan.canvas.level0_xy(x0, y0)
    return (y0, x0), ReadRequest(origin, (x1 - x0, y1 - y0), plan.model_mpp)


class _Batcher:
    """Collects tiles across blocks into batches, runs the model, forwards results in order.

    ``finish_block`` messages are sent only after all of a block's tiles and all earlier blocks,
    so the post-processor sees blocks complete in raster order whatever the batch boundaries.
    """

    def __init__(
        self, predictor: TilePredictor, layout: TileLayout, batch_size: int, post: _PostThread
    ) -> None:
        self.predictor = predictor
        self.tile_px = layout.tile_px
        self.stride_px = layout.stride_px
        self.batch_size = batch_size
        self.post = post
        self.tiles: list[tuple[tuple[int, int], tuple[int, int], np.ndarray]] = []
        self.remaining: deque[list] = deque()  # [block, its tiles not yet predicted]
        self.tiles_run = 0
        self.on_batch: Callable[[int], None] | None = None

    def add_block(
        self,
        block: tuple[int, int],
        tiles: list[tuple[int, int]],
        image: np.ndarray | None,
        origin_yx: tuple[int, int],
    ) -> None:
        """Queues a block's tiles (cut from ``image``, whose top-left is canvas ``origin_yx``)."""
        self.remaining.append([block, len(tiles)])
        t = self.tile_px
        for ty, tx in tiles:
            y, x = ty * self.stride_px - origin_yx[0], tx * self.stride_px - origin_yx[1]
            self.tiles.append((block, (ty, tx), image[y : y + t, x : x + t]))
            if len(self.tiles) == self.batch_size:
                self.flush()
        self._send_done()

    def flush(self) -> None:
        """Runs the model on the queued tiles."""
        if not self.tiles:
            return
        batch, self.tiles = self.tiles, []
        probs = self.predictor(np.stack([tile for _, _, tile in batch]))
        start = 0
        for end in range(1, len(batch) + 1):
            if end == len(batch) or batch[end][0] != batch[start][0]:
                block = batch[start][0]
                tiles = [t for _, t, _ in batch[start:end]]
                self.post.put(("add_tiles", block, tiles, probs[start:end]))
                for entry in self.remaining:
                    if entry[0] == block:
                        entry[1] -= end - start
                start = end
        self.tiles_run += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch))
        self._send_done()

    def _send_done(self) -> None:
        while self.remaining and self.remaining[0][1] == 0:
            block, _ = self.remaining.popleft()
            self.post.put(("finish_block", block))
