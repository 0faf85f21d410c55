"""Whole-slide prediction of one slide: planning, outputs, resume, summary.

:func:`predict_slide` is the library entry point behind ``cellseg predict`` (and the
benchmarks). It opens the slide, decides the canvas at the model's mpp, the tiles and which of
them touch tissue (:func:`plan_slide`), opens or resumes the slide's journal and partial Zarr,
runs the concurrent stages of :mod:`cellseg.pipeline`, and finally moves every output to its
name: GeoJSON for QuPath, OME-Zarr (probability and label pyramids), overlay picture, JSON summary.

A run that is killed resumes from its journal (:mod:`cellseg.journal`): regions are committed in
raster order, so the completed ones are a prefix, and only the blocks that unfinished regions
depend on are read and run again. Outputs appear under their final names only when complete;
an expected failure (unreadable slide, unknown mpp) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import CellsegError, SlideError
from .geojson import OBJECT_TYPES, GeoJSONWriter, feature_namespace
from .instances import PostProcess
from .journal import Journal
from .overlay import draw_overlay, overlay_format
from .pipeline import (
    PipelineSettings,
    PipelineStats,
    SlidePlan,
    TilePredictor,
    default_label_workers,
    default_workers,
    run_pipeline,
    write_feature,
)
from .readahead import RegionReader, SlideSource
from .slide import Slide, open_slide
from .store import PredictionStore
from .tiling import Canvas, TileLayout, overlap_for_mpp, tiles_per_block_for, tissue_tiles
from .tissue import tissue_area_mm2, tissue_mask

log = logging.getLogger(__name__)

ZARR_FORMAT_VERSION = 2  # 2: OME-NGFF 0.4 layout (Zarr v2); 1 was a flat Zarr v3 group


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
        region_px: side of a read block / labelling region at the model's mpp, rounded to whole
            tile strides (1024: 960 px for 224 px tiles overlapping by 32 px). About 1000 px
            keeps the labelling windows, block images and blending sums small, so memory stays
            low while labelling runs beside the model; larger blocks mean fewer reads but more
            memory.
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
        if self.chunk_px is not None and self.chunk_px < 1:
            raise ValueError(f"chunk_px must be >= 1, got {self.chunk_px}")
        if self.roi_xywh is not None and (self.roi_xywh[2] <= 0 or self.roi_xywh[3] <= 0):
            raise ValueError(f"roi width and height must be > 0, got {self.roi_xywh}")


@dataclass(frozen=True)
class SlideOutputs:
    """Where one slide's results go; at least one must be set.

    Attributes:
        geojson: nuclei as a QuPath FeatureCollection (``.geojson`` or ``.geojson.gz``).
        zarr: OME-Zarr image (NGFF 0.4): probability pyramid, ``labels/nuclei`` pyramid.
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
        options.overlap_px
        if options.overlap_px is not None
        else overlap_for_mpp(model_mpp, tile_px)
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
        postprocess=_postprocess_for(predictor, options),
        model_name=name,
        model_sha256=sha,
        tta=bool(getattr(predictor, "tta", False)),
        slide_sha256=_file_sha256(Path(slide.path)) if Path(slide.path).is_file() else None,
        cell_expansion_px=cell_px,
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
        "model": [plan.model_name, plan.model_sha256, plan.model_mpp, plan.num_classes, plan.tta],
        "canvas": asdict(plan.canvas),
        "layout": asdict(plan.layout),
        # Region geometry: a journal of an older version with other region cores must not resume.
        "regions": "block cores shifted up and left by halo_px",
        "tissue": [options.tissue_mask, options.tissue_mpp],
        "postprocess": plan.postprocess.to_dict(),
        "cell_expansion_px": plan.cell_expansion_px,  # the journal holds the cells' outlines
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
        "slide_sha256": plan.slide_sha256,
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
        "model": {"name": plan.model_name, "sha256": plan.model_sha256, "tta": plan.tta},
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
        "probability": "levels 0, 1, ...: nucleus probability (p_interior + p_boundary) x 255, "
        "uint8, OME-NGFF multiscales",
        "labels": "labels/nuclei/0, 1, ...: instance ids, uint32, 0 = background; "
        "= GeoJSON measurement 'Label'",
    }


def _replace_dir(partial: Path, final: Path) -> None:
    """Moves a finished folder into place (replacing an older one: ``--overwrite``)."""
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(partial, final)


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def _versions() -> dict[str, str]:
    versions = {"cellseg": __version__, "python": platform.python_version()}
    for package in ("numpy", "zarr", "shapely", "scikit-image", "openslide-python", "tiffslide"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = torch.__version__
    return versions


def _peak_rss_mb(status_path: Path = Path("/proc/self/status")) -> float:
    """Peak resident memory of this process in MiB.

    Linux's ``VmHWM`` (proc(5)) belongs to the running program alone. ``getrusage``'s
    ``ru_maxrss`` is only the fallback (macOS, no ``/proc``): Linux carries it over from the
    parent across ``exec``, so a process started by a larger one would report the parent's peak.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in status_path.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    import resource

    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


@dataclass
class _RunStats:
    base_seconds: float = 0.0  # spent by earlier, interrupted sessions
    session_seconds: float = 0.0
    pipeline: PipelineStats = field(default_factory=PipelineStats)


def pipeline_settings(options: PredictOptions) -> PipelineSettings:
    """The throughput settings of ``options``, with the machine-dependent defaults filled in."""
    return PipelineSettings(
        batch_size=options.batch_size,
        workers=default_workers() if options.workers is None else options.workers,
        label_workers=(
            default_label_workers() if options.label_workers is None else options.label_workers
        ),
        mpp_override=options.mpp,
    )


def _summary(
    plan: SlidePlan,
    options: PredictOptions,
    outputs: SlideOutputs,
    journal: Journal,
    stats: _RunStats,
    predictor: TilePredictor,
) -> dict[str, Any]:
    tiles = int(plan.tile_mask.sum())
    seconds = stats.base_seconds + stats.session_seconds
    settings = pipeline_settings(options)
    area = plan.tissue_area_mm2 if plan.tissue_area_mm2 is not None else plan.processed_area_mm2()
    layout = plan.layout
    return {
        "slide": str(plan.slide_path),
        "slide_sha256": plan.slide_sha256,
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
        "tiles_run_this_session": stats.pipeline.tiles_run,
        "regions": len(list(layout.blocks())),
        "nuclei": journal.next_id - 1,
        "objects_dropped_larger_than_halo": int(journal.counters.get("dropped", 0)),
        "seconds": round(seconds, 3),
        "seconds_this_session": round(stats.session_seconds, 3),
        "tiles_per_second": round(stats.pipeline.tiles_run / stats.session_seconds, 2)
        if stats.session_seconds > 0
        else None,
        "seconds_per_mm2": round(seconds / area, 3) if area else None,
        "resumed": journal.resumed,
        "peak_rss_mb": _peak_rss_mb(),
        "stages": stats.pipeline.to_dict(),
        "tiling": {
            "tile_px": layout.tile_px,
            "overlap_px": layout.overlap_px,
            "region_px": layout.block_px,
            "halo_px": layout.halo_px,
            "batch_size": settings.batch_size,
            "workers": settings.workers,
            "label_workers": settings.label_workers,
        },
        "model": {
            "name": plan.model_name,
            "sha256": plan.model_sha256,
            "num_classes": plan.num_classes,
            "tta": plan.tta,
            "device": str(getattr(predictor, "device", "unknown")),
            "postprocess": plan.postprocess.to_dict(),
        },
        "versions": _versions(),
        "outputs": {k: str(v) for k, v in asdict(outputs).items() if v is not None},
    }


def _open_store(
    plan: SlidePlan, options: PredictOptions, outputs: SlideOutputs, journal: Journal
) -> PredictionStore:
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
        chunk_px=options.chunk_px or plan.layout.block_px,
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
    reader: RegionReader,
) -> dict[str, Any]:
    store = _open_store(plan, options, outputs, journal)
    stats = _RunStats(base_seconds=float(journal.counters.get("seconds", 0.0)))
    settings = pipeline_settings(options)
    with contextlib.ExitStack() as stack:
        writer = None
        if outputs.geojson is not None:
            namespace = feature_namespace(plan.slide_sha256) if plan.slide_sha256 else None
            writer = stack.enter_context(
                GeoJSONWriter(outputs.geojson, options.object_type, id_namespace=namespace)
            )
            for record in journal.nuclei():  # replay what an interrupted run committed
                write_feature(writer, record)
        stats.pipeline = run_pipeline(
            plan,
            predictor,
            settings,
            store,
            journal,
            writer,
            reader=reader,
            progress=progress,
            on_region=on_region,
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
        area, tiles, nuclei, seconds, peak resident memory (``peak_rss_mb``), where this
        session's pipeline time went (``stages``: :class:`cellseg.pipeline.PipelineStats`),
        model and versions.

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
    with contextlib.ExitStack() as stack:
        slide = stack.enter_context(open_slide(slide_path, options.backend, options.mpp))
        source = SlideSource(Path(slide.path), slide.backend, options.mpp)
        reader = stack.enter_context(RegionReader(source, pipeline_settings(options).workers))
        reader.start()  # the workers start up (seconds) while the slide is planned
        plan = plan_slide(slide, predictor, options)
        for path in outputs.paths():
            path.parent.mkdir(parents=True, exist_ok=True)
        journal = Journal.open(outputs.work_dir, _fingerprint(plan, options, outputs))
        try:
            summary = _predict_planned(
                slide,
                plan,
                predictor,
                options,
                outputs,
                journal,
                progress,
                on_region,
                started,
                reader,
            )
        except CellsegError:
            # A data error will fail again: leave nothing behind.
            journal.remove()
            shutil.rmtree(outputs.zarr_partial, ignore_errors=True)
            raise
        journal.remove()
    return summary
