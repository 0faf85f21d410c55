"""What the whole-slide runner hands to its sinks: committed nuclei and regions.

The runner (:mod:`cellseg.pipeline`) gives every owned nucleus its global id and hands each
region, in raster order, to the sinks (:mod:`cellseg.sinks`) as one :class:`RegionCommit`.
These types know no file format beyond their own JSON line (the journal's record of a nucleus),
so the runner, the sinks and the journal can all share them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import shapely

from .tiling import Box


@dataclass
class NucleusRecord:
    """One exported nucleus.

    Attributes:
        id: global instance id, the value of its pixels in the Zarr ``labels/nuclei``.
        polygon: outline in QuPath level-0 pixel coordinates (valid at 0.01 px).
        measurements: QuPath measurements (area µm², perimeter µm, probability, ...).
        cell: the cell's outline grown from the nucleus (``--object-type cell``), or None.
    """

    id: int
    polygon: shapely.Polygon
    measurements: dict[str, float]
    cell: shapely.Polygon | None = None

    def to_json(self) -> str:
        data = {
            "id": self.id,
            "rings": _rings(self.polygon),
            "measurements": self.measurements,
        }
        if self.cell is not None:
            data["cell_rings"] = _rings(self.cell)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> NucleusRecord:
        data = json.loads(line)
        rings = data["rings"]
        cell = data.get("cell_rings")
        # JSON round-trips Python floats exactly, so the polygon is the one that was written.
        return cls(
            int(data["id"]),
            shapely.Polygon(rings[0], rings[1:]),
            data["measurements"],
            shapely.Polygon(cell[0], cell[1:]) if cell else None,
        )


def _rings(polygon: shapely.Polygon) -> list[list[list[float]]]:
    rings = [polygon.exterior.coords, *(r.coords for r in polygon.interiors)]
    return [[list(xy) for xy in ring] for ring in rings]


@dataclass(frozen=True)
class RegionCommit:
    """One region's final results, handed to every sink in region order.

    Attributes:
        index: the region's position in raster order (``index + 1`` regions are then done).
        window: the canvas box that ``labels`` covers (the region's core + halo).
        first_id: the id of the region's first nucleus; ids ``>= first_id`` already in a label
            image come from an interrupted attempt at this same region.
        nuclei: the owned nuclei with their global ids, in id order (empty on glass).
        labels: ``h×w`` uint32 global ids over ``window`` (0 elsewhere), or None when no sink
            wants label images or the region had nothing to label.
        next_id: the id the next region's first nucleus gets.
        counters: running totals over all sessions after this region (``seconds``,
            ``dropped``, ``rejected``).
    """

    index: int
    window: Box
    first_id: int
    nuclei: list[NucleusRecord]
    labels: np.ndarray | None
    next_id: int
    counters: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: the regions an interrupted run committed (a prefix in raster order),
    the next free nucleus id and the running counters (all zero for a fresh run)."""

    regions_done: int = 0
    next_id: int = 1
    counters: dict[str, float] = field(default_factory=dict)
