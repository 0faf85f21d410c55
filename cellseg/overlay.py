"""A downsampled picture of the processed slide area with the nucleus outlines drawn on it.

For a quick visual check of a run (``cellseg predict --overlay overlay.png``). Memory stays
bounded: the picture is at most ``max_px`` on its long side, it is read from the slide in strips
(each one reader call at the coarsest suitable pyramid level), and the outlines are streamed in
and drawn one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from shapely.geometry import Polygon

from .atomic import AtomicFile
from .errors import CellsegError
from .slide import Slide

OUTLINE_RGB = (0, 255, 0)  # green stands out on both haematoxylin and eosin
STRIP_PX = 256  # picture rows per slide read


def overlay_format(path: Path) -> str:
    """Pillow's format name for ``path``'s suffix; a clear error for unsupported ones."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt not in {"PNG", "JPEG", "TIFF"}:
        raise CellsegError(f"{path}: overlay must be a .png, .jpg or .tif file")
    return fmt


def overlay_mpp(area_wh_level0: tuple[int, int], slide_mpp: float, max_px: int) -> float:
    """µm per picture pixel so that the area's long side is at most ``max_px`` pixels."""
    long_side_um = max(area_wh_level0) * slide_mpp
    return max(slide_mpp, long_side_um / max_px)


def draw_overlay(
    slide: Slide,
    area_xywh: tuple[int, int, int, int],
    outlines: Iterable[Polygon],
    path: Path,
    *,
    max_px: int = 2048,
    color: tuple[int, int, int] = OUTLINE_RGB,
    publish: bool = True,
) -> Path:
    """Writes ``path`` (PNG/JPEG/TIFF by suffix) atomically and returns the file written.

    Args:
        slide: the open slide.
        area_xywh: processed area in level-0 pixels (reader coordinates).
        outlines: nucleus polygons in QuPath level-0 coordinates (level 0 minus
            ``slide.bounds_xy`` origin), e.g. streamed from the run's journal.
        path: output picture.
        max_px: long side of the picture in pixels.
        color: outline colour (r, g, b).
        publish: rename ``<path>.partial`` to ``path`` when done; False leaves it there (the
            caller renames all of a slide's outputs together).
    """
    path = Path(path)
    fmt = overlay_format(path)
    x, y, w, h = area_xywh
    mpp = overlay_mpp((w, h), slide.mpp, max_px)
    step = mpp / slide.mpp  # level-0 pixels per picture pixel
    width, height = max(1, math.ceil(w / step - 1e-6)), max(1, math.ceil(h / step - 1e-6))
    picture = np.empty((height, width, 3), np.uint8)
    for row in range(0, height, STRIP_PX):
        rows = min(STRIP_PX, height - row)
        picture[row : row + rows] = slide.read_region_at_mpp(
            (x, y + row * step), (width, rows), mpp
        )
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    # QuPath coordinates -> picture pixels (pixel corners at integers, as in geojson.py).
    shift = np.array([slide.bounds_xy[0] - x, slide.bounds_xy[1] - y], dtype=np.float64)
    for polygon in outlines:
        xy = (np.asarray(polygon.exterior.coords) + shift) / step
        draw.polygon([tuple(p) for p in xy], outline=color)
    picture_file = AtomicFile(path, "wb", publish=publish)
    with picture_file as f:
        image.save(f, format=fmt)
    return path if publish else picture_file.staged
