"""The concurrent stages of whole-slide prediction, fed with a :class:`~cellseg.planning.SlidePlan`.

Three stages connected by bounded queues, so that reading, the model and post-processing
overlap (issue 5; PEERS.md §3 and §5: GPUs starve when these run in series) and none of them
holds more than a few blocks:

1. **read-ahead** (:mod:`cellseg.readahead`): worker processes read whole blocks (about 2000 px
   at the model's mpp, one reader call each) of the tissue tiles, ahead of use;
2. **inference** (the calling thread, :class:`_Batcher`): 224 px tiles are cut from the blocks
   in memory and run through the predictor in batches that span blocks;
3. **post-processing** (one thread, :class:`_PostProcessor`): tile probabilities are blended
   into final cells (:mod:`cellseg.stitch`) and written to the float32 working canvas
   (:class:`WorkingCanvas`); each region, as soon as its block is done
   (:meth:`cellseg.tiling.TileLayout.region_blocks`), is labelled on core + halo from the canvas
   (in ``label_workers`` processes when there are cores to spare), keeps the nuclei it owns
   (:mod:`cellseg.nuclei`), gets its global ids and is handed, in raster order, to the
   :class:`RegionSink` as one :class:`~cellseg.records.RegionCommit`.

The runner knows no file format: where the canvas lives and what the sinks write (GeoJSON, Zarr
labels, the journal: :mod:`cellseg.sinks`) is the caller's choice, and data flows one way, from
the slide through the stages into the sinks.

Every stage records where its time went (:class:`PipelineStats`: busy and waiting seconds), so
that a pipeline slower than its slowest stage can be explained from the run summary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from .nuclei import LABEL_KEY, RegionJob, RegionNuclei, extract_region
from .planning import SlidePlan, TilePredictor
from .readahead import ReadRequest, RegionReader, SlideSource
from .records import NucleusRecord, RegionCommit, ResumePoint
from .stitch import Stitcher
from .tiling import Box, TileLayout
from .workers import start_pool

log = logging.getLogger(__name__)

QUEUE_MESSAGES = 8  # tile batches and block completions waiting for post-processing, at most


def default_workers() -> int:
    """Reader processes: half the CPU cores (the model and post-processing need the rest), 1-4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class WorkingCanvas(Protocol):
    """Where the runner keeps the blended probabilities and the slide's pixels over the whole
    canvas until the regions that read them are labelled (:class:`cellseg.store.PredictionStore`
    is one). ``read_float`` must return exactly what ``write_cells`` was given: labelling from a
    lossy copy would make the nuclei depend on where the regions fall."""

    def write_cells(self, cells: Sequence[tuple[Box, np.ndarray]]) -> None:
        """Stores the final ``C×h×w`` float32 probabilities of disjoint canvas boxes."""

    def read_float(self, box: Box) -> np.ndarray:
        """The ``C×h×w`` float32 probabilities of a canvas box, bit for bit as written."""

    def write_pixels(self, box: Box, rgb: np.ndarray) -> None:
        """Stores the slide's ``h×w×3`` uint8 pixels of a canvas box."""

    def read_pixels(self, box: Box) -> np.ndarray | None:
        """The slide's pixels of a canvas box (white where none were written), or None when
        the canvas keeps none."""


class RegionSink(Protocol):
    """What receives the results: each region once, in raster order, after the earlier ones.

    A run that is interrupted and resumed hands a sink the regions after
    :class:`~cellseg.records.ResumePoint`'s prefix again, possibly one it had already received
    (the one in progress when the run died), so committing a region twice must give the same
    outputs."""

    @property
    def wants_labels(self) -> bool:
        """Whether :attr:`RegionCommit.labels` is needed (the watershed keeps its label map)."""

    def commit_region(self, region: RegionCommit) -> None:
        """Takes one region's nuclei (and label map); raises to stop the run."""


@dataclass
class PipelineStats:
    """Where one :func:`run_pipeline` call spent its time, in seconds.

    *Busy* is time a stage worked, *wait* time it was blocked on another stage. The inference
    thread's waits tell what held the model back: reading (``reader_wait_s``) or
    post-processing (``queue_wait_s``, blocked on the full queue to it). The post-processing
    thread's busy times add up to ``post_busy_s``; ``label_wait_s`` is time it waited for
    labelling processes, ``post_wait_s`` time it had nothing to do. ``tail_s`` runs from the
    last model call to the end: post-processing that did not overlap inference.
    """

    tiles_run: int = 0
    wall_s: float = 0.0
    reader_wait_s: float = 0.0  # inference thread waiting for the read-ahead
    batch_busy_s: float = 0.0  # stacking tiles into batches
    model_busy_s: float = 0.0  # predictor calls
    queue_wait_s: float = 0.0  # inference thread blocked on the full post-processing queue
    post_wait_s: float = 0.0  # post-processing thread idle, waiting for messages
    stitch_busy_s: float = 0.0  # blending and probability writes
    label_busy_s: float = 0.0  # labelling inline, or reading windows and submitting them
    label_wait_s: float = 0.0  # waiting for labelling processes
    commit_busy_s: float = 0.0  # ids and the sinks' commits (labels, GeoJSON, journal)
    tail_s: float = 0.0  # after the last model call

    @property
    def post_busy_s(self) -> float:
        return self.stitch_busy_s + self.label_busy_s + self.commit_busy_s

    def to_dict(self) -> dict[str, float | int | None]:
        """The fields rounded to milliseconds, plus ``post_busy_s`` and ``model_share`` (model
        busy / wall: 1.0 when nothing but the model limits the pipeline)."""
        out: dict[str, float | int | None] = {
            k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()
        }
        out["post_busy_s"] = round(self.post_busy_s, 3)
        out["model_share"] = round(self.model_busy_s / self.wall_s, 3) if self.wall_s else None
        return out


@contextmanager
def _timed(stats: PipelineStats, field: str) -> Iterator[None]:
    """Adds the seconds spent in the ``with`` body to ``stats.<field>``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        setattr(stats, field, getattr(stats, field) + time.perf_counter() - start)


# ------------------------------------------------------------------------------ post-processing


class _PostProcessor:
    """Blends tile probabilities, writes them, and labels regions as soon as they are ready.

    Runs in its own thread, fed in block raster order by :class:`_PostThread`. Labelling (the
    CPU-heavy watershed and polygon work, :func:`cellseg.nuclei.extract_region`) runs inline or
    in ``label_workers`` processes; results are committed strictly in region order, which makes
    the nucleus ids and whatever the sink writes independent of timing. A region is
    submitted as soon as the blocks its window depends on are done, which is right after its
    own block (:meth:`cellseg.tiling.TileLayout.region_blocks`).
    """

    def __init__(
        self,
        plan: SlidePlan,
        canvas: WorkingCanvas,
        sink: RegionSink,
        resume: ResumePoint,
        active: np.ndarray,
        weights: np.ndarray,
        label_workers: int,
        on_region: Callable[[int, int], None] | None,
        stats: PipelineStats,
    ) -> None:
        self.plan = plan
        self.stats = stats
        self.layout = plan.layout
        self.canvas = canvas
        self.sink = sink
        self.keep_labels = bool(sink.wants_labels)
        self.on_region = on_region
        self.started = time.monotonic()
        self.base_seconds = float(resume.counters.get("seconds", 0.0))
        # Committed so far (the resumed prefix, then this run's regions).
        self.regions_done = resume.regions_done
        self.next_id = resume.next_id
        self.counters = dict(resume.counters)
        self.stitcher = Stitcher(plan.layout, plan.num_classes, weights, active)
        self.done = np.zeros(plan.layout.n_blocks_yx, dtype=bool)
        self.regions = list(plan.layout.blocks())
        self.region_blocks = [plan.layout.region_blocks(*r) for r in self.regions]
        self.next_region = resume.regions_done  # next region to submit
        counts = plan.block_tile_counts
        # Regions with nothing to label: glass only, or outside the ROI (the canvas margin).
        self.region_has_tiles = [
            any(counts[b] > 0 for b in deps) and _non_empty(plan.region_owned_box(region))
            for region, deps in zip(self.regions, self.region_blocks, strict=True)
        ]
        self.pool = _label_pool(label_workers)
        self.max_in_flight = 2 * label_workers
        self.in_flight: deque[tuple[tuple[int, int], Future | RegionNuclei | None]] = deque()

    def add_tiles(self, block: tuple[int, int], tiles: list, probs: np.ndarray) -> None:
        with _timed(self.stats, "stitch_busy_s"):
            self.stitcher.add_tiles(block, tiles, probs)

    def add_pixels(self, block: tuple[int, int], image: np.ndarray, origin_yx: tuple[int, int]):
        """Keeps the block's core pixels (from its read ``image``, whose top-left is canvas
        ``origin_yx``) for the stain measurements of the regions that see them."""
        with _timed(self.stats, "stitch_busy_s"):
            y0, y1, x0, x1 = self.layout.block_core(*block)
            oy, ox = origin_yx
            y0, x0 = max(y0, oy), max(x0, ox)
            y1, x1 = min(y1, oy + image.shape[0]), min(x1, ox + image.shape[1])
            if y1 > y0 and x1 > x0:
                crop = image[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
                self.canvas.write_pixels((y0, y1, x0, x1), crop)

    def finish_block(self, block: tuple[int, int]) -> None:
        with _timed(self.stats, "stitch_busy_s"):
            cells = self.stitcher.finish_block(block)
            self.canvas.write_cells([(cell.box, cell.probs) for cell in cells])
        self.done[block] = True
        self._submit_ready_regions()

    def finish(self) -> None:
        self._submit_ready_regions()
        while self.in_flight:
            self._commit_next()
        if self.regions_done != len(self.regions):
            raise RuntimeError(
                f"{self.regions_done} of {len(self.regions)} regions labelled at the end"
            )
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _submit_ready_regions(self) -> None:
        while self.next_region < len(self.regions):
            region = self.regions[self.next_region]
            if not all(self.done[b] for b in self.region_blocks[self.next_region]):
                break
            self.in_flight.append((region, self._submit(region, self.next_region)))
            self.next_region += 1
            while len(self.in_flight) > self.max_in_flight:
                self._commit_next()
        # Commit whatever already finished, without waiting.
        while self.in_flight and _is_done(self.in_flight[0][1]):
            self._commit_next()

    def _submit(self, region: tuple[int, int], index: int) -> Future | RegionNuclei | None:
        """Starts labelling a region: a future, the result itself when inline, None on glass."""
        if not self.region_has_tiles[index]:
            return None
        with _timed(self.stats, "label_busy_s"):
            return self._label(region)

    def _label(self, region: tuple[int, int]) -> Future | RegionNuclei:
        plan, layout = self.plan, self.layout
        window = layout.region_window(*region)
        job = RegionJob(
            window=window,
            core=plan.region_owned_box(region),
            canvas_hw=(layout.height_px, layout.width_px),
            model_mpp=plan.model_mpp,
            params=plan.postprocess,
            scale=plan.canvas.scale,
            offset_xy=plan.qupath_offset_xy,
            slide_mpp=plan.slide_mpp,
            keep_labels=self.keep_labels,
            cell_expansion_px=plan.cell_expansion_px,
            rejection=plan.rejection,
        )
        probs = self.canvas.read_float(window)  # lossless: never the uint8 viewing copy
        rgb = self.canvas.read_pixels(window)
        if self.pool is None:
            return extract_region(probs, job, rgb)
        return self.pool.submit(extract_region, probs, job, rgb)

    def _commit_next(self) -> None:
        """Gives the oldest region's nuclei their ids and hands them to the sink, in order."""
        region, pending = self.in_flight.popleft()
        with _timed(self.stats, "label_wait_s"):
            result = pending.result() if isinstance(pending, Future) else pending
        with _timed(self.stats, "commit_busy_s"):
            commit = self._region_commit(region, result)
            self.sink.commit_region(commit)
        # Only once the sink has it: a failed commit leaves the region to a resumed run.
        self.regions_done += 1
        self.next_id = commit.next_id
        self.counters = commit.counters
        if self.on_region is not None:
            self.on_region(self.regions_done, len(self.regions))

    def _region_commit(self, region: tuple[int, int], result: RegionNuclei | None) -> RegionCommit:
        """The region's nuclei with global ids (in label order), its global label map and the
        running counters after it."""
        first_id = self.next_id
        records: list[NucleusRecord] = []
        labels = None
        dropped = rejected = 0
        if result is not None:
            for offset, (local, polygon, measurements) in enumerate(result.nuclei):
                label_id = first_id + offset
                values = {**measurements, LABEL_KEY: label_id}
                records.append(NucleusRecord(label_id, polygon, values, result.cells.get(local)))
            if result.labels is not None:
                lut = np.zeros(int(result.labels.max()) + 1, dtype=np.uint32)
                for record, (local, _, _) in zip(records, result.nuclei, strict=True):
                    lut[local] = record.id
                labels = lut[result.labels]
            dropped, rejected = result.dropped, result.rejected
        counters = dict(self.counters)
        counters["dropped"] = counters.get("dropped", 0) + dropped
        if rejected:
            counters["rejected"] = counters.get("rejected", 0) + rejected
        counters["seconds"] = self.base_seconds + time.monotonic() - self.started
        return RegionCommit(
            index=self.regions_done,
            window=self.layout.region_window(*region),
            first_id=first_id,
            nuclei=records,
            labels=labels,
            next_id=first_id + len(records),
            counters=counters,
        )


def _non_empty(box: Box) -> bool:
    return box[0] < box[1] and box[2] < box[3]


def _is_done(pending: Any) -> bool:
    return not isinstance(pending, Future) or pending.done()


def default_label_workers() -> int:
    """Labelling processes: none on small machines (a thread does it), else up to 8."""
    return max(0, min(8, ((os.cpu_count() or 2) - 2) // 2))


def _label_pool(workers: int) -> ProcessPoolExecutor | None:
    if workers <= 0:
        return None
    # spawn (the parent holds torch and threads, which must not be forked), started from the
    # calling (main) thread so the workers end with this process (cellseg.workers).
    return start_pool(workers)


class _PostThread:
    """Runs a :class:`_PostProcessor` in a thread behind a bounded queue.

    Errors raised in the thread are re-raised in the caller at the next :meth:`put` or at
    :meth:`close`; :meth:`abort` stops the thread without finishing.
    """

    def __init__(self, post: _PostProcessor, maxsize: int) -> None:
        self.post = post
        self.stats = post.stats
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cellseg-postprocess", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with _timed(self.stats, "post_wait_s"):
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
        """Queues a message; the time blocked on a full queue counts as ``queue_wait_s``."""
        with _timed(self.stats, "queue_wait_s"):
            self._put(message)

    def _put(self, message: tuple | None) -> None:
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


@dataclass(frozen=True)
class BlockJob:
    """One block's work: its tissue tiles and the single read that covers them.

    Attributes:
        block: ``(by, bx)``.
        tiles: global tile indices ``(ty, tx)`` to run, in raster order (may be empty: glass).
        origin_yx: canvas position of the read image's top-left pixel.
        request: the read (None when there are no tiles).
    """

    block: tuple[int, int]
    tiles: list[tuple[int, int]]
    origin_yx: tuple[int, int]
    request: ReadRequest | None


def block_jobs(plan: SlidePlan, active: np.ndarray | None = None) -> list[BlockJob]:
    """The blocks to process in raster order (``active`` ones only), with their reads.

    Benchmarks use it to time reading and the model on exactly the pipeline's reads and tiles.
    """
    jobs = []
    for block in plan.layout.blocks():
        if active is not None and not active[block]:
            continue
        ty0, ty1, tx0, tx1 = plan.layout.block_tiles(*block)
        ys, xs = np.nonzero(plan.tile_mask[ty0:ty1, tx0:tx1])
        tiles = [(ty0 + int(y), tx0 + int(x)) for y, x in zip(ys, xs, strict=True)]
        if not tiles:
            jobs.append(BlockJob(block, [], (0, 0), None))
            continue
        y0, y1, x0, x1 = plan.layout.tiles_box(
            min(ys) + ty0, max(ys) + ty0 + 1, min(xs) + tx0, max(xs) + tx0 + 1
        )
        request = ReadRequest(plan.canvas.level0_xy(x0, y0), (x1 - x0, y1 - y0), plan.model_mpp)
        jobs.append(BlockJob(block, tiles, (y0, x0), request))
    return jobs


def cut_tiles(
    image: np.ndarray | None,
    tiles: list[tuple[int, int]],
    origin_yx: tuple[int, int],
    tile_px: int,
    stride_px: int,
) -> Iterator[np.ndarray]:
    """The ``tile_px×tile_px×3`` views of a block image (top-left at canvas ``origin_yx``) for
    the global tile indices ``tiles``, in order. Benchmarks use it to cut the pipeline's tiles."""
    for ty, tx in tiles:
        y, x = ty * stride_px - origin_yx[0], tx * stride_px - origin_yx[1]
        yield image[y : y + tile_px, x : x + tile_px]


class _Batcher:
    """Collects tiles across blocks into batches, runs the model, forwards results in order.

    ``finish_block`` messages are sent only after all of a block's tiles and all earlier blocks,
    so the post-processor sees blocks complete in raster order whatever the batch boundaries.
    """

    def __init__(
        self,
        predictor: TilePredictor,
        layout: TileLayout,
        batch_size: int,
        post: _PostThread,
        stats: PipelineStats,
    ) -> None:
        self.predictor = predictor
        self.stats = stats
        self.tile_px = layout.tile_px
        self.stride_px = layout.stride_px
        self.batch_size = batch_size
        self.post = post
        self.tiles: list[tuple[tuple[int, int], tuple[int, int], np.ndarray]] = []
        self.remaining: deque[list] = deque()  # [block, its tiles not yet predicted]
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
        cut = cut_tiles(image, tiles, origin_yx, self.tile_px, self.stride_px)
        for tile, pixels in zip(tiles, cut, strict=True):
            self.tiles.append((block, tile, pixels))
            if len(self.tiles) == self.batch_size:
                self.flush()
        self._send_done()

    def flush(self) -> None:
        """Runs the model on the queued tiles."""
        if not self.tiles:
            return
        batch, self.tiles = self.tiles, []
        with _timed(self.stats, "batch_busy_s"):
            stacked = np.stack([tile for _, _, tile in batch])
        with _timed(self.stats, "model_busy_s"):
            probs = self.predictor(stacked)
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
        self.stats.tiles_run += len(batch)
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
            for block in layout.region_blocks(*region):
                active[block] = True
    return active


@dataclass(frozen=True)
class PipelineSettings:
    """Throughput knobs of :func:`run_pipeline` (they do not change the results).

    Attributes:
        batch_size: tiles per model call.
        workers: reader processes (0: one reader thread).
        label_workers: labelling processes (0: the post-processing thread labels).
        mpp_override: the ``--mpp`` the reader processes must open the slide with.
    """

    batch_size: int = 16
    workers: int = 1
    label_workers: int = 0
    mpp_override: float | None = None


def prefetch_blocks(layout: TileLayout, settings: PipelineSettings) -> int:
    """Block reads to keep in flight: two per worker, and at least two batches of tiles.

    Enough that no worker idles while the model consumes blocks, and that a large (GPU) batch
    never waits for reads; memory is one block image per read.
    """
    tiles_per_block = layout.tiles_per_block**2
    return max(
        2 * max(settings.workers, 1) + 1, math.ceil(2 * settings.batch_size / tiles_per_block)
    )


def run_pipeline(
    plan: SlidePlan,
    predictor: TilePredictor,
    settings: PipelineSettings,
    canvas: WorkingCanvas,
    sink: RegionSink,
    resume: ResumePoint | None = None,
    *,
    reader: RegionReader | None = None,
    progress: bool = False,
    on_region: Callable[[int, int], None] | None = None,
) -> PipelineStats:
    """Reads, predicts and post-processes every block that the unfinished regions need.

    On return every region after ``resume``'s prefix has been handed to ``sink``. On an error
    the stages are stopped; what the sink committed stays committed.

    Args:
        canvas: the float32 working canvas (the slide's whole canvas) that regions are
            labelled from.
        sink: receives every region's nuclei, in raster order (:mod:`cellseg.sinks`).
        resume: the regions an interrupted run committed, its next id and counters; None:
            a fresh run.
        reader: a read-ahead of this slide (``settings.workers`` workers, opened with
            ``settings.mpp_override``) that the caller started early and closes; None: one is
            opened and closed here.

    Returns:
        The network tiles run and where the time went.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    stats = PipelineStats()
    layout = plan.layout
    resume = resume or ResumePoint()
    active = _active_blocks(layout, resume.regions_done)
    jobs = block_jobs(plan, active)
    weights = plan.blend_weights()
    post = _PostProcessor(
        plan, canvas, sink, resume, active, weights, settings.label_workers, on_region, stats
    )
    thread = _PostThread(post, maxsize=QUEUE_MESSAGES)
    batcher = _Batcher(predictor, layout, settings.batch_size, thread, stats)
    requests = [(job.block, job.request) for job in jobs if job.tiles]
    bar = tqdm(
        total=sum(len(job.tiles) for job in jobs),
        desc=plan.slide_path.name,
        unit="tile",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    batcher.on_batch = bar.update
    finished = False
    try:
        with contextlib.ExitStack() as stack:
            if reader is None:
                source = SlideSource(plan.slide_path, plan.backend, settings.mpp_override)
                reader = stack.enter_context(RegionReader(source, settings.workers))
            images = reader.read_ahead(requests, prefetch_blocks(layout, settings))
            for job in jobs:
                image = None
                if job.tiles:
                    with _timed(stats, "reader_wait_s"):
                        key, image = next(images)
                    if key != job.block:
                        raise RuntimeError(f"read-ahead out of order: {key} != {job.block}")
                    thread.put(("add_pixels", job.block, image, job.origin_yx))
                batcher.add_block(job.block, job.tiles, image, job.origin_yx)
            batcher.flush()
            last_batch_done = time.perf_counter()
        thread.close()
        stats.tail_s = time.perf_counter() - last_batch_done
        finished = True
    finally:
        if not finished:
            thread.abort()
            post.close()
        bar.close()
    stats.wall_s = time.perf_counter() - started
    return stats
