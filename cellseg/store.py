"""The OME-Zarr (OME-NGFF 0.4, Zarr v2) image that whole-slide prediction writes, region by region.

Layout (all arrays ``y×x`` at the model's resolution, the *canvas* of :mod:`cellseg.tiling`,
chunked ``chunk_px²`` and compressed with Blosc zstd + bit-shuffle, which suits both
probabilities and sparse instance ids)::

    slide.zarr/                 multiscales: the nucleus probability pyramid
        0, 1, 2, ...            uint8 ``(p1 + p2)·255`` (``1 - p0``), rounded; level k is
                                level 0 downsampled 2^k times (2×2 means)
        labels/nuclei/0, 1, ... uint32 instance ids, 0 = background (image-label); id ``k`` is
                                the GeoJSON feature whose ``Label`` measurement is ``k``;
                                levels by nearest-neighbour (ids are never blended)

NGFF 0.4 (Zarr v2, ``/`` chunk keys) is the version that napari-ome-zarr, QuPath's OME-Zarr
reader (Bio-Formats) and ome-zarr-py all open today (docs/NOTES.md, "OME-Zarr"). Axes are
``y, x`` in micrometres; level k's ``scale`` is ``mpp·2^k``.

While the slide is written, level 0 only exists, plus working arrays deleted at the end:
``background_f32`` and ``interior_f32`` (the blended float32 ``p0`` and, for three-class models,
``p1``: each region's window is labelled from these lossless copies, never from the uint8
pyramid, so the nuclei do not depend on where the regions fall; issue 11: on CMU-1-Small-Region
at 0.5 µm/px they take 25 MB for 6.6 Mpx, about 4 bytes per canvas pixel, against 2 MB for the
uint8 interior copy they replace) and ``rgb`` (the
slide's pixels at the model's resolution, ``y×x×3`` uint8, for the nucleus measurements of
:mod:`cellseg.measurements`). With ``chunk_px`` equal to the
block size (``predict``'s default) each block's probabilities are whole chunks, written once
(:meth:`PredictionStore.write_cells`). The pyramid levels are built by :meth:`finish`, chunk by
chunk from the level below, so nothing larger than a region's window is ever held in memory.

The group's attributes keep cellseg's provenance and geometry (``mpp``, ``scale_to_level0``,
``origin_xy_level0``, ``bounds_xy``, ...) beside ``multiscales``, and ``complete`` (false while
being written).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from .journal import _test_hook
from .tiling import Box

NGFF_VERSION = "0.4"
LABEL_NAME = "nuclei"
PROBABILITY = "0"  # level 0 of the image pyramid
LABELS = f"labels/{LABEL_NAME}/0"  # level 0 of the label pyramid
BACKGROUND = "background_f32"  # working arrays, deleted by finish()
INTERIOR = "interior_f32"
DISTANCE = "distance_f32"  # distance-head models: channel 3, the normalised distance map
PIXELS = "rgb"
WORKING_ARRAYS = (BACKGROUND, INTERIOR, DISTANCE, PIXELS)
MIN_LEVEL_PX = 256  # the pyramid goes down until the longest side is at most this
_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
# The working rgb array is written once and read a few times: speed over size.
_FAST_COMPRESSOR = numcodecs.Blosc(cname="lz4", clevel=1, shuffle=numcodecs.Blosc.NOSHUFFLE)
_CHUNK_KEYS = {"name": "v2", "separator": "/"}  # NGFF 0.4 nested chunk keys


def to_uint8(probability: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``round(p·255)``."""
    return np.rint(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)


class PredictionStore:
    """Read/write access to a prediction group: :meth:`create` a new one, :meth:`open` to resume.

    Attributes:
        path: the group's folder.
        has_labels: whether ``labels/nuclei`` is written (only when the user asked for a Zarr).
        has_interior: whether ``interior_f32`` exists (three-class models).
        has_distance: whether ``distance_f32`` exists (distance-head models, four channels).
        has_float: whether the float32 working probabilities exist (until :meth:`finish`).
        has_pixels: whether the working ``rgb`` array exists (until :meth:`finish`).
    """

    def __init__(
        self,
        path: Path,
        group: zarr.Group,
        output_box: Box | None = None,
        arrays: dict[str, zarr.Array] | None = None,
    ) -> None:
        self.path = Path(path)
        self.group = group
        # Canvas box that the image and labels cover (an ROI inside a larger canvas of whole
        # tiles); the working arrays cover the whole canvas. None: the whole canvas.
        self.output_box = output_box
        # Opened once: looking an array up in the group reads its metadata from disk each time.
        # ``arrays``: the ones :meth:`create` just made (no need to read them back).
        self._arrays = (
            arrays
            if arrays is not None
            else {
                name: group[name]
                for name in (PROBABILITY, LABELS, BACKGROUND, INTERIOR, DISTANCE, PIXELS)
                if _has(group, name)
            }
        )
        self.has_labels = LABELS in self._arrays
        self.has_float = BACKGROUND in self._arrays
        self.has_interior = INTERIOR in self._arrays
        self.has_distance = DISTANCE in self._arrays
        self.has_pixels = PIXELS in self._arrays

    @classmethod
    def create(
        cls,
        path: Path,
        canvas_hw: tuple[int, int],
        *,
        num_classes: int,
        with_labels: bool,
        chunk_px: int = 1024,
        attrs: dict[str, Any] | None = None,
        output_box: Box | None = None,
    ) -> PredictionStore:
        """A new, empty group at ``path`` (replacing whatever was there).

        ``output_box``: the canvas box that the probability image and the labels cover (the
        ROI); the working arrays always cover the ``canvas_hw`` canvas. None: the canvas.
        """
        shutil.rmtree(path, ignore_errors=True)
        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        chunks = (min(chunk_px, canvas_hw[0]), min(chunk_px, canvas_hw[1]))
        out_hw = _box_hw(output_box) if output_box is not None else tuple(canvas_hw)
        out_chunks = (min(chunk_px, out_hw[0]), min(chunk_px, out_hw[1]))
        arrays = {PROBABILITY: _create(group, PROBABILITY, out_hw, out_chunks, "uint8")}
        if with_labels:
            arrays[LABELS] = _create(group, LABELS, out_hw, out_chunks, "uint32")
        names = [(BACKGROUND, "float32")]
        if num_classes >= 3:
            names.append((INTERIOR, "float32"))
        if num_classes == 4:
            names.append((DISTANCE, "float32"))
        for name, dtype in names:
            arrays[name] = _create(group, name, canvas_hw, chunks, dtype)
        # White outside the tissue tiles that are read: optical density 0 there.
        arrays[PIXELS] = _create(
            group, PIXELS, (*canvas_hw, 3), (*chunks, 3), "uint8", 255, _FAST_COMPRESSOR
        )
        # One metadata write: ``attrs.update`` rewrites .zattrs once per key (19 writes, most of
        # the cost of a small tile's evaluation).
        group.update_attributes({**(attrs or {}), "complete": False})
        return cls(path, group, output_box, arrays)

    @classmethod
    def open(
        cls, path: Path, canvas_hw: tuple[int, int], output_box: Box | None = None
    ) -> PredictionStore | None:
        """Reopens a partial group for resuming; None when missing or of another shape."""
        out_hw = _box_hw(output_box) if output_box is not None else tuple(canvas_hw)
        try:
            group = zarr.open_group(str(path), mode="r+", zarr_format=2)
            if tuple(group[PROBABILITY].shape) != out_hw:
                return None
            if _has(group, BACKGROUND) and tuple(group[BACKGROUND].shape) != tuple(canvas_hw):
                return None
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.BaseZarrError):
            return None
        return cls(path, group, output_box)

    def _output_part(self, box: Box) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
        """``(array slices, slices into the box's data)`` of the part of a canvas box inside
        the output box, or None when they do not meet."""
        if self.output_box is None:
            y0, y1, x0, x1 = box
            return (slice(y0, y1), slice(x0, x1)), (slice(0, y1 - y0), slice(0, x1 - x0))
        oy0, oy1, ox0, ox1 = self.output_box
        y0, y1 = max(box[0], oy0), min(box[1], oy1)
        x0, x1 = max(box[2], ox0), min(box[3], ox1)
        if y0 >= y1 or x0 >= x1:
            return None
        target = (slice(y0 - oy0, y1 - oy0), slice(x0 - ox0, x1 - ox0))
        source = (slice(y0 - box[0], y1 - box[0]), slice(x0 - box[2], x1 - box[2]))
        return target, source

    def _write_output(self, name: str, box: Box, values: np.ndarray) -> None:
        part = self._output_part(box)
        if part is not None:
            self._arrays[name][part[0]] = values[part[1]]

    def write_probabilities(self, box: Box, probs: np.ndarray) -> None:
        """Stores final ``C×h×w`` probabilities of a canvas box."""
        y0, y1, x0, x1 = box
        self._write_output(PROBABILITY, box, to_uint8(1.0 - probs[0]))
        self._arrays[BACKGROUND][y0:y1, x0:x1] = probs[0]
        if self.has_interior:
            self._arrays[INTERIOR][y0:y1, x0:x1] = probs[1]
        if self.has_distance:
            self._arrays[DISTANCE][y0:y1, x0:x1] = probs[3]

    def write_cells(self, cells: Sequence[tuple[Box, np.ndarray]]) -> None:
        """Stores the final ``C×h×w`` probabilities of disjoint canvas boxes (a block's cells).

        Cells that exactly tile their bounding box (the block's core, except in a resumed run)
        are assembled and written as one box: each Zarr chunk is then compressed once instead of
        read, merged and rewritten once per cell, which is several times faster. Other cells are
        written one by one.
        """
        if not cells:
            return
        y0, y1, x0, x1 = _bounding_box([box for box, _ in cells])
        area = sum((b[1] - b[0]) * (b[3] - b[2]) for b, _ in cells)
        if area != (y1 - y0) * (x1 - x0):
            for box, probs in cells:
                self.write_probabilities(box, probs)
            return
        background = np.empty((y1 - y0, x1 - x0), np.float32)
        interior = np.empty_like(background) if self.has_interior else None
        distance = np.empty_like(background) if self.has_distance else None
        for (cy0, cy1, cx0, cx1), probs in cells:
            inside = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
            background[inside] = probs[0]
            if interior is not None:
                interior[inside] = probs[1]
            if distance is not None:
                distance[inside] = probs[3]
        self._write_output(PROBABILITY, (y0, y1, x0, x1), to_uint8(1.0 - background))
        self._arrays[BACKGROUND][y0:y1, x0:x1] = background
        if interior is not None:
            self._arrays[INTERIOR][y0:y1, x0:x1] = interior
        if distance is not None:
            self._arrays[DISTANCE][y0:y1, x0:x1] = distance

    def read_probabilities(self, box: Box) -> tuple[np.ndarray, np.ndarray | None]:
        """``(nucleus_u8, interior_u8 or None)`` of a canvas box inside the output box: the
        viewing copy (level 0) and the interior rounded alike. Not for post-processing
        (:meth:`read_float`)."""
        y0, y1, x0, x1 = box
        part = self._output_part(box)
        nucleus = self._arrays[PROBABILITY][part[0]] if part is not None else None
        interior = self._arrays[INTERIOR][y0:y1, x0:x1] if self.has_interior else None
        return nucleus, None if interior is None else to_uint8(interior)

    def read_float(self, box: Box) -> np.ndarray:
        """The blended float32 probabilities of a canvas box, bit for bit as the stitcher gave
        them: ``C×h×w`` ``[p0, p1, 1 - p0 - p1]`` (three classes; the post-processing reads
        ``p0`` and ``p1`` only), the same plus the distance map ``d`` (four channels) or
        ``[p0, 1 - p0]`` (two)."""
        y0, y1, x0, x1 = box
        background = self._arrays[BACKGROUND][y0:y1, x0:x1]
        if not self.has_interior:
            return np.stack([background, 1.0 - background])
        interior = self._arrays[INTERIOR][y0:y1, x0:x1]
        channels = [background, interior, 1.0 - background - interior]
        if self.has_distance:
            channels.append(self._arrays[DISTANCE][y0:y1, x0:x1])
        return np.stack(channels)

    def write_pixels(self, box: Box, rgb: np.ndarray) -> None:
        """Stores the slide's ``h×w×3`` uint8 pixels of a canvas box (the working ``rgb``)."""
        if self.has_pixels:
            y0, y1, x0, x1 = box
            self._arrays[PIXELS][y0:y1, x0:x1] = rgb

    def read_pixels(self, box: Box) -> np.ndarray | None:
        """The slide's ``h×w×3`` uint8 pixels of a canvas box (white where none were read)."""
        if not self.has_pixels:
            return None
        y0, y1, x0, x1 = box
        return self._arrays[PIXELS][y0:y1, x0:x1]

    def write_labels(self, box: Box, ids: np.ndarray, first_id: int) -> None:
        """Adds a region's nuclei (``ids``: ``h×w`` uint32, 0 elsewhere) to ``labels/nuclei/0``.

        Ids ``>= first_id`` already in the box come from an interrupted attempt at this same
        region and are cleared first, so writing a region twice gives the same array. Pixels of
        nuclei owned by earlier regions are never overwritten.
        """
        if not self.has_labels:
            return
        part = self._output_part(box)  # the labels cover the output box (the ROI) only
        if part is None:
            return
        target, source = part
        array = self._arrays[LABELS]
        current = array[target]
        ids = ids[source]
        current[current >= first_id] = 0
        free = (current == 0) & (ids > 0)
        current[free] = ids[free]
        array[target] = current

    def finish(self, attrs: dict[str, Any]) -> None:
        """Drops the working arrays, builds the pyramids and their NGFF metadata, removes
        anything else, and marks the group complete.

        Redone from the start by a resumed run when interrupted: the pyramid levels are rebuilt
        and whatever a killed attempt left behind is removed, so that the finished group holds
        exactly level ``0, 1, ...`` and ``labels/nuclei/0, 1, ...`` (issue 13).
        """
        for name in WORKING_ARRAYS:
            if name in self._arrays:
                del self._arrays[name]
                del self.group[name]
        self.has_interior = self.has_distance = self.has_pixels = self.has_float = False
        mpp = self.group.attrs.get("mpp")
        image_paths = build_pyramid(self.group, downsample_mean)
        self.group.update_attributes(
            {**attrs, "multiscales": multiscales(image_paths, mpp, "nucleus probability", "mean")}
        )
        keep = {*image_paths}
        _test_hook("zarr-finishing")
        if self.has_labels:
            labels = self.group[f"labels/{LABEL_NAME}"]
            label_paths = build_pyramid(labels, downsample_nearest)
            labels.update_attributes(
                {
                    "multiscales": multiscales(label_paths, mpp, LABEL_NAME, "nearest"),
                    "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"}},
                }
            )
            self.group["labels"].attrs["labels"] = [LABEL_NAME]
            keep.add("labels")
            _remove_strays(self.path / "labels", {LABEL_NAME})
            _remove_strays(self.path / "labels" / LABEL_NAME, set(label_paths))
        _remove_strays(self.path, keep)
        self.group.attrs["complete"] = True


# ------------------------------------------------------------------------------------ pyramid


def _box_hw(box: Box) -> tuple[int, int]:
    return (box[1] - box[0], box[3] - box[2])


def _has(group: zarr.Group, name: str) -> bool:
    try:
        group[name]
    except KeyError:
        return False
    return True


_ZARR_V2_METADATA = {".zgroup", ".zattrs", ".zarray"}


def _remove_strays(folder: Path, keep: set[str]) -> None:
    """Deletes every entry of a group's folder but its Zarr v2 metadata files and ``keep``.

    Deleting an array removes its metadata before its chunks: a run killed meanwhile leaves a
    chunk folder that no longer reads as an array (``interior_probability/`` or ``rgb/``, tens
    of MB on the CMU region), which zarr then ignores and only removal by name finds.
    """
    for entry in folder.iterdir():
        if entry.name in keep or entry.name in _ZARR_V2_METADATA:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _create(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    fill_value: int = 0,
    compressor: numcodecs.abc.Codec = _COMPRESSOR,
) -> zarr.Array:
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill_value,
        compressors=compressor,
        chunk_key_encoding=_CHUNK_KEYS,
    )


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """``h×w`` uint8 -> ``ceil(h/2)×ceil(w/2)``: rounded means of 2×2 pixels (of fewer on an
    odd edge)."""
    h, w = block.shape
    padded = np.pad(block.astype(np.uint16), ((0, h % 2), (0, w % 2)))
    sums = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).sum(axis=(1, 3))
    counts = np.pad(np.ones((h, w), np.uint8), ((0, h % 2), (0, w % 2)))
    n = counts.reshape(sums.shape[0], 2, sums.shape[1], 2).sum(axis=(1, 3))
    return ((sums + n // 2) // n).astype(block.dtype)


def downsample_nearest(block: np.ndarray) -> np.ndarray:
    """``h×w`` label ids -> ``ceil(h/2)×ceil(w/2)``: the top-left pixel of each 2×2 (ids must
    not be averaged; ome-zarr-py's labels are downsampled by nearest neighbour too)."""
    return block[::2, ::2]


def pyramid_shapes(shape_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Level shapes: halved (rounded up) until the longest side is at most ``MIN_LEVEL_PX``,
    and at least one downsampled level, so that every output is a pyramid."""
    shapes = [tuple(shape_hw)]
    while len(shapes) < 2 or max(shapes[-1]) > MIN_LEVEL_PX:
        h, w = shapes[-1]
        if max(h, w) <= 1:
            break
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def build_pyramid(group: zarr.Group, downsample) -> list[str]:
    """Adds levels ``1, 2, …`` to a group whose level ``0`` is written; returns the paths.

    Each level is computed chunk by chunk from the 2× larger window of the level below, so
    memory is a few chunks whatever the slide's size.
    """
    base = group["0"]
    shapes = pyramid_shapes(tuple(base.shape))
    chunks = tuple(base.chunks)
    for level in range(1, len(shapes)):
        below = group[str(level - 1)]
        shape = shapes[level]
        if _has(group, str(level)):  # a finish() that was interrupted: build the level again
            del group[str(level)]
        target = _create(
            group,
            str(level),
            shape,
            tuple(min(c, s) for c, s in zip(chunks, shape, strict=True)),
            str(base.dtype),
        )
        step_y, step_x = target.chunks
        for y0 in range(0, shape[0], step_y):
            for x0 in range(0, shape[1], step_x):
                window = below[2 * y0 : 2 * (y0 + step_y), 2 * x0 : 2 * (x0 + step_x)]
                target[y0 : y0 + step_y, x0 : x0 + step_x] = downsample(window)
    return [str(level) for level in range(len(shapes))]


def multiscales(
    paths: Sequence[str], mpp: float | None, name: str, method: str
) -> list[dict[str, Any]]:
    """NGFF 0.4 ``multiscales`` of a ``y, x`` pyramid whose level k is downsampled 2^k times.

    Axes are in micrometres when ``mpp`` (level 0's µm per pixel) is known, else in pixels
    (scale ``2^k``, no unit).
    """
    unit = {"unit": "micrometer"} if mpp else {}
    pixel = float(mpp) if mpp else 1.0
    return [
        {
            "version": NGFF_VERSION,
            "name": name,
            "axes": [{"name": axis, "type": "space", **unit} for axis in ("y", "x")],
            "datasets": [
                {
                    "path": path,
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [pixel * 2**level, pixel * 2**level]}
                    ],
                }
                for level, path in enumerate(paths)
            ],
            "type": method,  # how each level was downsampled from the one below
        }
    ]


def _bounding_box(boxes: Sequence[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        max(b[1] for b in boxes),
        min(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )
