"""Nucleus instances of one region: watershed on core + halo, seam ownership, polygons.

A region is labelled on its *window* (core grown by the halo) and keeps a nucleus only when the
nucleus's centroid lies in the region's *core* (:mod:`cellseg.tiling`). The centroid is computed
from integer pixel sums in canvas coordinates, so every window that sees a nucleus whole computes
the same centroid bit for bit and exactly one region owns it: a nucleus on a seam is neither
duplicated nor cut (StarDist ``big.py``; the failure reports in PEERS.md §5, "Seams").

An owned object that touches a window side lying inside the canvas is larger than the halo can
guarantee; it is dropped and counted (at the default 32 µm halo such an object is far larger
than any nucleus, e.g. a smear of low-confidence foreground).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from skimage.segmentation import expand_labels

from .geojson import GRID_PX, label_polygons, mask_polygon, snap_polygon
from .instances import PostProcess, label_instances
from .measurements import shape_measurements, stain_measurements
from .rejection import Rejection
from .tiling import Box

PROBABILITY_KEY = "Nucleus probability"
LABEL_KEY = "Label"  # the nucleus's id in the Zarr ``labels/nuclei`` image
AREA_RATIO_KEY = "Nucleus/Cell area ratio"  # QuPath's name
DECIMALS = 5  # measurements are rounded: smaller files, and no float noise in them
# Nucleus outlines are the sub-pixel contour of the nucleus probability at this level (equal
# odds), or at fg_threshold where that is lower, so an outline never shrinks inside the pixels
# the threshold chose. Chosen on the 6 MoNuSeg validation tiles (shipped model, fg_threshold 0.6,
# outlines rasterised onto the ground truth; benchmarks/README.md): contours at 0.6 / 0.55 / 0.5
# / 0.45 / 0.4 gave Dice 0.776 / 0.780 / 0.782 / 0.781 / 0.779, AJI 0.484 / 0.485 / 0.484 /
# 0.482 / 0.478, PQ 0.418 / 0.427 / 0.429 / 0.430 / 0.428 (pixel outlines: 0.776, 0.482, 0.419).
OUTLINE_LEVEL = 0.5


@dataclass
class OwnedNucleus:
    """A nucleus kept by a region.

    Attributes:
        local_label: its value in the window's label map.
        slices: ``(rows, cols)`` bounding box in window pixels.
        area_px: pixel count at the model's resolution.
        mean_probability: mean nucleus probability (``p1 + p2``) over its pixels.
    """

    local_label: int
    slices: tuple[slice, slice]
    area_px: int
    mean_probability: float


def owned_nuclei(
    labels: np.ndarray,
    nucleus_prob: np.ndarray,
    window: Box,
    core: Box,
    canvas_hw: tuple[int, int],
) -> tuple[list[OwnedNucleus], int]:
    """The nuclei of a labelled window that belong to its region.

    Args:
        labels: ``h×w`` int label map of the window (0 background).
        nucleus_prob: ``h×w`` float nucleus probability of the window.
        window: canvas box of the window.
        core: canvas box of the region's core (inside ``window``).
        canvas_hw: canvas (height, width), to tell window sides on the canvas edge (where a
            nucleus may legitimately be cut by the slide or ROI border) from inner sides.

    Returns:
        ``(owned, dropped)``: owned nuclei in label order, and the number of owned objects
        dropped because they touch an inner window side.
    """
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return [], 0
    count, row_sum, col_sum, prob_sum = _pixel_sums(labels, nucleus_prob, n)
    boxes = ndi.find_objects(labels)
    present = np.flatnonzero(count[1:]) + 1
    wy0, _, wx0, _ = window
    # Exact integer centroids in canvas pixels (integer floor division).
    cy = (wy0 * count[present] + row_sum[present]) // count[present]
    cx = (wx0 * count[present] + col_sum[present]) // count[present]
    mine = present[(core[0] <= cy) & (cy < core[1]) & (core[2] <= cx) & (cx < core[3])]
    owned: list[OwnedNucleus] = []
    dropped = 0
    for index in mine.tolist():
        slices = boxes[index - 1]
        if _touches_inner_side(slices, labels.shape, window, canvas_hw):
            dropped += 1
            continue
        mean = float(prob_sum[index] / count[index])
        owned.append(OwnedNucleus(index, slices, int(count[index]), mean))
    return owned, dropped


def _pixel_sums(
    labels: np.ndarray, nucleus_prob: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per label 0..n: pixel count, sums of row and column indices (int64), probability sum.

    Only foreground pixels are visited, in raster order; index sums are exact (float64 is exact
    below 2**53) and the probability sums add the same values in the same order as a bincount
    over the whole map would.
    """
    flat = labels.ravel()
    foreground = np.flatnonzero(flat)
    ids = flat[foreground]
    rows, cols = np.divmod(foreground, labels.shape[1])
    count = np.bincount(ids, minlength=n + 1).astype(np.int64)
    row_sum = np.bincount(ids, weights=rows, minlength=n + 1).astype(np.int64)
    col_sum = np.bincount(ids, weights=cols, minlength=n + 1).astype(np.int64)
    prob_sum = np.bincount(ids, weights=nucleus_prob.ravel()[foreground], minlength=n + 1)
    return count, row_sum, col_sum, prob_sum


def _touches_inner_side(
    slices: tuple[slice, slice], shape: tuple[int, int], window: Box, canvas_hw: tuple[int, int]
) -> bool:
    rows, cols = slices
    return (
        (rows.start == 0 and window[0] > 0)
        or (rows.stop == shape[0] and window[1] < canvas_hw[0])
        or (cols.start == 0 and window[2] > 0)
        or (cols.stop == shape[1] and window[3] < canvas_hw[1])
    )


def nucleus_outline(
    labels: np.ndarray,
    nucleus: OwnedNucleus,
    window: Box,
    scale: float,
    offset_xy: tuple[float, float],
) -> Polygon | None:
    """The nucleus's pixel polygon in QuPath level-0 pixels, or None when degenerate.

    :func:`extract_region` outlines all owned nuclei of a window with one
    :func:`cellseg.geojson.label_polygons` call, which gives this same polygon for each when the
    probabilities are binary; otherwise its vertices follow the probability to sub-pixel
    positions.

    Args:
        labels: the window's label map.
        nucleus: the nucleus (its bounding box and label).
        window: canvas box of the window.
        scale: level-0 pixels per canvas pixel.
        offset_xy: subtracted from scaled canvas coordinates to reach QuPath's frame
            (QuPath bounds origin minus the canvas's level-0 origin).
    """
    rows, cols = nucleus.slices
    mask = labels[rows, cols] == nucleus.local_label
    origin_xy = (window[2] + cols.start, window[0] + rows.start)
    return mask_polygon(mask, origin_xy, scale, offset_xy)


@dataclass
class RegionNuclei:
    """What labelling one region produced (picklable, returned by worker processes).

    Attributes:
        labels: ``h×w`` int32 window label map (local ids), or None when not asked for.
        nuclei: ``(local_label, polygon, measurements)`` of the owned nuclei with a valid
            outline, in label order; measurements lack the ``Label`` id, given at commit time.
        dropped: owned objects dropped for touching an inner window side.
        cells: ``{local_label: cell polygon}`` when cells are asked for (``--object-type
            cell``): the nucleus grown by ``cell_expansion_px`` without entering a neighbour's
            growth; measurements then also hold the ``Cell: ...`` ones.
        rejected: owned nuclei removed by the model's learned rejection
            (:mod:`cellseg.rejection`); they are not in ``nuclei``, so they get no id and no
            pixels in the Zarr labels (``labels`` still holds them under their local id).
    """

    labels: np.ndarray | None
    nuclei: list[tuple[int, Polygon, dict[str, float]]]
    dropped: int
    cells: dict[int, Polygon] = field(default_factory=dict)
    rejected: int = 0


@dataclass(frozen=True)
class RegionJob:
    """Inputs of :func:`extract_region` besides the probabilities (picklable)."""

    window: Box
    core: Box
    canvas_hw: tuple[int, int]
    model_mpp: float
    params: PostProcess
    scale: float
    offset_xy: tuple[float, float]
    slide_mpp: float
    keep_labels: bool = True  # False spares sending the label map back when no Zarr is written
    cell_expansion_px: int = 0  # > 0: also grow a cell around each nucleus by this distance
    rejection: Rejection | None = None  # the model's learned rejection; None keeps all nuclei


def extract_region(
    probs: np.ndarray,
    job: RegionJob,
    rgb: np.ndarray | None = None,
) -> RegionNuclei:
    """Watershed of a region's window, seam ownership, outlines and measurements.

    This is the CPU-heavy part of post-processing; it is a pure function of its arguments so
    that it can run in worker processes while results are committed in region order. The
    probabilities are the blended float32 ones (:meth:`cellseg.store.PredictionStore.read_float`),
    never the uint8 viewing copy, and the watershed breaks ties by canvas position
    (:func:`cellseg.instances.label_instances`), so a nucleus seen whole by two windows gets the
    same pixels in both whatever the block size (issue 11).

    Args:
        probs: ``C×h×w`` float32 probabilities of the window.
        job: geometry and parameters; ``job.core`` is the region's core already clipped to
            the ROI (nuclei whose centroid lies outside it are not kept).
        rgb: the window's ``h×w×3`` uint8 slide pixels at the model's resolution, for the
            stain measurements (:mod:`cellseg.measurements`); None: shape measurements only.
    """
    labels = label_instances(probs, job.model_mpp, job.params)
    nucleus_prob = 1.0 - probs[0]
    owned, dropped = owned_nuclei(labels, nucleus_prob, job.window, job.core, job.canvas_hw)
    # Sub-pixel outlines: a contour of the probability the mask was cut from (OUTLINE_LEVEL).
    outlines = _outlines(labels, [nucleus.local_label for nucleus in owned], job, nucleus_prob)
    outlined = [nucleus for nucleus in owned if nucleus.local_label in outlines]
    ids = [nucleus.local_label for nucleus in outlined]
    if job.cell_expansion_px > 0:
        grown = expand_labels(labels, distance=job.cell_expansion_px)
        cell_outlines = _outlines(grown, ids, job)
        outlines = _inside_cells(outlines, cell_outlines)
    values = _measure(labels, rgb, ids, outlines, job.slide_mpp, "Nucleus")
    for nucleus, measured in zip(outlined, values, strict=True):
        measured[PROBABILITY_KEY] = nucleus.mean_probability
    rejected = 0
    if job.rejection is not None:
        # On the nucleus's own measurements; its pixels still bound its neighbours' cells.
        keep = job.rejection.keep(values).tolist()
        rejected = len(keep) - sum(keep)
        ids = [label for label, kept in zip(ids, keep, strict=True) if kept]
        values = [measured for measured, kept in zip(values, keep, strict=True) if kept]
    cells: dict[int, Polygon] = {}
    if job.cell_expansion_px > 0:
        cells, values = _cells(grown, cell_outlines, rgb, ids, values, job)
    nuclei = [
        (label, outlines[label], {k: round(v, DECIMALS) for k, v in measured.items()})
        for label, measured in zip(ids, values, strict=True)
    ]
    return RegionNuclei(labels if job.keep_labels else None, nuclei, dropped, cells, rejected)


def _outlines(
    labels: np.ndarray, ids: list[int], job: RegionJob, nucleus_prob: np.ndarray | None = None
) -> dict[int, Polygon]:
    """Level-0 polygons of some labels of the window (those whose outline is not degenerate):
    sub-pixel ones following ``nucleus_prob`` when given (nuclei), pixel ones otherwise (cells)."""
    return label_polygons(
        labels,
        ids,
        (job.window[2], job.window[0]),
        job.scale,
        job.offset_xy,
        probability=nucleus_prob,
        level=min(OUTLINE_LEVEL, job.params.fg_threshold),
    )


def _measure(
    labels: np.ndarray,
    rgb: np.ndarray | None,
    ids: list[int],
    outlines: dict[int, Polygon],
    slide_mpp: float,
    compartment: str,
) -> list[dict[str, float]]:
    """Shape (from the outlines) and stain (from the pixels) measurements of ``ids``."""
    shapes = shape_measurements([outlines[i] for i in ids], slide_mpp, compartment)
    if rgb is None:
        return shapes
    stains = stain_measurements(labels, rgb, ids, compartment)
    return [{**a, **b} for a, b in zip(shapes, stains, strict=True)]


def _inside_cells(outlines: dict[int, Polygon], cells: dict[int, Polygon]) -> dict[int, Polygon]:
    """Nucleus outlines clipped to their cells (:func:`_cells`), where they poke out.

    A sub-pixel nucleus outline may reach up to a pixel beyond its mask, into a background pixel
    that the cell expansion gave to a neighbour's cell; QuPath expects a cell to contain its
    nucleus. Such outlines are clipped to the cell shrunk by one grid step, so that snapping the
    result to the 0.01 px grid (which moves vertices by under 0.0071 px) keeps it inside the
    cell; should nothing valid be left (never in practice) the outline is kept as it was.
    """
    ids = [i for i in outlines if i in cells]
    if not ids:
        return outlines
    nuclei = np.asarray([outlines[i] for i in ids], dtype=object)
    rooms = np.asarray([cells[i] for i in ids], dtype=object)
    outside = ~shapely.covered_by(nuclei, rooms)
    clipped = dict(outlines)
    for label, part in zip(
        np.asarray(ids)[outside].tolist(),
        shapely.intersection(
            nuclei[outside], shapely.buffer(rooms[outside], -GRID_PX, join_style="mitre")
        ),
        strict=True,
    ):
        polygon = snap_polygon(part) if not part.is_empty else None
        if polygon is not None:
            clipped[label] = polygon
    return clipped


def _cells(
    grown: np.ndarray,
    outlines: dict[int, Polygon],
    rgb: np.ndarray | None,
    ids: list[int],
    values: list[dict[str, float]],
    job: RegionJob,
) -> tuple[dict[int, Polygon], list[dict[str, float]]]:
    """Cells grown from the nuclei, as QuPath's cell expansion does: every pixel within
    ``cell_expansion_px`` of a nucleus goes to the nearest one (``grown``, skimage
    ``expand_labels`` of the labels, so no two cells overlap), with their ``outlines``. All
    nuclei of the window take part, owned or not, so a cell on a region seam is bounded by its
    neighbours in the next region exactly as they are by it. Nuclei whose cell outline is
    degenerate (never in practice) keep no cell."""
    kept = [i for i in ids if i in outlines]
    cell_values = dict(
        zip(kept, _measure(grown, rgb, kept, outlines, job.slide_mpp, "Cell"), strict=True)
    )
    merged = []
    for label, measured in zip(ids, values, strict=True):
        cell = cell_values.get(label, {})
        if cell:
            ratio = measured["Nucleus: Area µm^2"] / cell["Cell: Area µm^2"]
            cell = {**cell, AREA_RATIO_KEY: ratio}
        merged.append({**measured, **cell})
    return {i: outlines[i] for i in kept}, merged
