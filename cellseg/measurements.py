"""Nucleus and cell measurements under the names QuPath's own cell detection uses.

Shape measurements come from the exported outlines (level-0 polygons, so they describe exactly
what QuPath shows), stain measurements from the slide's pixels inside each object at the model's
resolution, read once with the region's window (:mod:`cellseg.store`'s working ``rgb``):

* ``<Compartment>: Area µm^2``, ``Perimeter µm``: polygon area and length;
* ``Circularity``: ``4π·area / perimeter²`` (1 for a disc);
* ``Solidity``: ``area / convex hull area``;
* ``Max caliper µm``, ``Min caliper µm``: largest and smallest Feret diameters (the widths of
  the outline between parallel lines; rotating calipers over the convex hull);
* ``Eccentricity``: of the ellipse with the polygon's second moments,
  ``sqrt(1 - λ_min / λ_max)`` (0 for a disc);
* ``Hematoxylin OD mean / std dev / max / min`` and the same for ``Eosin``: colour
  deconvolution (Ruifrok & Johnston 2001) with QuPath's default H&E stain vectors
  (:data:`HE_STAINS`) and white background 255, so that values compare with QuPath's own.

``<Compartment>`` is ``Nucleus`` or ``Cell`` (``--object-type cell``). Measurement names are
QuPath's for calibrated images (µm units), e.g. ``Nucleus: Area µm^2``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import shapely
from shapely.geometry import Polygon

# QuPath's default "H&E" stains (ColorDeconvolutionStains, from Ruifrok & Johnston): rows are
# the hematoxylin and eosin optical-density vectors; the residual is their normalised cross
# product (0.316, -0.598, 0.737), as QuPath computes it.
_HEMATOXYLIN = np.array([0.651, 0.701, 0.290])
_EOSIN = np.array([0.216, 0.801, 0.558])
_H = _HEMATOXYLIN / np.linalg.norm(_HEMATOXYLIN)
_E = _EOSIN / np.linalg.norm(_EOSIN)
_R = np.cross(_H, _E) / np.linalg.norm(np.cross(_H, _E))
HE_STAINS = np.stack([_H, _E, _R])
_UNMIX = np.linalg.inv(HE_STAINS)  # OD (n×3 RGB) @ _UNMIX = stain amounts (n×3 H, E, residual)
MAX_VALUE = 255.0  # white background of brightfield RGB
STAINS = ("Hematoxylin", "Eosin")
STATISTICS = ("mean", "std dev", "max", "min")


# OD of each uint8 value: a value of 0 is clamped to 1, as the log of 0 is not finite.
_OD_LUT = -np.log10(np.maximum(np.arange(256, dtype=np.float64), 1.0) / MAX_VALUE)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """``n×3`` uint8 RGB -> ``n×3`` float64 OD ``-log10(max(v, 1) / 255)`` per channel."""
    return _OD_LUT[np.asarray(rgb, dtype=np.uint8)]


def stain_amounts(rgb: np.ndarray) -> np.ndarray:
    """``n×3`` uint8 RGB -> ``n×2`` float64 hematoxylin and eosin optical densities."""
    return (optical_density(rgb) @ _UNMIX)[:, :2]


def stain_measurements(
    labels: np.ndarray, rgb: np.ndarray, ids: Sequence[int], compartment: str = "Nucleus"
) -> list[dict[str, float]]:
    """Hematoxylin and eosin OD statistics over the pixels of each label.

    Args:
        labels: ``h×w`` int label map.
        rgb: ``h×w×3`` uint8 pixels of the same area, at the same resolution.
        ids: the labels to measure (each with at least one pixel).
        compartment: the name's prefix, ``"Nucleus"`` or ``"Cell"``.

    Returns:
        One dict per id, in ``ids`` order: ``"<compartment>: Hematoxylin OD mean"``, ...
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return []
    flat = labels.ravel()
    inside = np.flatnonzero(np.isin(flat, ids))
    owner = flat[inside]
    amounts = stain_amounts(rgb.reshape(-1, 3)[inside])
    order = np.argsort(ids)
    position = order[np.searchsorted(ids[order], owner)]  # each pixel's index in ids
    count = np.bincount(position, minlength=len(ids))
    by_id = np.argsort(position, kind="stable")  # pixels grouped by id, for max and min
    starts = np.cumsum(count) - count
    columns: dict[str, np.ndarray] = {}
    for column, stain in enumerate(STAINS):
        values = amounts[:, column]
        mean = np.bincount(position, weights=values, minlength=len(ids)) / count
        # Population std dev from the deviations (E[x²] - E[x]² would cancel).
        squares = np.bincount(position, weights=(values - mean[position]) ** 2, minlength=len(ids))
        spread = np.sqrt(squares / count)
        grouped = values[by_id]
        statistics = (
            mean,
            spread,
            np.maximum.reduceat(grouped, starts),
            np.minimum.reduceat(grouped, starts),
        )
        for name, value in zip(STATISTICS, statistics, strict=True):
            columns[f"{compartment}: {stain} OD {name}"] = np.asarray(value, dtype=np.float64)
    return [{name: float(value[i]) for name, value in columns.items()} for i in range(len(ids))]


def shape_measurements(
    polygons_level0: Sequence[Polygon], level0_mpp: float, compartment: str = "Nucleus"
) -> list[dict[str, float]]:
    """Area, perimeter, circularity, solidity, calipers and eccentricity of each polygon.

    Args:
        polygons_level0: outlines in level-0 pixels (hole-free, valid).
        level0_mpp: µm per level-0 pixel.
        compartment: the name's prefix, ``"Nucleus"`` or ``"Cell"``.
    """
    if not len(polygons_level0):
        return []
    shapes = np.asarray(polygons_level0, dtype=object)
    area_px = shapely.area(shapes)
    length_px = shapely.length(shapes)
    hulls = shapely.convex_hull(shapes)
    hull_area = shapely.area(hulls)
    eccentricity = _eccentricities(shapes)
    hull_xy, hull_ring = shapely.get_coordinates(
        shapely.get_exterior_ring(hulls), return_index=True
    )
    last = np.r_[hull_ring[1:] != hull_ring[:-1], True]  # each ring's repeated closing point
    max_px, min_px = _batched_calipers(hull_xy[~last], hull_ring[~last], len(shapes))
    prefix = f"{compartment}: "
    out = []
    for i in range(len(shapes)):
        out.append(
            {
                prefix + "Area µm^2": float(area_px[i] * level0_mpp**2),
                prefix + "Perimeter µm": float(length_px[i] * level0_mpp),
                prefix + "Circularity": float(4 * math.pi * area_px[i] / length_px[i] ** 2),
                prefix + "Solidity": float(area_px[i] / hull_area[i]),
                prefix + "Max caliper µm": float(max_px[i] * level0_mpp),
                prefix + "Min caliper µm": float(min_px[i] * level0_mpp),
                prefix + "Eccentricity": float(eccentricity[i]),
            }
        )
    return out


def calipers(hull_xy: np.ndarray) -> tuple[float, float]:
    """``(max, min)`` Feret diameters of one convex polygon given by its ``k×2`` vertices (in
    order, not repeated); see :func:`_calipers`."""
    hull_xy = np.asarray(hull_xy, dtype=np.float64)
    largest, smallest = _calipers(hull_xy, np.zeros(len(hull_xy), dtype=np.intp), 1)
    return float(largest[0]), float(smallest[0])


_CALIPER_BATCH = 128  # polygons at once: temporaries of batch × k² (k hull vertices) stay small


def _batched_calipers(xy: np.ndarray, ring: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_calipers` over batches of polygons, which bounds its ``n×k×k`` temporaries.

    Polygons go in order of vertex count, so that each batch is padded to a ``k`` close to its
    own polygons' (sub-pixel outlines of large and small nuclei differ several-fold in ``k``).
    """
    order = np.argsort(np.bincount(ring, minlength=n), kind="stable")
    rank = np.empty(n, dtype=np.intp)
    rank[order] = np.arange(n)
    by_size = np.argsort(rank[ring], kind="stable")  # vertex order within a polygon is kept
    sorted_largest, sorted_smallest = _calipers_in_batches(xy[by_size], rank[ring][by_size], n)
    return sorted_largest[rank], sorted_smallest[rank]


def _calipers_in_batches(xy: np.ndarray, ring: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_calipers` of ``_CALIPER_BATCH`` polygons at a time (``ring`` non-decreasing)."""
    largest, smallest = np.zeros(n), np.zeros(n)
    bounds = np.searchsorted(ring, np.arange(0, n + _CALIPER_BATCH, _CALIPER_BATCH))
    for batch, (start, stop) in enumerate(itertools.pairwise(bounds.tolist())):
        if stop > start:
            first = batch * _CALIPER_BATCH
            count = min(_CALIPER_BATCH, n - first)
            big, small = _calipers(xy[start:stop], ring[start:stop] - first, count)
            largest[first : first + count], smallest[first : first + count] = big, small
    return largest, smallest


def _calipers(xy: np.ndarray, ring: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest and smallest Feret diameters of ``n`` convex polygons at once.

    The largest is the largest vertex distance; the smallest, the smallest width over the
    hull's edge directions (a convex polygon's minimum width is attained across one of its
    edges: rotating calipers), each width being the farthest vertex from the edge's line.

    Args:
        xy: ``m×2`` vertices of the polygons one after another, each listed once around.
        ring: ``m`` polygon index of each vertex (non-decreasing).
        n: number of polygons.
    """
    sizes = np.bincount(ring, minlength=n)
    first = np.cumsum(sizes) - sizes
    k = int(sizes.max())
    slot = np.arange(len(xy)) - first[ring]
    valid = np.zeros((n, k), dtype=bool)
    valid[ring, slot] = True
    points = np.zeros((n, k, 2))
    points[ring, slot] = xy
    # Centred on each polygon: no cancellation at level-0 offsets of 10⁵ px.
    centre = (
        np.bincount(ring, weights=xy[:, 0], minlength=n),
        np.bincount(ring, weights=xy[:, 1], minlength=n),
    )
    points -= (np.stack(centre, axis=1) / sizes[:, None])[:, None, :]
    points[~valid] = 0.0
    pair = valid[:, :, None] & valid[:, None, :]
    distance = np.linalg.norm(points[:, :, None, :] - points[:, None, :, :], axis=-1)
    largest = np.where(pair, distance, 0.0).max(axis=(1, 2))
    following = np.where(slot + 1 < sizes[ring], slot + 1, 0)  # the next vertex, cyclically
    edges = np.zeros((n, k, 2))
    edges[ring, slot] = points[ring, following] - points[ring, slot]
    lengths = np.linalg.norm(edges, axis=-1)
    usable = valid & (lengths > 0)
    normals = (
        np.stack([-edges[..., 1], edges[..., 0]], axis=-1)
        / np.where(usable, lengths, 1.0)[..., None]
    )
    # heights[p, e, v]: distance of vertex v from the line through edge e.
    offsets = points[:, None, :, :] - points[:, :, None, :]
    heights = np.abs(np.einsum("pek,pevk->pev", normals, offsets))
    widths = np.where(valid[:, None, :], heights, 0.0).max(axis=2)
    smallest = np.where(usable, widths, np.inf).min(axis=1)
    return largest, np.where(np.isfinite(smallest), smallest, 0.0)


def _eccentricities(shapes: np.ndarray) -> np.ndarray:
    """Eccentricity of each polygon's second-moment ellipse (Green's theorem on the exterior)."""
    xy, index = shapely.get_coordinates(shapely.get_exterior_ring(shapes), return_index=True)
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    xy = xy - np.repeat(xy[starts], np.diff(np.r_[starts, len(xy)]), axis=0)  # local origins
    x0, y0 = xy[:-1, 0], xy[:-1, 1]
    x1, y1 = xy[1:, 0], xy[1:, 1]
    same = index[1:] == index[:-1]  # segments inside one ring (its closing point is repeated)
    cross = np.where(same, x0 * y1 - x1 * y0, 0.0)
    ring = index[:-1]
    n = len(shapes)

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(ring, weights=values * cross, minlength=n)

    area = total(np.ones_like(x0)) / 2
    cx = total(x0 + x1) / (6 * area)
    cy = total(y0 + y1) / (6 * area)
    sxx = total(x0 * x0 + x0 * x1 + x1 * x1) / (12 * area) - cx**2
    syy = total(y0 * y0 + y0 * y1 + y1 * y1) / (12 * area) - cy**2
    sxy = total(x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) / (24 * area) - cx * cy
    half_trace = (sxx + syy) / 2
    root = np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    major, minor = half_trace + root, np.maximum(half_trace - root, 0.0)
    return np.sqrt(np.clip(1.0 - minor / major, 0.0, 1.0))
