"""Whole-slide prediction of one slide: the orchestration of planning, runner and sinks.

:func:`predict_slide` is the library entry point behind ``cellseg predict`` (and the
benchmarks). It locks the slide's outputs, skips a run whose outputs and provenance already
match, opens the slide and plans it (:func:`plan_slide`), opens or resumes the slide's journal
and its sinks (:mod:`cellseg.sinks`), runs the concurrent stages of :mod:`cellseg.pipeline` into
them, writes the summary and finally publishes every output under its name: GeoJSON for QuPath,
OME-Zarr (probability and label pyramids), overlay picture, JSON summary.

A run that is killed resumes from its journal (:mod:`cellseg.journal`): regions are committed in
raster order, so the completed ones are a prefix, and only the blocks that unfinished regions
depend on are read and run again. Outputs appear under their final names only when complete;
an expected failure (unreadable slide, unknown mpp) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
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

from . import __version__
from .atomic import staged_name
from .errors import CellsegError, OutputError, SlideError
from .journal import Journal, _test_hook, remove_work_dir
from .outputs import (
    SlideLock,
    check_writable,
    file_identity,
    os_error_message,
    output_conflicts,
    provenance_differences,
    read_json,
    write_json_atomic,
)
from .overlay import overlay_format
from .pipeline import (
    PipelineSettings,
    PipelineStats,
    default_label_workers,
    default_workers,
    run_pipeline,
)
from .planning import (  # re-exported: the library's entry points live here
    TILING_SCHEME,
    PredictOptions,
    SlidePlan,
    TilePredictor,
    model_identity,
    plan_slide,
    postprocess_for,
    processing_area,
    resume_fingerprint,
)
from .readahead import RegionReader, SlideSource
from .rejection import rejection_of
from .sinks import (
    ZARR_FORMAT_VERSION,
    GeoJSONSink,
    JournalSink,
    OverlaySink,
    RegionFanOut,
    ZarrSink,
)
from .slide import Slide, open_slide

log = logging.getLogger(__name__)

__all__ = [
    "PredictOptions",
    "SlideOutputs",
    "SlidePlan",
    "TilePredictor",
    "plan_slide",
    "predict_slide",
    "processing_area",
    "run_provenance",
]

# Recorded in the provenance: outputs of an older layout (flat Zarr v3, ``Area µm^2``
# measurements, random feature ids) are not "the same run", so they are not skipped.
OUTPUT_FORMAT = ZARR_FORMAT_VERSION


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
    def in_dir(cls, out_dir: Path, slide_path: Path, *, overlay: bool = False) -> SlideOutputs:
        """``out_dir/<stem>.geojson``, ``<stem>.zarr`` and ``<stem>.json`` for a batch run, and
        ``<stem>.png`` with ``overlay``."""
        stem = Path(slide_path).stem
        out_dir = Path(out_dir)
        return cls(
            geojson=out_dir / f"{stem}.geojson",
            zarr=out_dir / f"{stem}.zarr",
            overlay=out_dir / f"{stem}.png" if overlay else None,
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
            return staged_name(self.zarr)
        return self.work_dir / "work.zarr"

    def is_resumable(self) -> bool:
        return (self.work_dir / "progress.json").is_file()

    def _beside_primary(self, suffix: str) -> Path:
        primary = self.paths()[0]
        return primary.with_name(primary.name + suffix)

    @property
    def lock_path(self) -> Path:
        """The slide's lock file (:class:`cellseg.outputs.SlideLock`), beside the first output."""
        return self._beside_primary(".cellseg-lock")

    @property
    def provenance_path(self) -> Path:
        """What the outputs were made from (:func:`run_provenance`), beside the first output."""
        return self._beside_primary(".cellseg-provenance.json")

    def bookkeeping_paths(self) -> list[Path]:
        """The files cellseg keeps beside the outputs (no output may use these names)."""
        return [self.provenance_path, self.lock_path, self.work_dir]

    def staged(self, path: Path) -> Path:
        """Where ``path`` is written before all outputs are renamed together."""
        if path == self.zarr:
            return self.zarr_partial
        return staged_name(path)

    def publish_order(self) -> list[Path]:
        """Final paths in renaming order; the provenance comes last (it vouches for the rest)."""
        return [
            *(p for p in (self.geojson, self.overlay, self.summary, self.zarr) if p),
            self.provenance_path,
        ]


# ------------------------------------------------------------------------ provenance, summary


def _model_rejection_entry(predictor: TilePredictor) -> dict[str, Any]:
    rejection = rejection_of(getattr(getattr(predictor, "bundle", None), "meta", None))
    return {} if rejection is None else {"rejection": rejection.to_dict()}


@functools.cache  # installed versions do not change within a process; evaluate asks per tile
def _package_versions() -> tuple[tuple[str, str], ...]:
    versions = []
    for package in ("numpy", "zarr", "shapely", "scikit-image", "openslide-python", "tiffslide"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append((package, metadata.version(package)))
    return tuple(versions)


def _versions() -> dict[str, str]:
    versions = {"cellseg": __version__, "python": platform.python_version()}
    versions.update(_package_versions())
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
        **(
            {"nuclei_rejected": int(journal.counters.get("rejected", 0))}
            if plan.rejection is not None
            else {}
        ),
        "seconds": round(seconds, 3),
        "seconds_this_session": round(stats.session_seconds, 3),
        "tiles_per_second": round(stats.pipeline.tiles_run / stats.session_seconds, 2)
        if stats.session_seconds > 0
        else None,
        "seconds_per_mm2": round(seconds / area, 3) if area else None,
        "resumed": journal.resumed,
        "warnings": _result_warnings(plan, options, journal.next_id - 1),
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
            "precision": plan.precision,
            "device": str(getattr(predictor, "device", "unknown")),
            "postprocess": plan.postprocess.to_dict(),
            **plan.rejection_entry(),
        },
        "versions": _versions(),
        "outputs": {k: str(v) for k, v in asdict(outputs).items() if v is not None},
    }


def _open_zarr(
    plan: SlidePlan, options: PredictOptions, outputs: SlideOutputs, journal: Journal
) -> ZarrSink:
    """The partial Zarr group: reopened when resuming, else created (restarting the journal
    if its group went missing: the journal's prefix must be in the labels)."""
    output = outputs.zarr is not None  # else the group is only working state
    if journal.resumed:
        sink = ZarrSink.reopen(outputs.zarr_partial, plan, output=output)
        if sink is not None:
            return sink
        log.warning("%s: partial Zarr missing; starting this slide afresh", outputs.zarr_partial)
        journal.restart()
    chunk_px = options.chunk_px or plan.layout.block_px
    return ZarrSink.create(outputs.zarr_partial, plan, output=output, chunk_px=chunk_px)


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
    """Runs the unfinished regions into the sinks and stages every output (partial names)."""
    zarr = _open_zarr(plan, options, outputs, journal)
    stats = _RunStats(base_seconds=float(journal.counters.get("seconds", 0.0)))
    journal_sink = JournalSink(journal)
    with contextlib.ExitStack() as stack:
        sinks: list[Any] = [zarr]  # labels first, then GeoJSON, the journal last
        if outputs.geojson is not None:
            geojson = GeoJSONSink(outputs.geojson, options.object_type, plan.slide_sha256)
            stack.enter_context(geojson.writer)
            geojson.replay(journal.nuclei())  # what an interrupted run committed
            sinks.append(geojson)
        stats.pipeline = run_pipeline(
            plan,
            predictor,
            pipeline_settings(options),
            zarr.store,
            RegionFanOut(sinks, journal_sink),
            journal_sink.resume_point(),
            reader=reader,
            progress=progress,
            on_region=on_region,
        )
    zarr.stage(journal.next_id - 1)
    if outputs.overlay is not None:
        overlay = OverlaySink(slide, plan.area_xywh, outputs.overlay, max_px=options.overlay_max_px)
        overlay.stage(journal.nuclei())
    stats.session_seconds = time.monotonic() - started
    summary = _summary(plan, options, outputs, journal, stats, predictor)
    for warning in summary["warnings"]:
        log.warning("%s: %s", plan.slide_path, warning)
    if outputs.summary is not None:
        write_json_atomic(outputs.summary, summary, partial=outputs.staged(outputs.summary))
    return summary


def _result_warnings(plan: SlidePlan, options: PredictOptions, nuclei: int) -> list[str]:
    """Why a finished run may not be what the user expected (empty results are never silent)."""
    if not plan.tile_mask.any():
        return [
            "no tissue found, so no tile was run and the outputs are empty "
            "(--no-tissue-mask runs every tile)"
        ]
    if nuclei == 0:
        return ["no nuclei found"]
    return []


def run_provenance(
    slide_path: Path, predictor: TilePredictor, options: PredictOptions, outputs: SlideOutputs
) -> dict[str, Any]:
    """What a slide's outputs are made from: input file, model and every option that changes
    them (issue 12 item 6). Saved beside the outputs; a later run skips the slide only when its
    own provenance is the same (:func:`cellseg.outputs.provenance_differences`)."""
    name, sha = model_identity(predictor, options)
    return {
        # Size and sampled content: cheap enough to check before every skip. The full SHA-256
        # that seeds the feature ids (``SlidePlan.slide_sha256``) is another hash, computed
        # only when the slide is actually predicted (a skip must not read a multi-GB slide).
        "input": file_identity(slide_path),
        "format": OUTPUT_FORMAT,
        "model": [sha or name, float(predictor.mpp), int(predictor.num_classes)],
        "mpp": options.mpp,
        "roi": list(options.roi_xywh) if options.roi_xywh else None,
        "tta": bool(getattr(predictor, "tta", False)),
        "tissue_mask": options.tissue_mask,
        "object_type": options.object_type,
        "cell_expansion_um": options.cell_expansion_um,
        "precision": _precision_of(predictor, options),
        "postprocess": postprocess_for(predictor, options).to_dict(),
        **_model_rejection_entry(predictor),
        "tiling": [TILING_SCHEME, options.blending, list(options.grid_offset_px)],
        "geometry": [
            options.backend,
            options.tissue_mpp,
            options.overlap_px,
            options.region_px,
            options.halo_um,
            options.chunk_px,
            options.overlay_max_px,
        ],
        # Relative to the first output's folder, so a moved results folder still matches.
        "outputs": sorted(os.path.relpath(p, outputs.paths()[0].parent) for p in outputs.paths()),
    }


def _precision_of(predictor: TilePredictor, options: PredictOptions) -> str | None:
    """The model's numeric precision: an explicit option or attribute, else what
    ``cellseg.inference.Predictor`` does (autocast to ``amp_dtype`` on CUDA, float32 otherwise);
    None for predictors that say nothing (test oracles)."""
    value = getattr(options, "precision", None) or getattr(predictor, "precision", None)
    if value is None and hasattr(predictor, "amp"):
        amp_dtype = getattr(predictor, "amp_dtype", None)
        value = str(amp_dtype).replace("torch.", "") if predictor.amp and amp_dtype else "float32"
    return None if value is None else str(value)


def _model_inputs(predictor: TilePredictor) -> list[Path]:
    path = getattr(getattr(predictor, "bundle", None), "path", None)
    return [Path(path)] if path else []


def _publish(outputs: SlideOutputs) -> None:
    """Renames every staged output to its final name (replacing older ones: --overwrite).

    Idempotent: a run killed half way is finished by calling it again (staged files that are
    gone were already renamed).
    """
    for final in outputs.publish_order():
        staged = outputs.staged(final)
        if not staged.exists():
            continue
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(staged, final)
        _test_hook(f"published:{final.name}")


def _discard_staged(outputs: SlideOutputs) -> None:
    for final in outputs.publish_order():
        staged = outputs.staged(final)
        if staged.is_dir():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            staged.unlink(missing_ok=True)


def _finish_interrupted(outputs: SlideOutputs) -> bool:
    """Completes the renaming of a run killed while publishing (True when there was one), and
    removes a left-over work folder that has no journal in it."""
    work_dir = outputs.work_dir
    if Journal.publishing_summary(work_dir) is not None:
        log.info("%s: finishing the renaming of an interrupted run", work_dir)
        _publish(outputs)
        remove_work_dir(work_dir)
        return True
    if work_dir.is_dir() and not outputs.is_resumable():
        log.info("%s: removing a left-over work folder", work_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
    return False


def _check_existing(
    outputs: SlideOutputs, options: PredictOptions, provenance: dict[str, Any]
) -> dict[str, Any] | None:
    """The recorded summary (``skipped``) when the outputs exist and match ``provenance``;
    None when there is work to do; OutputError when outputs exist but do not match."""
    existing = outputs.existing()
    if not existing or options.overwrite or outputs.is_resumable():
        return None
    saved = read_json(outputs.provenance_path) or {}
    differences = provenance_differences(saved.get("provenance"), provenance)
    if not differences and len(existing) == len(outputs.paths()) and "summary" in saved:
        return {**saved["summary"], "skipped": True}
    if not differences:
        missing = [str(p) for p in outputs.paths() if p not in existing]
        differences = [f"{', '.join(missing)} missing"]
    raise OutputError(
        f"{existing[0]}: already exists, from a different run ({'; '.join(differences)}); "
        "pass --overwrite to replace it"
    )


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
    ``<first output>.cellseg-work`` folder). Outputs are written under staged names
    (``<name>.partial``) and renamed together at the end, so every final name holds a complete
    file; a run killed while renaming is finished by the next call. The slide is locked
    (``<first output>.cellseg-lock``) for the whole run, so two processes never work on it.

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
        ``warnings`` (e.g. no tissue found), model and versions. When the outputs already exist
        and their recorded provenance (:func:`run_provenance`) matches, nothing is done and the
        recorded summary is returned with ``skipped: True``.

    Raises:
        OutputError: two outputs share a path, an output is an input, a folder cannot be
            written (checked before the slide is read), outputs from a different run exist
            (without ``overwrite``), or the disk filled up during the run (the partial state is
            kept: the same call resumes).
        BusyError: another process holds the slide's lock.
        SlideError: the slide cannot be opened or read, or its mpp is unknown. Nothing is left
            under the output names, and the partial state is removed.
        Other exceptions (including KeyboardInterrupt) keep the partial state so that the next
        run resumes.
    """
    options = options or PredictOptions()
    slide_path = Path(slide_path)
    if not outputs.paths():
        raise ValueError("SlideOutputs: no output requested")
    if outputs.overlay is not None:
        overlay_format(outputs.overlay)
    conflict = output_conflicts(
        [*outputs.paths(), *outputs.bookkeeping_paths()], [slide_path, *_model_inputs(predictor)]
    )
    if conflict is not None:
        raise OutputError(conflict)
    check_writable([*outputs.paths(), outputs.lock_path])
    if not slide_path.is_file():
        kind = "is a folder, not a slide file" if slide_path.is_dir() else "no such file"
        raise SlideError(f"{slide_path}: {kind}")
    try:
        with SlideLock(outputs.lock_path, label=str(slide_path)):
            return _predict_locked(slide_path, predictor, outputs, options, progress, on_region)
    except OSError as exc:
        message = os_error_message(exc, outputs.paths()[0].parent, outputs.work_dir)
        if message is None:
            raise
        raise OutputError(message) from exc


def _predict_locked(
    slide_path: Path,
    predictor: TilePredictor,
    outputs: SlideOutputs,
    options: PredictOptions,
    progress: bool,
    on_region: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    finished = _finish_interrupted(outputs)
    provenance = run_provenance(slide_path, predictor, options, outputs)
    # A finished interrupted run counts only if it was this same run (else: refused or redone).
    recorded = _check_existing(outputs, options, provenance)
    if recorded is not None:
        if finished:  # this call completed the run rather than skipping it
            recorded.pop("skipped")
            recorded["resumed"] = True
        return recorded
    started = time.monotonic()

    def region_done(done: int, total: int) -> None:
        _test_hook(f"region:{done}")
        if on_region is not None:
            on_region(done, total)

    with contextlib.ExitStack() as stack:
        slide = stack.enter_context(open_slide(slide_path, options.backend, options.mpp))
        source = SlideSource(Path(slide.path), slide.backend, options.mpp)
        reader = stack.enter_context(RegionReader(source, pipeline_settings(options).workers))
        reader.start()  # the workers start up (seconds) while the slide is planned
        plan = plan_slide(slide, predictor, options)
        _log_plan(slide, plan)
        log.info(
            "%s: model %s (sha256 %s), tta %s, precision %s",
            slide.path,
            plan.model_name,
            (plan.model_sha256 or "unknown")[:12],
            plan.tta,
            _precision_of(predictor, options) or "unknown",
        )
        for path in outputs.paths():
            path.parent.mkdir(parents=True, exist_ok=True)
        fingerprint = resume_fingerprint(
            plan, options, zarr_path=outputs.zarr_partial, with_labels=outputs.zarr is not None
        )
        journal = Journal.open(outputs.work_dir, fingerprint)
        stack.callback(journal.close)  # also when interrupted: the file stays for resuming
        try:
            summary = _predict_planned(
                slide,
                plan,
                predictor,
                options,
                outputs,
                journal,
                progress,
                region_done,
                started,
                reader,
            )
        except CellsegError:
            # A data error will fail again: leave nothing behind.
            journal.remove()
            shutil.rmtree(outputs.zarr_partial, ignore_errors=True)
            _discard_staged(outputs)
            raise
        write_json_atomic(
            outputs.provenance_path,
            {"provenance": provenance, "summary": summary},
            partial=outputs.staged(outputs.provenance_path),
        )
        _test_hook("staged")
        journal.mark_publishing(summary)
        _publish(outputs)
        journal.remove()
    return summary


def _log_plan(slide: Slide, plan: SlidePlan) -> None:
    level = slide.best_level(plan.model_mpp)
    log.info(
        "%s: %.4g µm/px from %s; reading pyramid level %d (downsample %.3g) for %.3g µm/px",
        slide.path,
        slide.mpp,
        slide.mpp_source,
        level,
        slide.level_downsamples[level],
        plan.model_mpp,
    )
    log.info(
        "%s: %d of %d tiles on tissue", slide.path, int(plan.tile_mask.sum()), plan.tile_mask.size
    )
