"""Nucleus outlines as QuPath-ready GeoJSON (QuPath 0.4-0.7 contract, PEERS.md §6).

Three pieces:

* :func:`mask_polygon` turns one instance mask into a valid level-0 polygon that survives QuPath's
  0.01 px precision reduction (v0.6+ rejects the WHOLE file when one geometry is invalid);
  :func:`label_polygons` gives the same polygons for all instances of a label map at once, with
  array operations instead of one scikit-image and several shapely calls per nucleus;
* :class:`GeoJSONWriter` streams a FeatureCollection, one Feature per nucleus, to a temporary
  file that is renamed into place only when complete (``.gz`` names are gzip-compressed);
* :func:`polygon_measurements` (:func:`measure_polygons` for many) gives area and perimeter
  under the names QuPath shows.

Pixel convention: mask pixel (c, r) covers the square [c, c+1) × [r, r+1) of the mask raster, so
the mask's top-left pixel corner is at (0, 0) and level-0 coordinates are
``x0 = (x + origin_x) · scale − offset_x`` (likewise y). Outlines are marching-squares contours at
level 0.5 (scikit-image), which pass through the midpoints of pixel edges: straight runs lie exactly
on pixel edges and each convex corner is cut by a triangle of 1/8 px², so an n×n square has bounds
exactly [0, n]² and area n² − 0.5, and an isolated pixel is a diamond of area 0.5 px². This follows
the pixel outline more smoothly than a staircase does (QuPath draws it as is) while staying inside
the pixel-edge polygon.

Given the probability map the labels were cut from (``label_polygons(..., probability=...)``, what
``cellseg predict`` does for nuclei), each vertex between an instance pixel and a background pixel
slides along that pixel pair to the linear interpolation's crossing of the contour level: the
outline becomes the sub-pixel contour of the probability (area and perimeter of discs of radius
3-20 px within 3 %, where pixel outlines overestimate perimeters by ~5 %), keeps the mask's
topology, and stays on the shared pixel edges between touching nuclei, so they never overlap.
Vertices within :data:`THIN_TOLERANCE_PX` of their neighbours' chord are then dropped.

Holes are filled (only the outer contour is kept): nuclei are simply connected, and a hole in a
predicted mask is a thresholding artefact (pale chromatin), which QuPath's own cell detection fills
too. It also keeps every ring a plain, valid exterior.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import math
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import geojson as gj  # the python-geojson package: builds the Feature objects
import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon
from skimage import measure

from .atomic import AtomicFile

log = logging.getLogger(__name__)

GRID_PX = 0.01  # QuPath ≥ 0.6 reduces geometries to PrecisionModel(-0.01), i.e. a 0.01 px grid
DECIMALS = 2
OBJECT_TYPES = ("detection", "cell", "annotation")
DEFAULT_COLOR = (220, 40, 40)
# Feature ids are uuid5(uuid5(CELLSEG_NAMESPACE, slide content hash), nucleus key): the same
# slide and options give the same ids (byte-identical files), other slides other ids.
CELLSEG_NAMESPACE = uuid.UUID("8f0b0c7e-5d0e-5c4e-9a55-6e2b8f0c11d5")
AREA_KEY = "Area µm^2"  # the names QuPath uses for ROI shape measurements
PERIMETER_KEY = "Perimeter µm"


# ------------------------------------------------------------------------------------ polygons


def _largest_polygon(geometry: Any) -> Polygon | None:
    """The largest-area Polygon inside any geometry (make_valid may return collections)."""
    if isinstance(geometry, Polygon):
        parts = [geometry]
    elif hasattr(geometry, "geoms"):
        parts = [p for g in geometry.geoms if (p := _largest_polygon(g)) is not None]
    else:
        return None
    parts = [p for p in parts if not p.is_empty and p.area > 0]
    return max(parts, key=lambda p: p.area, default=None)


def _signed_area(ring_xy: np.ndarray) -> float:
    """Shoelace area of a closed ring (first point repeated last); > 0 when counter-clockwise."""
    x, y = ring_xy[:, 0], ring_xy[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _grid_polygon(ring_xy: np.ndarray) -> Polygon | None:
    """Polygon from a closed ring (first point repeated last) rounded to the 0.01 grid, or None
    if it is not valid there (:func:`_grid_polygons` of one ring)."""
    ring_xy = np.asarray(ring_xy, dtype=np.float64)[:-1]
    return _grid_polygons(ring_xy, np.array([len(ring_xy)]))[0]


def _ring_positions(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rings of ``sizes`` points stored one after another: each point's ring and its index
    in that ring."""
    ring = np.repeat(np.arange(len(sizes)), sizes)
    return ring, np.arange(len(ring)) - (np.cumsum(sizes) - sizes)[ring]


def _cyclic_neighbours(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rings of ``sizes`` points stored one after another: each point's ring, and the
    indices of the point before and after it in its ring (cyclically)."""
    ring, local = _ring_positions(sizes)
    index = np.arange(len(ring))
    before = np.where(local == 0, index + sizes[ring] - 1, index - 1)
    after = np.where(local == sizes[ring] - 1, index - sizes[ring] + 1, index + 1)
    return ring, before, after


def _grid_polygons(rings_xy: np.ndarray, sizes: np.ndarray) -> list[Polygon | None]:
    """Polygons from rings rounded to the 0.01 grid; None where one is not valid there.

    Collinear and repeated vertices are dropped (marching squares emits one vertex per pixel
    edge), exactly, by integer cross products on the grid; each ring is made counter-clockwise
    (RFC 7946), keeping its first vertex. A valid polygon whose vertices are on the grid is left
    unchanged by QuPath's precision reduction. All rings are handled at once by array
    operations and shapely 2's vectorised constructors and predicates.

    Args:
        rings_xy: ``M×2`` float64 (x, y) of the rings one after another, each listed once
            around (its first point NOT repeated at the end).
        sizes: number of points of each ring; ``sum(sizes) == M``.
    """
    sizes = np.asarray(sizes, dtype=np.intp)
    grid = np.rint(rings_xy / GRID_PX).astype(np.int64)
    ring, before, after = _cyclic_neighbours(sizes)
    incoming, outgoing = grid - grid[before], grid[after] - grid
    turns = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]
    grid, ring = grid[turns != 0], ring[turns != 0]
    counts = np.bincount(ring, minlength=len(sizes))
    enough = counts >= 3
    grid, counts = grid[enough[ring]], counts[enough]
    ring, _, after = _cyclic_neighbours(counts)
    first = np.cumsum(counts) - counts
    # Orientation from the exact shoelace sum on the integer grid, relative to each ring's
    # first vertex so that the products stay far from int64 overflow.
    rel = grid - grid[first][ring]
    cross = rel[:, 0] * rel[after, 1] - rel[after, 0] * rel[:, 1]
    clockwise = np.add.reduceat(cross, first) < 0 if len(first) else np.zeros(0, dtype=bool)
    # Closed rings [g0, g1, …, gk, g0], reversed to [g0, gk, …, g1, g0] where clockwise.
    closed_ring, local = _ring_positions(counts + 1)
    n_points = counts[closed_ring]
    local = np.where(clockwise[closed_ring], n_points - local, local) % n_points
    closed = grid[first[closed_ring] + local]
    coords = np.round(closed * GRID_PX, DECIMALS) + 0.0  # -0.0 -> 0.0
    polygons = np.full(len(sizes), None, dtype=object)
    if len(counts):
        made = shapely.polygons(shapely.linearrings(coords, indices=closed_ring))
        valid = shapely.is_valid(made) & (shapely.area(made) > 0)
        polygons[np.flatnonzero(enough)[valid]] = made[valid]
    return polygons.tolist()


def snap_polygon(geometry: Polygon | MultiPolygon) -> Polygon | None:
    """A valid hole-free Polygon on the 0.01 px grid, or None when nothing with area remains.

    The exterior is rounded to 2 decimals (:func:`_grid_polygon`); only when that is not valid
    (self-intersections in the input, or vertices merged by the rounding) is the geometry
    repaired the slow way: ``make_valid``, largest part, holes dropped, GEOS's precision
    reducer (which keeps the result valid), then rounded again.
    """
    part = _largest_polygon(geometry)
    if part is not None:
        polygon = _grid_polygon(np.asarray(part.exterior.coords))
        if polygon is not None:
            return polygon
    part = _largest_polygon(shapely.make_valid(geometry))
    if part is None:
        return None
    snapped = _largest_polygon(shapely.set_precision(Polygon(part.exterior), GRID_PX))
    return None if snapped is None else _grid_polygon(np.asarray(snapped.exterior.coords))


def mask_polygon(
    mask: np.ndarray,
    origin_xy: tuple[float, float],
    scale: float,
    offset_xy: tuple[float, float] = (0.0, 0.0),
) -> Polygon | None:
    """Outline of ONE instance in level-0 (QuPath) pixel coordinates, or None if degenerate.

    ``x0 = (x + origin_x) · scale − offset_x`` (likewise y), x being the mask's continuous
    coordinate (pixel c spans [c, c+1)).

    Args:
        mask: ``h×w`` bool, True on the nucleus (typically a crop around it).
        origin_xy: (x, y) of the mask's top-left pixel in the raster it was cut from (e.g. the
            model-resolution label image), in that raster's pixels.
        scale: level-0 pixels per raster pixel (``model_mpp / slide_mpp``).
        offset_xy: subtracted after scaling, in level-0 pixels: OpenSlide's bounds (x, y) so the
            result is in QuPath's frame; for a raster whose pixel (0, 0) starts at level-0
            (rx, ry) rather than (0, 0), pass ``(bounds_x - rx, bounds_y - ry)``.

    Returns:
        The outer contour of the largest connected part (holes filled), on the 0.01 px grid
        (:func:`snap_polygon`); None for an empty mask or when nothing with area survives.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected an h×w mask, got shape {mask.shape}")
    if not mask.any():
        return None
    # One pixel of zero padding closes the contours of nuclei that touch the crop edge.
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=np.float32)
    padded[1:-1, 1:-1] = mask
    contours = measure.find_contours(padded, 0.5)
    outer = contours[0] if len(contours) == 1 else max(contours, key=lambda c: abs(_signed_area(c)))
    # find_contours puts pixel centres at integer (row, col) of the padded array; the centre of
    # unpadded pixel c lies at c + 0.5 in the corner convention, i.e. x = col_padded - 1 + 0.5.
    xy = outer[:, ::-1] - 0.5
    xy = (xy + np.asarray(origin_xy, dtype=np.float64)) * scale - np.asarray(offset_xy)
    if len(xy) < 4:
        return None
    # Fast path (almost always taken): the rounded contour is already valid.
    polygon = _grid_polygon(xy)
    return polygon if polygon is not None else snap_polygon(Polygon(xy))


# Marching squares on a label map, the way skimage.measure.find_contours(mask, 0.5) traces one
# binary mask (fully_connected="low", skimage's _get_contour_segments): a 2×2 square of pixels
# whose corners ul, ur, ll, lr are in the mask gives case = ul + 2·ur + 4·ll + 8·lr and one or
# two directed segments between the midpoints of its sides, the mask on their right.
_TOP, _BOTTOM, _LEFT, _RIGHT = 0, 1, 2, 3
_SIDE_DROW = np.array([0, 2, 1, 1])  # side midpoints in doubled pixel coordinates,
_SIDE_DCOL = np.array([1, 1, 0, 2])  # relative to (2·r0, 2·c0) of the square's ul pixel
_CASE_SEGMENTS = {
    1: [(_TOP, _LEFT)],
    2: [(_RIGHT, _TOP)],
    3: [(_RIGHT, _LEFT)],
    4: [(_LEFT, _BOTTOM)],
    5: [(_TOP, _BOTTOM)],
    6: [(_RIGHT, _TOP), (_LEFT, _BOTTOM)],
    7: [(_RIGHT, _BOTTOM)],
    8: [(_BOTTOM, _RIGHT)],
    9: [(_TOP, _LEFT), (_BOTTOM, _RIGHT)],
    10: [(_BOTTOM, _TOP)],
    11: [(_BOTTOM, _LEFT)],
    12: [(_LEFT, _RIGHT)],
    13: [(_TOP, _RIGHT)],
    14: [(_LEFT, _TOP)],
}


def _case_table(segment: int, end: int) -> np.ndarray:
    """16 ints: side of segment ``segment``'s ``end`` (0 from, 1 to) per case, -1 if none."""
    table = np.full(16, -1)
    for case, segments in _CASE_SEGMENTS.items():
        if segment < len(segments):
            table[case] = segments[segment][end]
    return table


_CASE_SIDES = np.stack([[_case_table(k, end) for end in (0, 1)] for k in (0, 1)])  # 2×2×16


def _dense_labels(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``(H+2)×(W+2)`` int32: ``k + 1`` where ``labels == ids[k]``, 0 elsewhere and on a
    one-pixel frame (the zero padding that closes contours touching the map's edge)."""
    dense = np.zeros((labels.shape[0] + 2, labels.shape[1] + 2), dtype=np.int32)
    if len(ids) == 0 or labels.size == 0:
        return dense
    if labels.min() >= 0 and labels.max() <= max(labels.size, 1 << 20):
        lookup = np.zeros(int(labels.max()) + 1, dtype=np.int32)
        wanted = ids[ids < len(lookup)]
        lookup[wanted] = np.searchsorted(ids, wanted) + 1
        dense[1:-1, 1:-1] = lookup[labels]
    else:  # huge or negative label values: no lookup table
        slot = np.searchsorted(ids, labels).clip(0, len(ids) - 1)
        dense[1:-1, 1:-1] = np.where(ids[slot] == labels, slot + 1, 0)
    return dense


def _square_segments(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every instance's marching-squares segments, sorted by instance, then in the order
    find_contours emits them (raster order of squares, then within a square).

    Returns ``(instance, source, target)`` over segments: the dense id (int32), and the
    segment's ends as int64 point codes ``R·S + C`` of doubled coordinates
    ``(R, C) = (2·row, 2·col)`` in the padded map, ``S = 2·dense.shape[1]``
    (:func:`_point_rows_cols` decodes them).
    """
    width = dense.shape[1]
    corners = (dense[:-1, :-1], dense[:-1, 1:], dense[1:, :-1], dense[1:, 1:])
    mixed = (corners[0] != corners[1]) | (corners[0] != corners[2]) | (corners[0] != corners[3])
    square = np.flatnonzero(mixed)  # raster index in the (h+1)×(w+1) grid of squares
    del mixed
    base = square + square // (width - 1)  # the square's ul pixel in the padded map
    flat = dense.ravel()
    values = (flat[base], flat[base + 1], flat[base + width], flat[base + width + 1])
    del base
    instance, square_rank, case = _square_cases(values)
    del values
    # One segment per (square, instance), two for the saddle cases 6 and 9.
    saddle = np.flatnonzero((case == 6) | (case == 9))
    key = instance.astype(np.int64) * (2 * len(square) + 2) + 2 * square_rank.astype(np.int64)
    key = np.concatenate([key, key[saddle] + 1])
    order = np.argsort(key)
    del key
    pair = np.concatenate([np.arange(len(instance)), saddle])[order]
    segment = (order >= len(instance)).astype(np.intp)
    del order
    instance, case, square = instance[pair], case[pair], square[square_rank[pair]]
    del pair, square_rank
    row, col = np.divmod(square, width - 1)
    origin = 2 * row * (2 * width) + 2 * col
    side_code = _SIDE_DROW * (2 * width) + _SIDE_DCOL
    source = origin + side_code[_CASE_SIDES[segment, 0, case]]
    target = origin + side_code[_CASE_SIDES[segment, 1, case]]
    return instance, source, target


def _square_cases(values: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each distinct non-zero label of each square once: ``(label, square index, case)``.

    ``values`` holds the labels at the ul, ur, ll and lr corners of the squares; the case has
    bit ``j`` set when corner ``j`` carries the label (skimage's numbering).
    """
    labels, squares, cases = [], [], []
    for k in range(4):
        new = values[k] != 0
        for j in range(k):
            new &= values[j] != values[k]
        index = np.flatnonzero(new).astype(np.int32)
        label = values[k][index]
        case = np.zeros(len(index), dtype=np.uint8)
        for j in range(4):
            case |= (values[j][index] == label).astype(np.uint8) << j
        labels.append(label)
        squares.append(index)
        cases.append(case)
    return np.concatenate(labels), np.concatenate(squares), np.concatenate(cases)


def _point_rows_cols(code: np.ndarray, stride: int) -> np.ndarray:
    """``N×2`` int64 doubled (row, col) of point codes ``R·stride + C``."""
    return np.stack(np.divmod(code, stride), axis=1)


def _successors(instance: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Index of the segment that continues each segment (its source is this one's target).

    Inside one instance every side midpoint starts exactly one segment and ends exactly one,
    so following successors walks each contour, a closed cycle.
    """
    span = int(max(source.max(), target.max())) + 1
    key_source = instance.astype(np.int64) * span + source
    key_target = instance.astype(np.int64) * span + target
    by_source = np.argsort(key_source)
    slot = np.searchsorted(key_source[by_source], key_target).clip(0, len(key_source) - 1)
    successor = by_source[slot]
    if not np.array_equal(key_source[successor], key_target):
        raise RuntimeError("marching-squares segments do not form closed contours")
    return successor


def _cycle_min_max(successor: np.ndarray, longest: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest segment index on each segment's cycle (pointer doubling)."""
    low = high = np.arange(len(successor))
    jump, covered = successor, 1
    while covered < longest:
        low, high = np.minimum(low, low[jump]), np.maximum(high, high[jump])
        jump, covered = jump[jump], 2 * covered
    return low, high


def _steps_to(successor: np.ndarray, is_start: np.ndarray, longest: int) -> np.ndarray:
    """Number of successor steps from each segment forward to its cycle's start segment."""
    steps = np.where(is_start, 0, 1)
    jump = np.where(is_start, np.arange(len(successor)), successor)
    covered = 1
    while covered < longest:
        steps, jump, covered = steps + steps[jump], jump[jump], 2 * covered
    return steps


def _largest_cycles(
    instance: np.ndarray, rows_cols: np.ndarray, successor: np.ndarray, first: np.ndarray
) -> np.ndarray:
    """Bool over segments: on its instance's cycle of largest area (the first cycle on a tie).

    ``first`` is each segment's cycle id, the index of the cycle's first segment, so cycles
    compare in find_contours' order. Areas are exact: shoelace sums of the doubled int64
    coordinates (8 × the area in pixels²).
    """
    after = rows_cols[successor]
    cross = rows_cols[:, 0] * after[:, 1] - after[:, 0] * rows_cols[:, 1]
    by_cycle = np.argsort(first, kind="stable")
    heads = np.flatnonzero(first == np.arange(len(first)))
    area8 = np.abs(np.add.reduceat(cross[by_cycle], np.searchsorted(first[by_cycle], heads)))
    ranked = heads[np.lexsort((heads, -area8, instance[heads]))]
    best = ranked[np.r_[True, instance[ranked][1:] != instance[ranked][:-1]]]
    chosen = np.zeros(len(first), dtype=bool)
    chosen[best] = True
    return chosen[first]


def _outer_contours(
    instance: np.ndarray, source_code: np.ndarray, target_code: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """find_contours' outer contour of each instance, from its marching-squares segments.

    For each instance, the result equals ``find_contours(padded crop, 0.5)`` followed by
    :func:`mask_polygon`'s choice of the contour of largest area (the first one on a tie), with
    the crop the instance's bounding box. find_contours chains the segments in emission order,
    so a closed contour starts where the LAST segment emitted on it ends, and contours come in
    the order of their FIRST segment; both follow from the segment order.

    Args:
        instance, source_code, target_code: :func:`_square_segments` output for whole
            instances (all segments of each instance present).
        stride: the point-code stride, ``2 × the padded map's width``.

    Returns:
        ``(sizes, rows_cols, box_origin)`` per instance in increasing order: the number of
        points of its contour, NOT repeating the first point at the end; the points, contour
        after contour, as ``N×2`` float64 (row, col) in find_contours' coordinates of the
        one-pixel padded bounding-box crop; and the ``k×2`` int64 (row, col) of the bounding
        box's top-left pixel in the unpadded map.
    """
    successor = _successors(instance, source_code, target_code)
    rows_cols = _point_rows_cols(source_code, stride)
    group_start = np.flatnonzero(np.r_[True, instance[1:] != instance[:-1]])
    group = np.cumsum(np.r_[False, instance[1:] != instance[:-1]])
    longest = int(np.diff(np.r_[group_start, len(instance)]).max())
    first, last = _cycle_min_max(successor, longest)
    member = np.flatnonzero(_largest_cycles(instance, rows_cols, successor, first))
    # Walk each chosen cycle from its start, the segment after the last one emitted.
    compact = np.full(len(instance), -1)
    compact[member] = np.arange(len(member))
    is_start = compact[successor[last[member]]] == np.arange(len(member))
    steps = _steps_to(compact[successor[member]], is_start, longest)
    sizes = np.bincount(group[member], minlength=len(group_start))
    size = sizes[group[member]]
    place = (np.cumsum(sizes) - sizes)[group[member]] + (size - steps) % size
    points = np.empty((len(member), 2), dtype=np.int64)
    points[place] = rows_cols[member]
    # The box's top-left pixel (r, c) has its top side at doubled row 2·(r + 1) − 1 of the
    # padded map (likewise columns); find_contours' crop coordinates are padded ones − (r, c).
    box_origin = (np.minimum.reduceat(rows_cols, group_start, axis=0) - 1) // 2
    crop_rows_cols = points * 0.5 - np.repeat(box_origin, sizes, axis=0)
    return sizes, crop_rows_cols, box_origin


_BATCH_SEGMENTS = 1 << 18  # segments traced together: bounds the temporaries to ~50 MB


def _instance_batches(instance: np.ndarray) -> list[slice]:
    """Slices of the instance-sorted segments: whole instances, ~``_BATCH_SEGMENTS`` each."""
    group_start = np.flatnonzero(np.r_[True, instance[1:] != instance[:-1]])
    wanted = np.arange(0, len(instance), _BATCH_SEGMENTS)
    cuts = np.unique(
        np.r_[group_start[np.searchsorted(group_start, wanted, "right") - 1], len(instance)]
    )
    return [slice(start, stop) for start, stop in itertools.pairwise(cuts.tolist())]


def label_polygons(
    labels: np.ndarray,
    ids: np.ndarray | list[int],
    origin_xy: tuple[float, float],
    scale: float,
    offset_xy: tuple[float, float] = (0.0, 0.0),
    *,
    probability: np.ndarray | None = None,
    level: float = 0.5,
) -> dict[int, Polygon]:
    """Outlines of many instances of one label map, each exactly what :func:`mask_polygon` gives
    (without ``probability``), or sub-pixel outlines following ``probability`` (with it).

    ``label_polygons(labels, ids, origin, …)[i]`` equals (vertex for vertex)
    ``mask_polygon(labels[box] == i, (origin_x + box_x0, origin_y + box_y0), scale, offset_xy)``
    with ``box`` the bounding box of ``labels == i`` (``ndi.find_objects``). Instead of one
    find_contours call per instance, all contours are traced at once: the marching-squares
    segments of every instance come from whole-map array operations and are chained into
    contours by pointer doubling (skimage's segment order is reproduced, so each contour starts
    at the same vertex); rings are snapped by shapely's vectorised functions, and only the rare
    ring that is invalid on the grid goes through :func:`snap_polygon` alone. Contours are
    traced a batch of instances at a time, which bounds memory on maps of speckle.

    Args:
        labels: ``h×w`` integer label map (0 background).
        ids: positive labels to outline.
        origin_xy: (x, y) of ``labels``' top-left pixel in the raster it was cut from.
        scale, offset_xy: as in :func:`mask_polygon`.
        probability: ``h×w`` float map the labels were thresholded from (the nucleus
            probability), or None. With it, each outline vertex that lies between a pixel of its
            instance and a background pixel is moved along that pixel pair to where the linear
            interpolation of ``probability`` crosses ``level`` (:func:`_level_crossings`; for a
            ``level`` below the labels' threshold, instances first take the touching background
            pixels above it, :func:`_grow_to_level`), so the outline is the sub-pixel ``level``
            contour of the probability, with the topology of the label map; vertices shared
            with another instance stay on the pixel edge between them, so touching nuclei still
            do not overlap. Vertices are then thinned (:func:`_thin_rings`).
        level: the contour level, at most the threshold the labels were made with.

    Returns:
        ``{id: polygon}`` in increasing id order, for the ids whose outline is not degenerate
        (ids without pixels, or whose outline vanishes on the grid, are left out).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected an h×w integer label map, got {labels.dtype} {labels.shape}")
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if len(ids) and ids[0] <= 0:
        raise ValueError(f"instance ids must be positive, got {ids[0]}")
    if probability is not None and np.shape(probability) != labels.shape:
        raise ValueError(f"probability {np.shape(probability)} differs from labels {labels.shape}")
    if probability is not None:
        labels = _grow_to_level(labels, probability, level)
    dense = _dense_labels(labels, ids)
    stride = 2 * dense.shape[1]
    instance, source_code, target_code = _square_segments(dense)
    del dense
    polygons: dict[int, Polygon] = {}
    for batch in _instance_batches(instance):
        sizes, crop_rows_cols, box_origin = _outer_contours(
            instance[batch], source_code[batch], target_code[batch], stride
        )
        found = ids[np.unique(instance[batch]) - 1]
        if probability is not None:
            # Crop coordinates are those of the padded crop: map (row, col) = crop + box - 1.
            shift = np.repeat(box_origin - 1, sizes, axis=0)
            moved, pinned = _level_crossings(
                crop_rows_cols + shift, np.repeat(found, sizes), labels, probability, level
            )
            crop_rows_cols, sizes = _thin_rings(moved - shift, sizes, pinned)
        polygons.update(
            _crop_polygons(found, sizes, crop_rows_cols, box_origin, origin_xy, scale, offset_xy)
        )
    return polygons


_CROSS_4 = ndi.generate_binary_structure(2, 1)


def _grow_to_level(labels: np.ndarray, probability: np.ndarray, level: float) -> np.ndarray:
    """``labels`` plus the background pixels above ``level`` that touch an instance (4-connected;
    the largest touching label takes one), for a ``level`` below the labels' own threshold.

    Without it a vertex could not reach a crossing beyond the first background pixel (its pixel
    pair ends there): a contour at 0.5 of a mask cut at 0.6 would stay inside the 0.6 one. One
    pixel is enough for the steep edges of nuclei. (A grown pixel may belong to a neighbour's
    cell; :func:`cellseg.nuclei.extract_region` clips such nuclei to their cells.)
    """
    above = (labels == 0) & (probability > level)
    if not above.any():
        return labels
    grown = ndi.maximum_filter(labels, footprint=_CROSS_4, mode="constant", cval=0)
    return np.where(above, grown, labels)


# Sub-pixel vertices move at most this fraction of the way to either pixel centre of their pixel
# pair, so that two vertices never meet at a pixel centre (the ring stays simple on the grid).
_CROSSING_LIMITS = (0.05, 0.95)


def _level_crossings(
    rows_cols: np.ndarray,
    ring_labels: np.ndarray,
    labels: np.ndarray,
    probability: np.ndarray,
    level: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Marching-squares vertices of binary instance masks moved to the ``level`` crossing of
    ``probability``.

    Every vertex lies halfway between the centres of two 4-adjacent pixels, one of its instance
    (inside) and one not (outside). When the outside pixel is background (label 0, inside the
    map), the vertex goes to ``inside + f · (outside - inside)`` with
    ``f = (p_in - level) / (p_in - p_out)``, the linear interpolation's crossing, clipped to
    :data:`_CROSSING_LIMITS` (0.5 when ``p_in <= p_out``, e.g. a filled hole); otherwise (another
    instance, or the map's edge) it stays at 0.5. This is marching squares of one field per
    instance whose ``level`` set has the mask's topology, so each ring stays simple, and
    neighbours keep their shared vertices: their outlines meet but do not overlap.

    Args:
        rows_cols: ``N×2`` float64 (row, col) of the vertices, in ``labels``' pixel-centre
            coordinates (pixel (r, c) centred at (r, c)); one coordinate of each is a half
            integer.
        ring_labels: ``N`` label of the instance each vertex outlines.
        labels: ``h×w`` integer label map.
        probability: ``h×w`` float map that ``labels`` was thresholded from.
        level: the contour level.

    Returns:
        ``(rows_cols, pinned)``: ``N×2`` float64 moved (row, col), and ``N`` bool, True for the
        vertices that stay on their pixel edge because they are shared with another instance
        or lie on the map's edge (:func:`_thin_rings` keeps them).
    """
    low = np.floor(rows_cols).astype(np.int64)  # the pixel pair: floor and ceil of the vertex
    high = np.ceil(rows_cols).astype(np.int64)
    limit = np.asarray(labels.shape) - 1
    on_map = (low >= 0).all(axis=1) & (high <= limit).all(axis=1)
    low_rc, high_rc = np.clip(low, 0, limit), np.clip(high, 0, limit)
    label_low = labels[low_rc[:, 0], low_rc[:, 1]]
    label_high = labels[high_rc[:, 0], high_rc[:, 1]]
    p_low = probability[low_rc[:, 0], low_rc[:, 1]].astype(np.float64)
    p_high = probability[high_rc[:, 0], high_rc[:, 1]].astype(np.float64)
    low_inside = label_low == ring_labels
    p_in, p_out = np.where(low_inside, p_low, p_high), np.where(low_inside, p_high, p_low)
    label_out = np.where(low_inside, label_high, label_low)
    movable = on_map & (label_out == 0) & (p_in > p_out)
    drop = np.where(movable, p_in - p_out, 1.0)
    fraction = np.where(movable, np.clip((p_in - level) / drop, *_CROSSING_LIMITS), 0.5)
    # Unit step from the inside pixel to the outside one; the vertex sits at fraction 0.5 of it.
    step = np.where(low_inside, 1, -1)[:, None] * (high - low)
    pinned = ~on_map | (label_out != 0)
    return rows_cols + (fraction - 0.5)[:, None] * step, pinned


# Sub-pixel outlines have one vertex per pixel edge; a vertex closer than this (model pixels,
# 0.025 µm at 0.5 µm/px, a tenth of a 40x pixel) to the chord of its neighbours adds nothing a
# viewer or a rasteriser can see. On synthetic discs of radius 3-20 px it drops up to a third of
# the vertices for under 0.5 % of area; 0.1 px would cost up to 1.5 % more at radius 3-8 px.
THIN_TOLERANCE_PX = 0.05
_THIN_PASSES = 3


def _thin_rings(
    rows_cols: np.ndarray,
    sizes: np.ndarray,
    pinned: np.ndarray,
    tolerance_px: float = THIN_TOLERANCE_PX,
) -> tuple[np.ndarray, np.ndarray]:
    """Rings without the vertices that lie within ``tolerance_px`` of their neighbours' chord.

    Each pass drops, of the unpinned vertices within tolerance, those at even positions of their
    ring (never two neighbours, never a ring's last and first), so a pass moves the outline by
    less than ``tolerance_px``; pinned vertices (shared with a neighbour) are always kept, so
    touching outlines keep their common edge and stay apart. Rings keep at least 4 vertices.

    Args:
        rows_cols: ``N×2`` float64 vertices, ring after ring (first point not repeated).
        sizes: vertices of each ring.
        pinned: ``N`` bool, vertices that must stay.

    Returns:
        ``(rows_cols, sizes)`` of the thinned rings.
    """
    sizes = np.asarray(sizes, dtype=np.intp)
    for _ in range(_THIN_PASSES):
        ring, before, after = _cyclic_neighbours(sizes)
        _, local = _ring_positions(sizes)
        chord = rows_cols[after] - rows_cols[before]
        offset = rows_cols - rows_cols[before]
        length = np.hypot(chord[:, 0], chord[:, 1])
        cross = np.abs(chord[:, 0] * offset[:, 1] - chord[:, 1] * offset[:, 0])
        near = cross < tolerance_px * np.maximum(length, 1e-12)
        last_of_odd = (local == sizes[ring] - 1) & (sizes[ring] % 2 == 1)
        drop = near & ~pinned & (local % 2 == 0) & ~last_of_odd & (sizes[ring] > 4)
        # A ring keeps at least 4 vertices: drop none of a ring that would fall below that.
        left = sizes - np.bincount(ring[drop], minlength=len(sizes))
        drop &= left[ring] >= 4
        if not drop.any():
            break
        keep = ~drop
        rows_cols, pinned = rows_cols[keep], pinned[keep]
        sizes = np.bincount(ring[keep], minlength=len(sizes)).astype(np.intp)
    return rows_cols, sizes


def _crop_polygons(
    found: np.ndarray,
    sizes: np.ndarray,
    crop_rows_cols: np.ndarray,
    box_origin: np.ndarray,
    origin_xy: tuple[float, float],
    scale: float,
    offset_xy: tuple[float, float],
) -> dict[int, Polygon]:
    """Snapped level-0 polygons of the contours :func:`_outer_contours` traced (see there)."""
    origin = np.asarray(origin_xy, dtype=np.float64) + box_origin[:, ::-1]  # (x, y) per crop
    # mask_polygon's arithmetic, step for step: crop (x, y) - 0.5, + crop origin, · scale, - offset.
    xy = crop_rows_cols[:, ::-1] - 0.5
    xy = (xy + np.repeat(origin, sizes, axis=0)) * scale - np.asarray(offset_xy)
    polygons = {}
    ends = np.cumsum(sizes)
    for label, polygon, end, size in zip(
        found.tolist(), _grid_polygons(xy, sizes), ends, sizes, strict=True
    ):
        if polygon is None and size >= 3:  # mask_polygon's repair of an off-grid ring
            ring = xy[end - size : end]
            polygon = snap_polygon(Polygon(np.vstack([ring, ring[:1]])))
        if polygon is not None:
            polygons[label] = polygon
    return polygons


def polygon_measurements(polygon_level0: Polygon, level0_mpp: float) -> dict[str, float]:
    """``{"Area µm^2": …, "Perimeter µm": …}`` of a polygon in level-0 pixels of ``level0_mpp``."""
    return measure_polygons([polygon_level0], level0_mpp)[0]


def measure_polygons(polygons_level0: list[Polygon], level0_mpp: float) -> list[dict[str, float]]:
    """:func:`polygon_measurements` of many polygons, by shapely's vectorised area and length."""
    areas = shapely.area(np.asarray(polygons_level0, dtype=object)).tolist()
    lengths = shapely.length(np.asarray(polygons_level0, dtype=object)).tolist()
    return [
        {AREA_KEY: area * level0_mpp**2, PERIMETER_KEY: length * level0_mpp}
        for area, length in zip(areas, lengths, strict=True)
    ]


# -------------------------------------------------------------------------------------- writer


def _measurement_value(value: float) -> float | str:
    """JSON-safe value; QuPath reads non-finite measurements as the strings NaN/Inf/-Inf."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    return value


def feature_namespace(content_sha256: str) -> uuid.UUID:
    """The uuid5 namespace of one slide's feature ids (from the slide file's SHA-256)."""
    return uuid.uuid5(CELLSEG_NAMESPACE, content_sha256)


def _polygon_json(polygon: Polygon) -> gj.Polygon:
    """GeoJSON Polygon with closed rings rounded to 2 decimals; raises on invalid output."""
    if not isinstance(polygon, Polygon):
        raise TypeError(
            f"expected a shapely Polygon (one per nucleus), got {type(polygon).__name__}"
        )
    rings = [np.round(np.asarray(r.coords), DECIMALS) + 0.0 for r in polygon.interiors]
    rings.insert(0, np.round(np.asarray(polygon.exterior.coords), DECIMALS) + 0.0)
    rounded = Polygon(rings[0], rings[1:])
    if polygon.is_empty or rounded.area <= 0 or not rounded.is_valid:
        raise ValueError(
            "refusing to write an invalid or empty polygon (QuPath would reject the whole file); "
            "pass it through geojson.snap_polygon first"
        )
    # The rings are already rounded (numpy, above): the geojson constructor's own rounding walks
    # every number in Python (about 1 ms per nucleus, a quarter of an hour per million), so the
    # Polygon is made empty and given its coordinates.
    geometry = gj.Polygon()
    geometry["coordinates"] = [ring.tolist() for ring in rings]
    return geometry


class GeoJSONWriter:
    """Stream a QuPath-ready FeatureCollection to ``path``, one Feature per :meth:`write`.

    Use as a context manager. Features go to ``<path>.partial`` while writing; a clean exit
    flushes, fsyncs and atomically renames it to ``path``; an exception deletes it, so a file
    under ``path`` is always complete. A name ending in ``.gz`` is gzip-compressed (QuPath reads
    ``.geojson.gz``). Memory use does not depend on the number of features.

    Args:
        path: output file, ``.geojson`` or ``.geojson.gz``.
        object_type: ``"detection"`` (default; QuPath handles millions), ``"cell"`` (also writes
            ``nucleusGeometry``) or ``"annotation"``.
        class_name: ``properties.classification.name``.
        color: ``properties.classification.color`` as (r, g, b) 0-255 (QuPath needs a colour to
            accept a classification object).
        id_namespace: with it, a feature written with a ``key`` gets the id
            ``uuid5(id_namespace, key)`` (:func:`feature_namespace`), so that rewriting the same
            features gives the same bytes; otherwise (or without a key) a random uuid4.
        publish: rename to ``path`` on a clean exit; False leaves the finished file at
            ``partial_path`` for the caller to rename together with its other outputs.
    """

    def __init__(
        self,
        path: str | Path,
        object_type: str = "detection",
        class_name: str = "Nucleus",
        color: tuple[int, int, int] = DEFAULT_COLOR,
        id_namespace: uuid.UUID | None = None,
        *,
        publish: bool = True,
    ) -> None:
        if object_type not in OBJECT_TYPES:
            raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
        if len(color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in color):
            raise ValueError(f"color must be three integers 0-255, got {color!r}")
        self.path = Path(path)
        # publish=False: the caller renames partial_path (with other outputs).
        self._file = AtomicFile(self.path, "wb", publish=publish)
        self.partial_path = self._file.staged
        self.publish = publish
        self.object_type = object_type
        self.classification = {"name": class_name, "color": list(color)}
        self.id_namespace = id_namespace
        self.features_written = 0
        self._raw: IO[bytes] | None = None
        self._text: io.TextIOWrapper | None = None

    def __enter__(self) -> GeoJSONWriter:
        self._raw = self._file.open()  # closed in close() or abort()
        stream: IO[bytes] = self._raw
        if self.path.suffix == ".gz":
            # mtime=0 and the final name in the header make the output reproducible.
            stream = gzip.GzipFile(
                filename=self.path.name[:-3], mode="wb", fileobj=self._raw, mtime=0
            )
        self._text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
        self._text.write('{"type":"FeatureCollection","features":[\n')
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(
        self,
        polygon: Polygon,
        measurements: Mapping[str, float] | None = None,
        *,
        cell: Polygon | None = None,
        key: str | None = None,
    ) -> str:
        """Append one Feature for ``polygon`` (level-0 QuPath pixels); return its id.

        For ``object_type="cell"`` the Feature is a QuPath cell: ``geometry`` is the ``cell``
        outline (the nucleus itself when None) and ``nucleusGeometry`` the nucleus. The id is
        ``uuid5(id_namespace, key)`` when both are given, else a random uuid4. Non-finite
        measurements are written as the strings "NaN", "Inf", "-Inf" (QuPath's convention;
        bare NaN is not JSON).

        Raises:
            ValueError: a polygon is empty or not valid after rounding to 2 decimals.
        """
        if self._text is None:
            raise RuntimeError("GeoJSONWriter.write() outside its 'with' block")
        nucleus = _polygon_json(polygon)
        if self.id_namespace is not None and key is not None:
            feature_id = str(uuid.uuid5(self.id_namespace, key))
        else:
            feature_id = str(uuid.uuid4())
        is_cell = self.object_type == "cell"
        properties = {
            "objectType": self.object_type,
            "classification": self.classification,
            "measurements": {
                str(k): _measurement_value(v) for k, v in (measurements or {}).items()
            },
        }
        geometry = _polygon_json(cell) if is_cell and cell is not None else nucleus
        feature = gj.Feature(id=feature_id, geometry=geometry, properties=properties)
        if is_cell:
            feature["nucleusGeometry"] = nucleus
        separator = ",\n" if self.features_written else ""
        text = gj.dumps(feature, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        self._text.write(separator + text)
        self.features_written += 1
        return feature_id

    def close(self) -> None:
        """Finish the collection and rename ``<path>.partial`` to ``path``.

        If finishing fails (e.g. the disk is full) the partial file is removed and the error
        propagates; ``path`` is never left incomplete.
        """
        if self._text is None or self._raw is None:
            return
        try:
            self._text.write("\n]}\n")
            self._text.flush()
            stream = self._text.detach()
            if stream is not self._raw:
                stream.close()  # writes the gzip trailer; GzipFile leaves our fileobj open
        except BaseException:
            self.abort()
            raise
        self._text = self._raw = None
        self._file.commit()  # fsync, then rename (publish); removes the partial file on failure
        log.info("wrote %d features to %s", self.features_written, self.path)

    def abort(self) -> None:
        """Discard everything written so far; nothing appears under ``path``."""
        if self._text is not None:
            try:
                self._text.close()
            except (OSError, ValueError):  # ValueError: already detached or closed
                log.debug("ignored error closing %s", self.partial_path, exc_info=True)
        self._text = self._raw = None
        self._file.abort()  # closes the file and removes it
