"""Nucleus outlines as QuPath-ready GeoJSON (QuPath 0.4-0.7 contract, PEERS.md §6).

Three pieces:

* :func:`mask_polygon` turns one instance mask into a valid level-0 polygon that survives QuPath's
  0.01 px precision reduction (v0.6+ rejects the WHOLE file when one geometry is invalid);
* :class:`GeoJSONWriter` streams a FeatureCollection, one Feature per nucleus, to a temporary
  file that is renamed into place only when complete (``.gz`` names are gzip-compressed);
* :func:`polygon_measurements` gives area and perimeter under the names QuPath shows.

Pixel convention: mask pixel (c, r) covers the square [c, c+1) × [r, r+1) of the mask raster, so
the mask's top-left pixel corner is at (0, 0) and level-0 coordinates are
``x0 = (x + origin_x) · scale − offset_x`` (likewise y). Outlines are marching-squares contours at
level 0.5 (scikit-image), which pass through the midpoints of pixel edges: straight runs lie exactly
on pixel edges and each convex corner is cut by a triangle of 1/8 px², so an n×n square has bounds
exactly [0, n]² and area n² − 0.5, and an isolated pixel is a diamond of area 0.5 px². This follows
the pixel outline more smoothly than a staircase does (QuPath draws it as is) while staying inside
the pixel-edge polygon.

Holes are filled (only the outer contour is kept): nuclei are simply connected, and a hole in a
predicted mask is a thresholding artefact (pale chromatin), which QuPath's own cell detection fills
too. It also keeps every ring a plain, valid exterior.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from skimage import measure

log = logging.getLogger(__name__)

GRID_PX = 0.01  # QuPath ≥ 0.6 reduces geometries to PrecisionModel(-0.01), i.e. a 0.01 px grid
DECIMALS = 2
OBJECT_TYPES = ("detection", "cell", "annotation")
DEFAULT_COLOR = (220, 40, 40)
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
    """Polygon from a closed ring rounded to the 0.01 grid, or None if it is not valid there.

    Collinear and repeated vertices are dropped (marching squares emits one vertex per pixel
    edge), exactly, by integer cross products on the grid; the ring is made counter-clockwise
    (RFC 7946). A valid polygon whose vertices are on the grid is left unchanged by QuPath's
    precision reduction.
    """
    grid = np.rint(np.asarray(ring_xy[:-1], dtype=np.float64) / GRID_PX).astype(np.int64)
    before, after = np.roll(grid, 1, axis=0), np.roll(grid, -1, axis=0)
    incoming, outgoing = grid - before, after - grid
    turns = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]
    grid = grid[turns != 0]
    if len(grid) < 3:
        return None
    ring = np.round(np.vstack([grid, grid[:1]]) * GRID_PX, DECIMALS) + 0.0  # -0.0 -> 0.0
    if _signed_area(ring) < 0:
        ring = ring[::-1]
    polygon = Polygon(ring)
    return polygon if polygon.is_valid and polygon.area > 0 else None


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


def polygon_measurements(polygon_level0: Polygon, level0_mpp: float) -> dict[str, float]:
    """``{"Area µm^2": …, "Perimeter µm": …}`` of a polygon in level-0 pixels of ``level0_mpp``."""
    return {
        AREA_KEY: float(polygon_level0.area) * level0_mpp**2,
        PERIMETER_KEY: float(polygon_level0.length) * level0_mpp,
    }


# -------------------------------------------------------------------------------------- writer


def _measurement_value(value: float) -> float | str:
    """JSON-safe value; QuPath reads non-finite measurements as the strings NaN/Inf/-Inf."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    return value


def _polygon_json(polygon: Polygon) -> dict[str, Any]:
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
    return {"type": "Polygon", "coordinates": [ring.tolist() for ring in rings]}


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
    """

    def __init__(
        self,
        path: str | Path,
        object_type: str = "detection",
        class_name: str = "Nucleus",
        color: tuple[int, int, int] = DEFAULT_COLOR,
    ) -> None:
        if object_type not in OBJECT_TYPES:
            raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
        if len(color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in color):
            raise ValueError(f"color must be three integers 0-255, got {color!r}")
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.object_type = object_type
        self.classification = {"name": class_name, "color": list(color)}
        self.features_written = 0
        self._raw: IO[bytes] | None = None
        self._text: io.TextIOWrapper | None = None

    def __enter__(self) -> GeoJSONWriter:
        self._raw = open(self.partial_path, "wb")  # closed in close() or abort()
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

    def write(self, polygon: Polygon, measurements: Mapping[str, float] | None = None) -> str:
        """Append one Feature for ``polygon`` (level-0 QuPath pixels); return its uuid4 id.

        Non-finite measurements are written as the strings "NaN", "Inf", "-Inf" (QuPath's
        convention; bare NaN is not JSON).

        Raises:
            ValueError: the polygon is empty or not valid after rounding to 2 decimals.
        """
        if self._text is None:
            raise RuntimeError("GeoJSONWriter.write() outside its 'with' block")
        geometry = _polygon_json(polygon)
        feature_id = str(uuid.uuid4())
        feature: dict[str, Any] = {"type": "Feature", "id": feature_id, "geometry": geometry}
        if self.object_type == "cell":
            feature["nucleusGeometry"] = geometry
        feature["properties"] = {
            "objectType": self.object_type,
            "classification": self.classification,
            "measurements": {
                str(k): _measurement_value(v) for k, v in (measurements or {}).items()
            },
        }
        separator = ",\n" if self.features_written else ""
        text = json.dumps(feature, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
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
            self._raw.flush()
            os.fsync(self._raw.fileno())  # the rename must not publish unwritten data
            self._raw.close()
        except BaseException:
            self.abort()
            raise
        self._text = self._raw = None
        os.replace(self.partial_path, self.path)
        log.info("wrote %d features to %s", self.features_written, self.path)

    def abort(self) -> None:
        """Discard everything written so far; nothing appears under ``path``."""
        for stream in (self._text, self._raw):
            if stream is not None:
                try:
                    stream.close()
                except (OSError, ValueError):  # ValueError: already detached or closed
                    log.debug("ignored error closing %s", self.partial_path, exc_info=True)
        self._text = self._raw = None
        self.partial_path.unlink(missing_ok=True)
