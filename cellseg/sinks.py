"""The outputs of whole-slide prediction: sinks that take the runner's results and own the writes.

The runner (:mod:`cellseg.pipeline`) hands every region, in raster order, to one
:class:`~cellseg.pipeline.RegionSink` as a :class:`~cellseg.records.RegionCommit`;
:class:`RegionFanOut` passes it on to the output sinks in a fixed order and to the journal last:

* :class:`ZarrSink`: the region's global label map into ``labels/nuclei`` (its
  :class:`~cellseg.store.PredictionStore` is also the runner's float32 working canvas);
* :class:`GeoJSONSink`: one Feature per nucleus (ids from :func:`feature_key`);
* :class:`JournalSink`: the region's nuclei into the resume journal, which commits the region.

The journal is always last, so a region it records is already in every output: a run killed at
any point resumes after the journal's prefix and rewrites at most the one region that was in
progress (label writes and GeoJSON replays are idempotent for it). :class:`OverlaySink` draws
once, at the end, from the journal's nuclei.

Every sink stages its file under the name ``predict`` publishes from (``<name>.partial``, through
:mod:`cellseg.atomic`; the Zarr as a folder): renaming the staged outputs together is
:mod:`cellseg.predict`'s multi-file publish.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .geojson import GeoJSONWriter, feature_namespace
from .journal import Journal
from .overlay import draw_overlay
from .pipeline import RegionSink
from .planning import SlidePlan
from .records import NucleusRecord, RegionCommit, ResumePoint
from .slide import Slide
from .store import PredictionStore

ZARR_FORMAT_VERSION = 2  # 2: OME-NGFF 0.4 layout (Zarr v2); 1 was a flat Zarr v3 group

BLENDING_NAMES = {
    "centre": "centre-weighted mean (cellseg.tiling.centre_weights)",
    "linear": "taper-weighted mean (cellseg.tiling.blend_weights)",
}


class RegionFanOut:
    """Hands each region to the output sinks in their order, then to the journal.

    The journal gets a region only after every output has written it: that order is what keeps
    resume exact (the journal's prefix is always in the outputs).
    """

    def __init__(self, outputs: Sequence[RegionSink], journal: JournalSink) -> None:
        self.outputs = list(outputs)
        self.journal = journal

    @property
    def wants_labels(self) -> bool:
        return any(sink.wants_labels for sink in self.outputs)

    def commit_region(self, region: RegionCommit) -> None:
        for sink in self.outputs:
            sink.commit_region(region)
        self.journal.commit_region(region)


# ------------------------------------------------------------------------------------- journal


class JournalSink:
    """Records each region's nuclei in the resume journal (:mod:`cellseg.journal`)."""

    wants_labels = False

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def resume_point(self) -> ResumePoint:
        """Where the runner starts: the journal's committed prefix, next id and counters."""
        journal = self.journal
        return ResumePoint(journal.regions_done, journal.next_id, dict(journal.counters))

    def commit_region(self, region: RegionCommit) -> None:
        # A gap or a repeat would make the journal's prefix lie about the outputs.
        if region.index != self.journal.regions_done:
            raise RuntimeError(
                f"region {region.index} committed after {self.journal.regions_done} regions"
            )
        self.journal.record_region(region.nuclei, region.next_id, region.counters)


# ------------------------------------------------------------------------------------- GeoJSON


def feature_key(record: NucleusRecord) -> str:
    """What identifies a nucleus within its slide's results, for its GeoJSON feature id: its
    label id and the integer centre of its outline's bounds (exact: vertices are on the 0.01
    grid), so that two runs of the same slide and options give the same ids, and nuclei of
    different runs only share an id when they are the same nucleus at the same place."""
    x0, y0, x1, y1 = record.polygon.bounds
    return f"{record.id}:{math.floor((x0 + x1) / 2)},{math.floor((y0 + y1) / 2)}"


def write_feature(writer: GeoJSONWriter, record: NucleusRecord) -> None:
    """Writes a committed nucleus (and its cell, if any) as one Feature."""
    writer.write(record.polygon, record.measurements, cell=record.cell, key=feature_key(record))


class GeoJSONSink:
    """The nuclei as a QuPath FeatureCollection, staged at ``<path>.partial``.

    Its :attr:`writer` is the context to enter (one lifecycle, the writer's own): a clean exit
    leaves the complete file staged for ``predict``'s publish, an exception deletes it. Feature
    ids are ``uuid5`` of the slide's content hash and :func:`feature_key` (random without a hash).
    """

    wants_labels = False

    def __init__(self, path: Path, object_type: str, slide_sha256: str | None) -> None:
        namespace = feature_namespace(slide_sha256) if slide_sha256 else None
        self.writer = GeoJSONWriter(path, object_type, id_namespace=namespace, publish=False)

    def replay(self, records: Iterable[NucleusRecord]) -> None:
        """Writes the nuclei an interrupted run committed (the journal's), before new regions."""
        for record in records:
            write_feature(self.writer, record)

    def commit_region(self, region: RegionCommit) -> None:
        for record in region.nuclei:
            write_feature(self.writer, record)


# ---------------------------------------------------------------------------------------- Zarr


class ZarrSink:
    """The OME-Zarr output: each region's ids into ``labels/nuclei/0``, the pyramids at
    :meth:`stage`.

    Its :attr:`store` is also the runner's working canvas (float32 probabilities, slide pixels;
    :class:`~cellseg.pipeline.WorkingCanvas`). Without a Zarr output the group is only that
    working state, kept in the work folder and removed with the journal (``output=False``).
    """

    def __init__(self, store: PredictionStore, *, output: bool) -> None:
        self.store = store
        self.output = output

    @classmethod
    def create(cls, path: Path, plan: SlidePlan, *, output: bool, chunk_px: int) -> ZarrSink:
        """A new group at ``path`` (replacing whatever was there)."""
        store = PredictionStore.create(
            path,
            (plan.layout.height_px, plan.layout.width_px),
            num_classes=plan.num_classes,
            with_labels=output,
            chunk_px=chunk_px,
            attrs=zarr_attributes(plan),
            output_box=plan.output_box,
        )
        return cls(store, output=output)

    @classmethod
    def reopen(cls, path: Path, plan: SlidePlan, *, output: bool) -> ZarrSink | None:
        """The partial group of an interrupted run; None when missing or of another shape."""
        canvas_hw = (plan.layout.height_px, plan.layout.width_px)
        store = PredictionStore.open(path, canvas_hw, plan.output_box)
        return None if store is None else cls(store, output=output)

    @property
    def wants_labels(self) -> bool:
        return self.store.has_labels

    def commit_region(self, region: RegionCommit) -> None:
        # Idempotent for a region an interrupted attempt had begun (ids >= first_id cleared).
        if region.labels is not None:
            self.store.write_labels(region.window, region.labels, region.first_id)

    def stage(self, nuclei: int) -> None:
        """Drops the working arrays and builds the pyramids (an output only)."""
        if self.output:
            self.store.finish({"nuclei": nuclei})


def zarr_attributes(plan: SlidePlan) -> dict[str, Any]:
    """Attributes of the output group: geometry, model, tiling and versions."""
    layout = plan.layout
    y0, _, x0, _ = plan.output_box  # the image covers the processed area (the ROI), not the tiles
    return {
        "cellseg_zarr_format": ZARR_FORMAT_VERSION,
        "cellseg_version": __version__,
        "slide": str(plan.slide_path),
        "slide_sha256": plan.slide_sha256,
        "mpp": plan.model_mpp,
        "slide_mpp": plan.slide_mpp,
        "mpp_source": plan.mpp_source,
        "scale_to_level0": plan.canvas.scale,
        "origin_xy_level0": list(plan.canvas.level0_xy(x0, y0)),
        "bounds_xy": list(plan.bounds_xy),
        "pixel_convention": (
            "array pixel (y, x) covers level-0 [origin + x·scale, origin + (x+1)·scale) "
            "horizontally (likewise y); QuPath coordinates = level-0 - bounds_xy[:2]"
        ),
        "model": {
            "name": plan.model_name,
            "sha256": plan.model_sha256,
            "tta": plan.tta,
            "precision": plan.precision,
        },
        "num_classes": plan.num_classes,
        "postprocess": plan.postprocess.to_dict(),
        **plan.rejection_entry(),
        "tiling": {
            "tile_px": layout.tile_px,
            "overlap_px": layout.overlap_px,
            "stride_px": layout.stride_px,
            "region_px": layout.block_px,
            "halo_px": layout.halo_px,
            "blending": BLENDING_NAMES[plan.blending],
            "grid": "tiles on the slide's grid: starts at bounds origin + (offset + k·stride)",
            "grid_offset_px": list(plan.grid_offset_xy),
            "ownership": "nucleus kept by the region containing its centroid",
        },
        "probability": "levels 0, 1, ...: nucleus probability (p_interior + p_boundary) x 255, "
        "uint8, OME-NGFF multiscales",
        "labels": "labels/nuclei/0, 1, ...: instance ids, uint32, 0 = background; "
        "= GeoJSON measurement 'Label'",
    }


# ------------------------------------------------------------------------------------- overlay


class OverlaySink:
    """The downsampled picture with the outlines, staged at ``<path>.partial``.

    Drawn once, when the run is complete, from the journal's nuclei (those of earlier sessions
    included) rather than region by region: the picture is read from the slide at its own
    resolution in one pass, and a resumed run draws the same picture.
    """

    def __init__(
        self, slide: Slide, area_xywh: tuple[int, int, int, int], path: Path, *, max_px: int
    ) -> None:
        self.slide = slide
        self.area_xywh = area_xywh
        self.path = path
        self.max_px = max_px

    def stage(self, nuclei: Iterable[NucleusRecord]) -> None:
        outlines = (record.polygon for record in nuclei)
        draw_overlay(
            self.slide, self.area_xywh, outlines, self.path, max_px=self.max_px, publish=False
        )
