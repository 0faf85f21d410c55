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
import multiprocessing
import os
import platform
import queue
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import __version__
from .errors import CellsegError, SlideError
from .geojson import OBJECT_TYPES, GeoJSONWriter
from .instances import PostProcess
from .journal import Journal, NucleusRecord
from .nuclei import LABEL_KEY, RegionJob, RegionNuclei, extract_region
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
        label_workers: processes for instance extraction and polygons (0: the post-processing
            thread does it); None: :func:`default_label_workers`.
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
    label_workers: int | None = None
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

    Runs in its own thread, fed in block raster order by :class:`_PostThread`. Labelling (the
    CPU-heavy watershed and polygon work, :func:`cellseg.nuclei.extract_region`) runs inline or
    in ``label_workers`` processes; results are committed strictly in region order, which makes
    the nucleus ids, the Zarr labels and the journal independent of timing.
    """

    def __init__(
        self,
        plan: SlidePlan,
        store: PredictionStore,
        journal: Journal,
        writer: GeoJSONWriter | None,
        active: np.ndarray,
        weights: np.ndarray,
        label_workers: int,
        on_region: Callable[[int, int], None] | None,
    ) -> None:
        self.plan = plan
        self.layout = plan.layout
        self.store = store
        self.journal = journal
        self.writer = writer
        self.on_region = on_region
        self.started = time.monotonic()
        self.base_seconds = float(journal.counters.get("seconds", 0.0))
        self.stitcher = Stitcher(plan.layout, plan.num_classes, weights, active)
        self.done = np.zeros(plan.layout.n_blocks_yx, dtype=bool)
        self.regions = list(plan.layout.blocks())
        self.next_region = journal.regions_done  # next region to submit
        counts = plan.block_tile_counts
        self.region_has_tiles = [
            any(counts[b] > 0 for b in plan.layout.neighbourhood(*r)) for r in self.regions
        ]
        self.pool = _label_pool(label_workers)
        self.max_in_flight = 2 * label_workers
        self.in_flight: deque[tuple[tuple[int, int], Any]] = deque()

    def add_tiles(self, block: tuple[int, int], tiles: list, probs: np.ndarray) -> None:
        self.stitcher.add_tiles(block, tiles, probs)

    def finish_block(self, block: tuple[int, int]) -> None:
        for cell in self.stitcher.finish_block(block):
            self.store.write_probabilities(cell.box, cell.probs)
        self.done[block] = True
        self._submit_ready_regions()

    def finish(self) -> None:
        self._submit_ready_regions()
        while self.in_flight:
            self._commit_next()
        if self.journal.regions_done != len(self.regions):
            raise RuntimeError(
                f"{self.journal.regions_done} of {len(self.regions)} regions labelled at the end"
            )
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _submit_ready_regions(self) -> None:
        while self.next_region < len(self.regions):
            region = self.regions[self.next_region]
            if not all(self.done[b] for b in self.layout.neighbourhood(*region)):
                break
            self.in_flight.append((region, self._submit(region, self.next_region)))
            self.next_region += 1
            while len(self.in_flight) > self.max_in_flight:
                self._commit_next()
        # Commit whatever already finished, without waiting.
        while self.in_flight and _is_done(self.in_flight[0][1]):
            self._commit_next()

    def _submit(self, region: tuple[int, int], index: int):
        """Starts labelling a region; returns a future, or the result itself when inline."""
        if not self.region_has_tiles[index]:
            return None
        plan, layout = self.plan, self.layout
        window = layout.region_window(*region)
        job = RegionJob(
            window=window,
            core=layout.region_core(*region),
            canvas_hw=(layout.height_px, layout.width_px),
            model_mpp=plan.model_mpp,
            params=plan.postprocess,
            scale=plan.canvas.scale,
            offset_xy=plan.qupath_offset_xy,
            slide_mpp=plan.slide_mpp,
        )
        nucleus_u8, interior_u8 = self.store.read_probabilities(window)
        if self.pool is None:
            return extract_region(nucleus_u8, interior_u8, job)
        return self.pool.submit(extract_region, nucleus_u8, interior_u8, job)

    def _commit_next(self) -> None:
        """Gives the oldest region's nuclei their ids and writes them everywhere, in order."""
        region, pending = self.in_flight.popleft()
        result: RegionNuclei | None = pending.result() if isinstance(pending, Future) else pending
        first_id = self.journal.next_id
        records: list[NucleusRecord] = []
        dropped = 0
        if result is not None:
            lut = np.zeros(int(result.labels.max()) + 1, dtype=np.uint32)
            for offset, (local, polygon, measurements) in enumerate(result.nuclei):
                label_id = first_id + offset
                lut[local] = label_id
                records.append(NucleusRecord(label_id, polygon, {**measurements, LABEL_KEY: label_id}))
            self.store.write_labels(self.layout.region_window(*region), lut[result.labels], first_id)
            dropped = result.dropped
        if self.writer is not None:
            for record in records:
                self.writer.write(record.polygon, record.measurements)
        counters = dict(self.journal.counters)
        counters["dropped"] = counters.get("dropped", 0) + dropped
        counters["seconds"] = self.base_seconds + time.monotonic() - self.started
        self.journal.record_region(records, first_id + len(records), counters)
        if self.on_region is not None:
            self.on_region(self.journal.regions_done, len(self.regions))


def _is_done(pending: Any) -> bool:
    return not isinstance(pending, Future) or pending.done()


def default_label_workers() -> int:
    """Labelling processes: none on small machines (a thread does it), else up to 8."""
    return max(0, min(8, ((os.cpu_count() or 2) - 2) // 2))


def _label_pool(workers: int) -> ProcessPoolExecutor | None:
    if workers <= 0:
        return None
    # spawn: the parent holds torch and threads, which must not be forked.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


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


def _active_blocks(layout: TileLayout, regions_done: int) -> np.ndarray:
    """Blocks that the regions not yet done depend on (all of them on a fresh run)."""
    active = np.zeros(layout.n_blocks_yx, dtype=bool)
    for index, region in enumerate(layout.blocks()):
        if index >= regions_done:
            for block in layout.neighbourhood(*region):
                active[block] = True
    return active


def _run_pipeline(
    plan: SlidePlan,
    predictor: TilePredictor,
    options: PredictOptions,
    store: PredictionStore,
    journal: Journal,
    writer: GeoJSONWriter | None,
    progress: bool,
    on_region: Callable[[int, int], None] | None,
) -> int:
    """Reads, predicts and post-processes every block the unfinished regions need.

    Returns:
        Number of network tiles run.
    """
    from tqdm import tqdm

    from .inference import blend_weights

    layout = plan.layout
    active = _active_blocks(layout, journal.regions_done)
    jobs = _block_jobs(plan, active)
    weights = blend_weights(layout.tile_px, layout.overlap_px)
    label_workers = (
        default_label_workers() if options.label_workers is None else options.label_workers
    )
    post = _PostProcessor(
        plan, store, journal, writer, active, weights, label_workers, on_region
    )
    thread = _PostThread(post, maxsize=2 * QUEUE_BATCHES)
    batcher = _Batcher(predictor, layout, options.batch_size, thread)
    requests, origins = [], {}
    for block, tiles in jobs:
        if tiles:
            origins[block], request = _read_request(plan, tiles)
            requests.append((block, request))
    bar = tqdm(
        total=sum(len(tiles) for _, tiles in jobs),
        desc=plan.slide_path.name,
        unit="tile",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    batcher.on_batch = bar.update
    workers = default_workers() if options.workers is None else options.workers
    source = SlideSource(plan.slide_path, plan.backend, options.mpp)
    finished = False
    try:
        with RegionReader(source, workers) as reader:
            images = reader.read_ahead(requests)
            for block, tiles in jobs:
                image = None
                if tiles:
                    key, image = next(images)
                    assert key == block, f"read-ahead out of order: {key} != {block}"
                batcher.add_block(block, tiles, image, origins.get(block, (0, 0)))
            batcher.flush()
        thread.close()
        finished = True
    finally:
        if not finished:
            thread.abort()
            post.close()
        bar.close()
    return batcher.tiles_run


def _replace_dir(partial: Path, final: Path) -> None:
    """Moves a finished folder into place (replacing an older one: ``--overwrite``)."""
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(partial, final)


def _write_json(path: Path, data: dict) -> None:
    import json

    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def _versions() -> dict[str, str]:
    versions = {"cellseg": __version__, "python": platform.python_version()}
    for package in ("numpy", "zarr", "shapely", "scikit-image", "openslide-python", "tiffslide"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = torch.__version__
    return versions


def _peak_rss_mb() -> float:
    import resource

    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


@dataclass
class _RunStats:
    tiles_run: int = 0
    session_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _summary(
    plan: SlidePlan,
    options: PredictOptions,
    outputs: SlideOutputs,
    journal: Journal,
    stats: _RunStats,
    predictor: TilePredictor,
) -> dict[str, Any]:
    tiles = int(plan.tile_mask.sum())
    seconds = float(journal.counters.get("seconds", 0.0))
    seconds = max(seconds, stats.session_seconds)
    area = plan.tissue_area_mm2 if plan.tissue_area_mm2 is not None else plan.processed_area_mm2()
    layout = plan.layout
    return {
        "slide": str(plan.slide_path),
        "backend": plan.backend,
        "slide_mpp": plan.slide_mpp,
        "mpp_source": plan.mpp_source,
        "mpp": plan.model_mpp,
        "scale_to_level0": plan.canvas.scale,
        "dimensions_xy": list(plan.dimensions_xy),
        "bounds_xy": list(plan.bounds_xy),
        "area_xywh_level0": list(plan.area_xywh),
        "canvas_px_wh": [plan.canvas.width_px, plan.canvas.height_px],
        "tissue_mask": options.tissue_mask,
        "tissue_area_mm2": plan.tissue_area_mm2,
        "processed_area_mm2": plan.processed_area_mm2(),
        "tiles": tiles,
        "tiles_skipped": int(plan.tile_mask.size) - tiles,
        "tiles_run_this_session": stats.tiles_run,
        "regions": len(list(layout.blocks())),
        "nuclei": journal.next_id - 1,
        "objects_dropped_larger_than_halo": int(journal.counters.get("dropped", 0)),
        "seconds": round(seconds, 3),
        "seconds_this_session": round(stats.session_seconds, 3),
        "tiles_per_second": round(stats.tiles_run / stats.session_seconds, 2)
        if stats.session_seconds > 0
        else None,
        "seconds_per_mm2": round(seconds / area, 3) if area else None,
        "resumed": journal.resumed,
        "peak_rss_mb": _peak_rss_mb(),
        "tiling": {
            "tile_px": layout.tile_px,
            "overlap_px": layout.overlap_px,
            "region_px": layout.block_px,
            "halo_px": layout.halo_px,
            "batch_size": options.batch_size,
            "workers": default_workers() if options.workers is None else options.workers,
        },
        "model": {
            "name": plan.model_name,
            "sha256": plan.model_sha256,
            "num_classes": plan.num_classes,
            "device": str(getattr(predictor, "device", "unknown")),
            "postprocess": plan.postprocess.to_dict(),
        },
        "versions": _versions(),
        "outputs": {k: str(v) for k, v in asdict(outputs).items() if v is not None},
    }


def _open_store(plan: SlidePlan, outputs: SlideOutputs, journal: Journal) -> PredictionStore:
    """The partial Zarr group: reopened when resuming, else created (restarting the journal
    if its group went missing)."""
    canvas_hw = (plan.layout.height_px, plan.layout.width_px)
    if journal.resumed:
        store = PredictionStore.open(outputs.zarr_partial, canvas_hw)
        if store is not None:
            return store
        log.warning("%s: partial Zarr missing; starting this slide afresh", outputs.zarr_partial)
        journal.restart()
    return PredictionStore.create(
        outputs.zarr_partial,
        canvas_hw,
        num_classes=plan.num_classes,
        with_labels=outputs.zarr is not None,
        attrs=zarr_attributes(plan),
    )


def _predict_planned(
    slide: Slide,
    plan: SlidePlan,
    predictor: TilePredictor,
    options: PredictOptions,
    outputs: SlideOutputs,
    journal: Journal,
    progress: bool,
    on_region: Callable[[int, int], None] | None,
    started: float,
) -> dict[str, Any]:
    store = _open_store(plan, outputs, journal)
    stats = _RunStats()
    if outputs.geojson is not None:
        with GeoJSONWriter(outputs.geojson, options.object_type) as writer:
            for record in journal.nuclei():  # replay what an interrupted run committed
                writer.write(record.polygon, record.measurements)
            stats.tiles_run = _run_pipeline(
                plan, predictor, options, store, journal, writer, progress, on_region
            )
    else:
        stats.tiles_run = _run_pipeline(
            plan, predictor, options, store, journal, None, progress, on_region
        )
    store.finish({"nuclei": journal.next_id - 1})
    if outputs.zarr is not None:
        _replace_dir(outputs.zarr_partial, outputs.zarr)
    if outputs.overlay is not None:
        outlines = (record.polygon for record in journal.nuclei())
        draw_overlay(
            slide, plan.area_xywh, outlines, outputs.overlay, max_px=options.overlay_max_px
        )
    stats.session_seconds = time.monotonic() - started
    summary = _summary(plan, options, outputs, journal, stats, predictor)
    if outputs.summary is not None:
        _write_json(outputs.summary, summary)
    return summary


def predict_slide(
    slide_path: str | Path,
    predictor: TilePredictor,
    outputs: SlideOutputs,
    options: PredictOptions | None = None,
    *,
    progress: bool = False,
    on_region: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Segments the nuclei of one slide and writes the requested outputs.

    Resumes an interrupted run of the same slide, model and parameters from its journal (the
    ``<first output>.cellseg-work`` folder). Outputs appear under their names only when complete.

    Args:
        slide_path: the slide (or a small plain image).
        predictor: the model (``cellseg.inference.Predictor`` or any :class:`TilePredictor`).
        outputs: where to write; at least one path.
        options: reading, tiling and post-processing choices; defaults when None.
        progress: show a tqdm progress bar on stderr.
        on_region: called as ``on_region(done, total)`` after each region is committed (tests
            use it to interrupt a run).

    Returns:
        The run summary (also written to ``outputs.summary``): mpp used and its source, tissue
        area, tiles, nuclei, seconds, model and versions.

    Raises:
        CellsegError: an output exists (without ``overwrite``), the slide cannot be opened or
            read, or its mpp is unknown. Nothing is left under the output names, and the
            partial state is removed. Other exceptions (including KeyboardInterrupt) keep the
            partial state so that the next run resumes.
    """
    options = options or PredictOptions()
    slide_path = Path(slide_path)
    if not outputs.paths():
        raise ValueError("SlideOutputs: no output requested")
    if outputs.overlay is not None:
        overlay_format(outputs.overlay)
    existing = outputs.existing()
    if existing and not options.overwrite and not outputs.is_resumable():
        raise CellsegError(f"{existing[0]}: already exists (pass --overwrite to replace it)")
    started = time.monotonic()
    with open_slide(slide_path, options.backend, options.mpp) as slide:
        plan = plan_slide(slide, predictor, options)
        for path in outputs.paths():
            path.parent.mkdir(parents=True, exist_ok=True)
        journal = Journal.open(outputs.work_dir, _fingerprint(plan, options, outputs))
        try:
            summary = _predict_planned(
                slide, plan, predictor, options, outputs, journal, progress, on_region, started
            )
        except CellsegError:
            # A data error will fail again: leave nothing behind.
            journal.remove()
            shutil.rmtree(outputs.zarr_partial, ignore_errors=True)
            raise
        journal.remove()
    return summary


def iter_nuclei(outputs: SlideOutputs) -> Iterator[NucleusRecord]:
    """Nuclei committed so far by an unfinished run (for inspection and tests)."""
    journal = Journal(outputs.work_dir, {})
    saved = journal._load()
    if saved is None:
        return iter(())
    journal.nuclei_bytes = int(saved["nuclei_bytes"])
    return journal.nuclei()
