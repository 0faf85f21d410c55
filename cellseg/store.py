"""The Zarr v3 group that whole-slide prediction writes, region by region.

Arrays, all ``y×x`` at the model's resolution (the *canvas* of :mod:`cellseg.tiling`), chunked
``chunk_px²`` and compressed (Blosc zstd with bit-shuffle, which suits both probabilities and
sparse instance ids). With ``chunk_px`` equal to the block size (``predict``'s default) each
block's probabilities are whole chunks, written once and never read back
(:meth:`PredictionStore.write_cells`):

* ``probability``: uint8 nucleus probability ``(p1 + p2)·255`` (``1 - p0``), rounded;
* ``labels``: uint32 instance ids, 0 = background; id ``k`` is the GeoJSON feature whose
  ``Label`` measurement is ``k``;
* ``interior_probability``: uint8 ``p1·255``, a working array of three-class models that the
  halo of each region is re-labelled from; deleted when the slide is complete.

The group's attributes describe the geometry (``mpp``, ``scale_to_level0``, ``origin_xy_level0``,
``bounds_xy``, ...), the model and the tiling, and ``complete`` (false while being written).
Nothing larger than a region's window is ever held in memory.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .tiling import Box

PROBABILITY = "probability"
LABELS = "labels"
INTERIOR = "interior_probability"
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def to_uint8(probability: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``round(p·255)``."""
    return np.rint(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)


class PredictionStore:
    """Read/write access to a prediction group: :meth:`create` a new one, :meth:`open` to resume.

    Attributes:
        path: the group's folder.
        has_labels: whether ``labels`` is written (only when the user asked for a Zarr).
        has_interior: whether ``interior_probability`` exists (three-class models).
    """

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group
        # Opened once: looking an array up in the group reads its metadata from disk each time.
        self._arrays = {
            name: group[name] for name in (PROBABILITY, LABELS, INTERIOR) if name in group
        }
        self.has_labels = LABELS in self._arrays
        self.has_interior = INTERIOR in self._arrays

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
    ) -> PredictionStore:
        """A new, empty group at ``path`` (replacing whatever was there)."""
        shutil.rmtree(path, ignore_errors=True)
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        chunks = (min(chunk_px, canvas_hw[0]), min(chunk_px, canvas_hw[1]))
        names = [(PROBABILITY, "uint8")]
        if with_labels:
            names.append((LABELS, "uint32"))
        if num_classes == 3:
            names.append((INTERIOR, "uint8"))
        for name, dtype in names:
            group.create_array(
                name,
                shape=canvas_hw,
                chunks=chunks,
                dtype=dtype,
                fill_value=0,
                compressors=_COMPRESSOR,
                dimension_names=("y", "x"),
            )
        group.attrs.update({**(attrs or {}), "complete": False})
        return cls(path, group)

    @classmethod
    def open(cls, path: Path, canvas_hw: tuple[int, int]) -> PredictionStore | None:
        """Reopens a partial group for resuming; None when missing or of another shape."""
        try:
            group = zarr.open_group(str(path), mode="r+", zarr_format=3)
            if tuple(group[PROBABILITY].shape) != tuple(canvas_hw):
                return None
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.BaseZarrError):
            return None
        return cls(path, group)

    def write_probabilities(self, box: Box, probs: np.ndarray) -> None:
        """Stores final ``C×h×w`` probabilities of a canvas box."""
        y0, y1, x0, x1 = box
        self._arrays[PROBABILITY][y0:y1, x0:x1] = to_uint8(1.0 - probs[0])
        if self.has_interior:
            self._arrays[INTERIOR][y0:y1, x0:x1] = to_uint8(probs[1])

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
        nucleus = np.empty((y1 - y0, x1 - x0), np.uint8)
        interior = np.empty_like(nucleus) if self.has_interior else None
        for (cy0, cy1, cx0, cx1), probs in cells:
            inside = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
            nucleus[inside] = to_uint8(1.0 - probs[0])
            if interior is not None:
                interior[inside] = to_uint8(probs[1])
        self._arrays[PROBABILITY][y0:y1, x0:x1] = nucleus
        if interior is not None:
            self._arrays[INTERIOR][y0:y1, x0:x1] = interior

    def read_probabilities(self, box: Box) -> tuple[np.ndarray, np.ndarray | None]:
        """``(nucleus_u8, interior_u8 or None)`` of a canvas box."""
        y0, y1, x0, x1 = box
        nucleus = self._arrays[PROBABILITY][y0:y1, x0:x1]
        interior = self._arrays[INTERIOR][y0:y1, x0:x1] if self.has_interior else None
        return nucleus, interior

    def write_labels(self, box: Box, ids: np.ndarray, first_id: int) -> None:
        """Adds a region's nuclei (``ids``: ``h×w`` uint32, 0 elsewhere) to ``labels``.

        Ids ``>= first_id`` already in the box come from an interrupted attempt at this same
        region and are cleared first, so writing a region twice gives the same array. Pixels of
        nuclei owned by earlier regions are never overwritten.
        """
        if not self.has_labels:
            return
        y0, y1, x0, x1 = box
        array = self._arrays[LABELS]
        current = array[y0:y1, x0:x1]
        current[current >= first_id] = 0
        free = (current == 0) & (ids > 0)
        current[free] = ids[free]
        array[y0:y1, x0:x1] = current

    def finish(self, attrs: dict[str, Any]) -> None:
        """Drops the working array and marks the group complete."""
        if self.has_interior:
            del self._arrays[INTERIOR]
            del self.group[INTERIOR]
            self.has_interior = False
        # Deleting an array removes its metadata first: a run killed meanwhile leaves its chunk
        # folder behind, which a resumed run no longer sees as an array. Remove it by name.
        shutil.rmtree(self.path / INTERIOR, ignore_errors=True)
        self.group.attrs.update({**attrs, "complete": True})


def _bounding_box(boxes: Sequence[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        max(b[1] for b in boxes),
        min(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )
