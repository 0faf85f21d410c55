"""Post-processing of the network's softmax output into a nucleus instance label map.

Three-class models (channels 0 background, 1 nucleus interior, 2 nucleus boundary; see
docs/ARCHITECTURE.md) are split by a marker-controlled watershed, the standard treatment of
interior/contour outputs (DCAN, Chen et al. CVPR 2016; HoVer-Net's and StarDist's watershed-style
post-processing): markers are the confident interiors, the flooded region is the nucleus mask
``p1 + p2 > fg_threshold``, and the boundary class separates touching nuclei. Two-class (binary)
models fall back to the classical distance-transform watershed of the nucleus mask.

All size parameters are physical (µm, µm²) and are converted with the map's ``mpp``, so one
``PostProcess`` works at any resolution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

__all__ = ["PostProcess", "label_instances", "nucleus_probability"]


@dataclass(frozen=True)
class PostProcess:
    """Thresholds and sizes that turn class probabilities into nucleus instances.

    Defaults are set from the MoNuSeg training masks (30 tiles, 16,958 annotated nuclei at
    0.25 µm/px): the median nucleus covers 18 µm², 2% cover less than 3 µm², 20% less than 8 µm².

    Attributes:
        fg_threshold: a pixel is nucleus where ``p1 + p2 > fg_threshold`` (the paper's 0.5).
        marker_threshold: watershed markers are connected components of ``p1 > marker_threshold``
            (distance-head models: of the distance map ``d > marker_threshold``).
        min_marker_area_um2: markers smaller than this are discarded as noise (1 µm² = 4 px at
            0.5 µm/px). A small nucleus whose only marker is dropped is not lost: an unmarked
            foreground component still becomes one instance.
        min_area_um2: final objects smaller than this are removed. 3 µm² (12 px at 0.5 µm/px)
            drops speckle while keeping 98% of annotated MoNuSeg nuclei; a larger value such as
            8 µm² would delete one annotated nucleus in five.
        fill_holes: fill holes enclosed by a single instance (pale vesicular nuclei).
        min_peak_distance_um: two-class fallback only; minimum distance between two seeds of the
            distance-transform watershed. 2 µm is a little under the radius of the median nucleus
            (18 µm² ≈ a disc of radius 2.4 µm), so two touching nuclei keep separate seeds.
        distance_sigma_um: two-class fallback only; Gaussian smoothing of the distance transform
            before seeds are searched. It flattens the pixel-scale bumps along the ridge of
            elongated nuclei, which otherwise each become a seed (a 16×4 µm ellipse falls apart
            into several pieces without it). Splitting the ground-truth foreground of six MoNuSeg
            training tiles, 2 µm / 0.5 µm gave AJI 0.87 / 0.85 and PQ 0.91 / 0.90 at 0.25 / 0.5
            µm/px, the best of the settings tried (2.5 µm without smoothing: AJI 0.85 / 0.82,
            PQ 0.89 / 0.85).
    """

    fg_threshold: float = 0.5
    marker_threshold: float = 0.5
    min_marker_area_um2: float = 1.0
    min_area_um2: float = 3.0
    fill_holes: bool = True
    min_peak_distance_um: float = 2.0
    distance_sigma_um: float = 0.5

    def __post_init__(self) -> None:
        for name in ("fg_threshold", "marker_threshold"):
            value = getattr(self, name)
            if not (_is_real(value) and 0.0 <= value < 1.0):
                raise ValueError(f"PostProcess.{name} must be a number in [0, 1), got {value!r}")
        sizes = (
            "min_marker_area_um2",
            "min_area_um2",
            "min_peak_distance_um",
            "distance_sigma_um",
        )
        for name in sizes:
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value) and value >= 0.0):
                raise ValueError(f"PostProcess.{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.fill_holes, bool):
            raise ValueError(
                f"PostProcess.fill_holes must be true or false, got {self.fill_holes!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict, as stored in a checkpoint's ``meta["postprocess"]``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PostProcess:
        """Rebuild from :meth:`to_dict` output; missing keys take their defaults.

        Raises:
            ValueError: on an unknown key (naming it and the valid ones) or an invalid value.
                Callers that read a file (the checkpoint loader) re-raise it naming the file.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"post-processing parameters must be a mapping, got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown post-processing key(s) {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(known))}"
            )
        # JSON writes 3.0 as 3 in some tools: accept ints for the float fields.
        coerced = {
            key: float(value) if key != "fill_holes" and _is_real(value) else value
            for key, value in values.items()
        }
        return cls(**coerced)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _validate_probs(probs: np.ndarray, mpp: float) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[0] not in (2, 3, 4):
        raise ValueError(f"probs must be C×H×W with C = 2, 3 or 4, got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probs must be floating-point probabilities, got dtype {probs.dtype}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    return probs.astype(np.float32, copy=False)


def nucleus_probability(probs: np.ndarray) -> np.ndarray:
    """Nucleus probability ``1 - p0`` (= ``p1 + p2`` for three classes) of a softmax output.

    Args:
        probs: ``C×H×W`` float softmax probabilities, channel 0 = background.

    Returns:
        ``H×W`` float32 in [0, 1].
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be C×H×W, got shape {probs.shape}")
    return np.clip(1.0 - probs[0].astype(np.float32), 0.0, 1.0)


def _area_px(area_um2: float, mpp: float) -> float:
    return area_um2 / (mpp * mpp)


def _remove_small(labels: np.ndarray, min_area_px: float) -> np.ndarray:
    """Zero every labelled object with fewer than ``min_area_px`` pixels (in place, returned)."""
    if min_area_px <= 1 or labels.max() == 0:
        return labels
    too_small = np.bincount(labels.ravel()) < min_area_px
    too_small[0] = False
    labels[too_small[labels]] = 0
    return labels


def _interior_markers(
    interior: np.ndarray, mask: np.ndarray, params: PostProcess, mpp: float
) -> np.ndarray:
    """``H×W`` int32 markers: 4-connected components of the confident interior inside the mask.

    4-connectivity keeps interiors that touch only at a corner apart.
    """
    markers, _ = ndi.label((interior > params.marker_threshold) & mask)
    return _remove_small(markers, _area_px(params.min_marker_area_um2, mpp))


def _smoothed_distance(mask: np.ndarray, params: PostProcess, mpp: float) -> np.ndarray:
    """``H×W`` float32 Euclidean distance to the background (px), Gaussian-smoothed."""
    distance = ndi.distance_transform_edt(mask).astype(np.float32)
    sigma_px = params.distance_sigma_um / mpp
    return ndi.gaussian_filter(distance, sigma_px) if sigma_px > 0 else distance


def _distance_markers(
    mask: np.ndarray, distance: np.ndarray, params: PostProcess, mpp: float
) -> np.ndarray:
    """``H×W`` int32 markers: one per peak of ``distance`` (see :func:`_smoothed_distance`).

    Peaks closer than ``min_peak_distance_um`` are merged into the highest one, searched
    separately in every foreground component: the result of ``skimage.feature.peak_local_max(
    distance, min_distance, labels=components, exclude_border=False)``, markers numbered in its
    order, computed for all components at once (:func:`component_peaks`).
    """
    components, _ = ndi.label(mask)
    min_distance_px = max(1, round(params.min_peak_distance_um / mpp))
    peaks_yx = component_peaks(distance, components, min_distance_px)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks_yx.T)] = np.arange(1, len(peaks_yx) + 1, dtype=np.int32)
    return markers


def component_peaks(image: np.ndarray, labels: np.ndarray, min_distance_px: int) -> np.ndarray:
    """``K×2`` intp ``(y, x)`` peaks of ``image`` (``H×W`` float) in every labelled component.

    Identical to ``skimage.feature.peak_local_max(image, min_distance_px, labels=labels,
    exclude_border=False)`` (scikit-image 0.19-0.26, tested against it), which crops and filters
    each component in turn, a Python loop that took 60 % of the watershed's time on tissue with
    thousands of nuclei. Here with a few whole-image passes:

    - a pixel is a candidate when it is above ``image.min()`` and no pixel of its own component
      within ``min_distance_px`` (Chebyshev) is higher. Where no other component is that close
      (nearly everywhere), one masked maximum filter answers it; the few pixels that have a
      neighbouring component in their window compare with each offset of the window instead.
    - a component whose pixels are all candidates (a plateau) keeps only its pixels that a
      binary opening removes, as skimage does.
    - candidates closer than ``min_distance_px`` to an earlier kept one of the same component
      are dropped, in the order: component, height (descending), raster position. Two such
      candidates are always equally high (each is the maximum of a window holding the other),
      so only ties need the greedy pass, which runs on those few points alone.

    Args:
        image: ``H×W`` float elevation (e.g. the smoothed distance transform).
        labels: ``H×W`` int components, 0 = background.
        min_distance_px: window radius and minimum peak spacing (>= 1).

    Returns:
        the peaks ordered by component, then by decreasing height, then raster position.
    """
    image = np.asarray(image)
    radius = int(min_distance_px)
    if not labels.any():
        return np.empty((0, 2), dtype=np.intp)
    labels = labels.astype(np.int32, copy=False)
    foreground = labels > 0
    low = np.finfo(image.dtype).min if np.issubdtype(image.dtype, np.floating) else image.min()
    masked = np.where(foreground, image, low)
    size = 2 * radius + 1
    window_max = ndi.maximum_filter(masked, size=size, mode="nearest")
    is_max = foreground & (image == window_max)
    # pixels with another component in their window: the masked filter may have seen it
    mixed = foreground & (
        (ndi.maximum_filter(labels, size=size, mode="nearest") != labels)
        | (ndi.minimum_filter(np.where(foreground, labels, labels.max() + 1), size=size) != labels)
    )
    if mixed.any():
        is_max[mixed] = _is_component_max(image, labels, np.flatnonzero(mixed), radius)
    candidates = _plateau_rule(labels, foreground, is_max) & (image > image.min())
    flat = np.flatnonzero(candidates)
    owner, height = labels.ravel()[flat], image.ravel()[flat]
    order = np.lexsort((flat, -height, owner))
    flat, owner = flat[order], owner[order]
    if radius > 1:
        keep = _spaced(np.column_stack(np.unravel_index(flat, image.shape)), owner, radius)
        flat = flat[keep]
    return np.column_stack(np.unravel_index(flat, image.shape)).astype(np.intp)


def _is_component_max(
    image: np.ndarray, labels: np.ndarray, flat: np.ndarray, radius: int
) -> np.ndarray:
    """For the pixels ``flat`` (flat indices): is none of their component's pixels within
    ``radius`` (Chebyshev, inside the image) higher?"""
    height, width = image.shape
    y, x = np.unravel_index(flat, image.shape)
    value, owner = image.ravel()[flat], labels.ravel()[flat]
    higher = np.zeros(len(flat), dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx == 0:
                continue
            ny, nx = y + dy, x + dx
            inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
            index = np.where(inside, ny * width + nx, 0)
            higher |= inside & (labels.ravel()[index] == owner) & (image.ravel()[index] > value)
    return ~higher


def _plateau_rule(labels: np.ndarray, foreground: np.ndarray, is_max: np.ndarray) -> np.ndarray:
    """``is_max``, except in components whose every pixel is a window maximum (a plateau):
    there only the pixels that a binary opening of the component removes, as skimage does.

    The opening only looks at 4-neighbours, which belong to the same component, so each
    plateau is opened in its own box (they are few and small: mostly single pixels).
    """
    sizes = np.bincount(labels.ravel())
    not_max = np.bincount(labels[foreground & ~is_max], minlength=len(sizes))
    plateau = (not_max == 0) & (sizes > 0)
    plateau[0] = False
    if not plateau.any():
        return is_max
    result = is_max.copy()
    plateau_labels = np.where(plateau[labels], labels, 0)
    height, width = labels.shape
    for index, box in enumerate(ndi.find_objects(plateau_labels)):
        if box is None:
            continue
        rows = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, height))
        cols = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, width))
        own = plateau_labels[rows, cols] == index + 1
        result[rows, cols] = np.where(own, own & ~ndi.binary_opening(own), result[rows, cols])
    return result


def _spaced(yx: np.ndarray, owner: np.ndarray, radius: int) -> np.ndarray:
    """``K`` bool: greedy spacing of ordered points (``K×2``), as ``skimage``'s
    ``ensure_spacing``: a point is dropped when an earlier kept point of the same component lies
    closer than ``radius`` (Chebyshev)."""
    from scipy.spatial import cKDTree

    keep = np.ones(len(yx), dtype=bool)
    if len(yx) < 2:
        return keep
    pairs = cKDTree(yx).query_pairs(r=radius - 1, p=np.inf, output_type="ndarray")
    pairs = pairs[owner[pairs[:, 0]] == owner[pairs[:, 1]]]
    if len(pairs) == 0:
        return keep
    pairs.sort(axis=1)  # (earlier, later) in the greedy order
    later_of: dict[int, list[int]] = {}
    for earlier, later in pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))].tolist():
        later_of.setdefault(earlier, []).append(later)
    for earlier in sorted(later_of):
        if keep[earlier]:
            keep[later_of[earlier]] = False
    return keep


def _label_unmarked(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give each foreground component that the watershed did not reach its own new label.

    skimage's watershed leaves mask components without a marker at 0; they are still nuclei
    (e.g. small or faint ones whose interior never passed the marker threshold).
    """
    unmarked, count = ndi.label(mask & (labels == 0))
    if count:
        labels[unmarked > 0] = unmarked[unmarked > 0] + labels.max()
    return labels


def _enclosed_background(labels: np.ndarray) -> np.ndarray:
    """``H×W`` bool: background pixels not 4-connected to the image edge through background.

    The same pixels as ``binary_fill_holes(labels > 0) & (labels == 0)``, from one labelling
    of the background instead of an iterated dilation (several times faster on large maps).
    """
    background, count = ndi.label(labels == 0)
    reaches_edge = np.zeros(count + 1, dtype=bool)
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        reaches_edge[edge] = True
    reaches_edge[0] = True  # component 0 is the foreground
    return ~reaches_edge[background]


def _box_corners(boxes: list[tuple[slice, slice] | None]) -> np.ndarray:
    """``N×4`` intp ``(y0, y1, x0, x1)`` of ``ndi.find_objects`` boxes; absent ones are empty."""
    corners = [
        (box[0].start, box[0].stop, box[1].start, box[1].stop) if box else (0, 0, 0, 0)
        for box in boxes
    ]
    return np.array(corners, dtype=np.intp).reshape(-1, 4)


def _interior_hits(corners_yyxx: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """``N`` bool: does box n, without its outermost rows and columns, hold a marked pixel?

    All boxes at once, from a summed-area table of ``marked`` (``H×W`` bool).
    """
    dtype = np.int32 if marked.size < np.iinfo(np.int32).max else np.int64
    table = np.zeros((marked.shape[0] + 1, marked.shape[1] + 1), dtype=dtype)
    table[1:, 1:] = marked
    np.cumsum(table, axis=0, out=table)
    np.cumsum(table, axis=1, out=table)
    y0, x0 = corners_yyxx[:, 0] + 1, corners_yyxx[:, 2] + 1
    y1 = np.maximum(corners_yyxx[:, 1] - 1, y0)
    x1 = np.maximum(corners_yyxx[:, 3] - 1, x0)
    return table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0] > 0


def _mosaic_holes(
    labels: np.ndarray, ids: np.ndarray, corners_yyxx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Holes of many instances with one ``ndi.label`` call: ``(flat pixel index, instance id)``.

    Instance ``ids[n]``'s holes are the background pixels of the components of ``labels !=
    ids[n]`` inside its box ``corners_yyxx[n]`` that do not touch the box's border, i.e. what
    ``binary_fill_holes(crop == id)`` adds. The boxes' contents are stacked into one mosaic,
    the width of the widest box, one empty row after each box so their components stay apart.
    """
    height = corners_yyxx[:, 1] - corners_yyxx[:, 0]
    width = corners_yyxx[:, 3] - corners_yyxx[:, 2]
    box_of_row = np.repeat(np.arange(len(ids)), height + 1)
    first_row = np.cumsum(height + 1) - (height + 1)
    row_in_box = np.arange(len(box_of_row)) - first_row[box_of_row]
    col = np.arange(width.max())
    inside = (row_in_box < height[box_of_row])[:, None] & (col < width[box_of_row][:, None])
    source = (corners_yyxx[box_of_row, 0] + row_in_box)[:, None] * labels.shape[1] + (
        corners_yyxx[box_of_row, 2][:, None] + col
    )
    values = np.where(inside, labels.ravel()[np.where(inside, source, 0)], 0)
    owner = ids[box_of_row][:, None]
    components, _ = ndi.label(inside & (values != owner))
    on_border = inside & (
        (row_in_box == 0)[:, None]
        | (row_in_box == height[box_of_row] - 1)[:, None]
        | (col == 0)
        | (col == width[box_of_row][:, None] - 1)
    )
    open_components = np.zeros(components.max() + 1, dtype=bool)
    open_components[components[on_border]] = True
    open_components[0] = True
    holes = ~open_components[components] & (values == 0)
    return source[holes], np.broadcast_to(owner, holes.shape)[holes]


_MOSAIC_PX = 1 << 21  # pixels per mosaic: bounds the temporaries of one call to ~60 MB


def _mosaic_chunks(ids: np.ndarray, corners_yyxx: np.ndarray) -> list[np.ndarray]:
    """Split instance ids into the mosaics of :func:`_mosaic_holes`.

    Boxes of similar width (the same power of two) share a mosaic, so narrow boxes are not
    padded to the widest one; a mosaic takes boxes until it has about ``_MOSAIC_PX`` pixels.
    """
    boxes = corners_yyxx[ids - 1]
    width_class = np.ceil(np.log2(boxes[:, 3] - boxes[:, 2])).astype(np.int64)
    chunks = []
    for group in np.unique(width_class):
        chosen = ids[width_class == group]
        rows = boxes[width_class == group, 1] - boxes[width_class == group, 0] + 1
        mosaic = np.cumsum(rows << group) // _MOSAIC_PX  # pixels stacked so far // limit
        chunks.extend(chosen[mosaic == m] for m in np.unique(mosaic))
    return chunks


def _fill_instance_holes(labels: np.ndarray) -> np.ndarray:
    """Fill background holes enclosed by one instance with that instance (in place, returned).

    Instance ``i``'s holes are the background pixels of the bounded components of
    ``labels != i`` in its bounding box (``binary_fill_holes`` of the instance's crop). Filled
    one instance at a time in label order, as this function once did, a pixel enclosed by
    several instances goes to the lowest label; that is the result here too, computed for all
    instances at once (:func:`_mosaic_holes`). A hole pixel is background that cannot reach the
    image edge through background (:func:`_enclosed_background`) strictly inside the instance's
    box, so only instances whose box interior holds one are looked at: a map of speckle (10⁵
    objects, as a random-weight model gives) costs a few array passes, not 10⁵ calls.
    """
    enclosed = _enclosed_background(labels)
    if not enclosed.any():
        return labels
    corners = _box_corners(ndi.find_objects(labels))
    ids = np.flatnonzero(_interior_hits(corners, enclosed)) + 1
    if len(ids) == 0:
        return labels
    found = [
        _mosaic_holes(labels, chunk, corners[chunk - 1]) for chunk in _mosaic_chunks(ids, corners)
    ]
    pixels = np.concatenate([f[0] for f in found])
    owners = np.concatenate([f[1] for f in found])
    first = np.lexsort((owners, pixels))  # per pixel, the lowest enclosing label first
    keep = np.ones(len(first), dtype=bool)
    keep[1:] = pixels[first[1:]] != pixels[first[:-1]]
    labels[np.unravel_index(pixels[first[keep]], labels.shape)] = owners[first[keep]]
    return labels


def _remove_small_and_renumber(labels: np.ndarray, min_area_px: float) -> np.ndarray:
    """``H×W`` int32: objects of at least ``min_area_px`` pixels renumbered 1..N in label order.

    One lookup table does both steps (the result of ``_remove_small`` then
    ``skimage.segmentation.relabel_sequential``).
    """
    counts = np.bincount(labels.ravel())
    keep = counts >= min_area_px if min_area_px > 1 else counts > 0
    keep[0] = False
    lookup = np.zeros(len(counts), dtype=np.int32)
    lookup[keep] = np.arange(1, np.count_nonzero(keep) + 1, dtype=np.int32)
    return lookup[labels]


def flood_order(elevation: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``H×W`` float64 ranks of the mask pixels by ``(elevation, row, column)``; 0 elsewhere.

    skimage's watershed floods by elevation and breaks ties by the order pixels entered its
    queue, which depends on the whole flood so far, i.e. on the window being labelled. With
    every mask pixel given a distinct rank, in an order that depends only on the values and
    on the pixels' relative positions (raster order is the same in every window that holds
    them), the flood has no ties: a nucleus seen whole by two windows (two region sizes, an
    ROI and the whole slide) gets the same pixels in both (issue 11, dense tissue).
    """
    flat = np.flatnonzero(mask)
    if mask.size >= 1 << 32:
        raise ValueError(f"flood_order: a window of {mask.size} px is too large")
    # One uint64 key per pixel: the float32 value's bits made monotonic (sign flipped for
    # positive values, all bits for negative ones), then the raster index. Sorting unique keys
    # needs no stable sort, and numpy's integer sort is several times faster than argsort.
    bits = np.ascontiguousarray(elevation, dtype=np.float32).ravel()[flat].view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    bits = np.where(negative, ~bits, bits | np.uint32(0x80000000))
    keys = (bits.astype(np.uint64) << np.uint64(32)) | flat.astype(np.uint64)
    keys.sort()
    ranks = np.zeros(mask.size, dtype=np.float64)
    order = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    ranks[order] = np.arange(1, len(flat) + 1, dtype=np.float64)
    return ranks.reshape(mask.shape)


def label_instances(probs: np.ndarray, mpp: float, params: PostProcess | None = None) -> np.ndarray:
    """Turn softmax probabilities into an instance label map by marker-controlled watershed.

    Three channels (background, interior, boundary): markers are the components of
    ``p1 > marker_threshold`` (small ones dropped), the flooded mask is ``p1 + p2 > fg_threshold``
    and the elevation is ``1 - p1``, so floods spread from confident interiors and meet inside
    the boundary class. Four channels (the three classes, then a distance-head model's
    normalised distance map ``d``, issue 10 point 4): the same mask, markers from
    ``d > marker_threshold`` and elevation ``1 - d``, so floods spread from each nucleus's core
    and meet where the regressed distance is lowest. Two channels (background, nucleus): the mask
    is ``p1 > fg_threshold`` and the markers are peaks of its smoothed distance transform
    (elevation ``-distance``).
    In both cases foreground components without a marker become one instance each, holes are
    filled (``fill_holes``), objects below ``min_area_um2`` are removed and labels are renumbered.

    Args:
        probs: ``C×H×W`` float probabilities, ``C`` = 3, 4 (with the distance map) or 2.
        mpp: resolution of ``probs`` in µm per pixel (converts the µm/µm² parameters to pixels).
        params: post-processing parameters; ``PostProcess()`` when omitted.

    Returns:
        ``H×W`` int32 label map: 0 background, nuclei numbered 1..N without gaps.
    """
    params = params or PostProcess()
    probs = _validate_probs(probs, mpp)
    mask = nucleus_probability(probs) > params.fg_threshold
    if probs.shape[0] >= 3:
        core = probs[3] if probs.shape[0] == 4 else probs[1]
        markers = _interior_markers(core, mask, params, mpp)
        elevation = 1.0 - core
    else:
        distance = _smoothed_distance(mask, params, mpp)
        markers = _distance_markers(mask, distance, params, mpp)
        elevation = -distance
    labels = watershed(flood_order(elevation, mask), markers, mask=mask).astype(np.int32)
    labels = _label_unmarked(labels, mask)
    if params.fill_holes:
        labels = _fill_instance_holes(labels)
    return _remove_small_and_renumber(labels, _area_px(params.min_area_um2, mpp))
