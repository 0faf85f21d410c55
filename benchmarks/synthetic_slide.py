"""Synthetic H&E-like whole-slide images of any size, written tile row by tile row.

The benchmark needs slides far larger than the test fixtures (a 2 mm × 2 mm slide at 0.25 µm/px
is 8000 × 8000 px), so nothing here holds a whole level in memory: the content is a function of
*physical* position (µm), and every pyramid level, and the thumbnail, is rendered directly at its
own resolution, one 256-pixel strip at a time, straight into tifffile's tile iterator. The levels
therefore agree in content (the same tissue outline, fibres and nuclei) without being exact 2×2
means of each other, which a throughput benchmark does not need.

Content: a rounded-rectangle block of pink eosin stroma with fibre-like waves covering about
82% of the slide, bare glass around it, and dark purple hematoxylin nuclei (ellipses 5-9 µm
across, about 3000 per mm² of tissue) inside the tissue. Nuclei take their outline from a small
catalogue of ellipses (sizes and orientations), so that each strip stamps all nuclei of one
outline in a single vectorised assignment: rendering costs a few numpy passes per strip, not a
drawing call per nucleus.

The file is an Aperio-style SVS (the layout of ``tests/slides.py``: level 0, a stripped
thumbnail in directory 1, then the reduced levels) with JPEG tiles, like most real 40× slides,
and ``MPP`` in its description.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from skimage.draw import ellipse

from cellseg.atomic import atomic_path

TILE_PX = 256
APERIO_PREFIX = "Aperio Image Library v12.0.15"
JPEG_QUALITY = 85
THUMBNAIL_MAX_PX = 1024
MIN_LEVEL_PX = 256  # coarsest pyramid level: long side at least this

GLASS_RGB = (242, 241, 244)
STROMA_RGB = (226, 156, 196)  # eosin
NUCLEUS_RGB = (88, 52, 138)  # hematoxylin
TISSUE_MARGIN = 0.04  # glass band on each side, as a fraction of the slide side
TISSUE_CORNER_POWER = 6.0  # superellipse exponent of the tissue outline (rounded rectangle)


@dataclass(frozen=True)
class TissueSpec:
    """What the synthetic tissue looks like (physical units, so every level agrees)."""

    nuclei_per_mm2: float = 3000.0  # of tissue; typical cellular H&E tissue has 2000-5000
    radius_um: tuple[float, float] = (2.5, 4.5)  # semi-axes drawn uniformly in this range
    outlines: int = 48  # size of the catalogue of nucleus outlines
    seed: int = 0


@dataclass(frozen=True)
class Nuclei:
    """Nuclei sorted by ``cy_um`` (arrays of length n; µm from the slide's top-left).

    ``outline[i]`` indexes ``catalogue``, whose rows are ellipses
    ``(semi-axis y µm, semi-axis x µm, rotation rad)``.
    """

    cy_um: np.ndarray
    cx_um: np.ndarray
    outline: np.ndarray
    shade: np.ndarray  # brightness offset of each nucleus, in grey levels
    catalogue: np.ndarray  # outlines × 3

    @property
    def max_radius_um(self) -> float:
        """How far a nucleus reaches from its centre (0 without any)."""
        return float(self.catalogue[:, :2].max()) if len(self.catalogue) else 0.0

    def __len__(self) -> int:
        return len(self.cy_um)

    def rows_between(self, y0_um: float, y1_um: float) -> slice:
        """Nuclei whose centre lies in ``[y0_um, y1_um)`` (a slice of the sorted arrays)."""
        start, stop = np.searchsorted(self.cy_um, [y0_um, y1_um])
        return slice(int(start), int(stop))


@dataclass(frozen=True)
class SyntheticSlide:
    """A written slide: level-0 size, resolution, pyramid and content facts."""

    path: Path
    width_px: int
    height_px: int
    mpp: float
    downsamples: tuple[int, ...]
    tissue_fraction: float
    nuclei: int


def tissue_inside(
    x_um: np.ndarray, y_um: np.ndarray, width_um: float, height_um: float
) -> np.ndarray:
    """True where ``(x_um, y_um)`` (broadcastable arrays) lies in the tissue outline.

    The outline is the superellipse ``|u|^p + |v|^p <= 1`` (p = TISSUE_CORNER_POWER) in
    coordinates ``u, v`` normalised to the slide minus a TISSUE_MARGIN glass band.
    """
    half_w = width_um * (0.5 - TISSUE_MARGIN)
    half_h = height_um * (0.5 - TISSUE_MARGIN)
    u = np.abs(x_um - width_um / 2) / half_w
    v = np.abs(y_um - height_um / 2) / half_h
    return u**TISSUE_CORNER_POWER + v**TISSUE_CORNER_POWER <= 1.0


def tissue_fraction(width_px: int, height_px: int, mpp: float, samples: int = 512) -> float:
    """Fraction of the slide inside the tissue outline (midpoint rule on a ``samples²`` grid)."""
    width_um, height_um = width_px * mpp, height_px * mpp
    x_um = (np.arange(samples) + 0.5) * width_um / samples
    y_um = (np.arange(samples) + 0.5) * height_um / samples
    return float(tissue_inside(x_um[None, :], y_um[:, None], width_um, height_um).mean())


def place_nuclei(width_um: float, height_um: float, spec: TissueSpec) -> Nuclei:
    """Random nuclei (Poisson count, uniform positions) inside the tissue, sorted by ``cy_um``."""
    rng = np.random.default_rng(spec.seed)
    expected = spec.nuclei_per_mm2 * width_um * height_um / 1e6
    count = int(rng.poisson(expected))
    cy = rng.uniform(0, height_um, count)
    cx = rng.uniform(0, width_um, count)
    keep = tissue_inside(cx, cy, width_um, height_um)
    order = np.argsort(cy[keep], kind="stable")
    n = int(keep.sum())
    low, high = spec.radius_um
    catalogue = np.stack(
        [
            rng.uniform(low, high, spec.outlines),
            rng.uniform(low, high, spec.outlines),
            rng.uniform(0, math.pi, spec.outlines),
        ],
        axis=1,
    )
    return Nuclei(
        cy_um=cy[keep][order],
        cx_um=cx[keep][order],
        outline=rng.integers(0, spec.outlines, n),
        shade=rng.normal(0, 12, n).astype(np.float32),
        catalogue=catalogue,
    )


def _texture(x_um: np.ndarray, y_um: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``H×W`` float32 grey offsets: fibre-like waves of ±14 plus noise (σ = 3).

    The waves ``sin(x/23 + 2·sin(y/41)) · cos(y/67 - x/151)`` of the 1-D coordinates ``x_um``
    and ``y_um`` are expanded with the angle-sum identities into outer products of 1-D sines and
    cosines, so no 2-D trigonometry is needed.
    """
    a, b = x_um / 23.0, 2.0 * np.sin(y_um / 41.0)
    c, d = y_um / 67.0, x_um / 151.0
    first = np.outer(np.cos(b), np.sin(a)) + np.outer(np.sin(b), np.cos(a))  # sin(a + b)
    second = np.outer(np.cos(c), np.cos(d)) + np.outer(np.sin(c), np.sin(d))  # cos(c - d)
    texture = (first * second).astype(np.float32)
    texture *= np.float32(14.0)
    texture += rng.standard_normal(texture.shape, dtype=np.float32) * np.float32(3.0)
    return texture


def _colour_plus(rgb: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """``rgb`` (``...×3``) plus ``texture`` (``...``), rounded and clipped to uint8."""
    return np.clip(np.rint(rgb + texture[..., None]), 0, 255).astype(np.uint8)


def _stamp_nuclei(
    strip: np.ndarray,
    texture: np.ndarray,
    y0_px: int,
    pixel_um: float,
    nuclei: Nuclei,
    selected: slice,
) -> None:
    """Paints the ``selected`` nuclei into ``strip`` (rows from ``y0_px`` of a level whose
    pixels are ``pixel_um`` wide), one vectorised assignment per catalogue outline."""
    rows, width = strip.shape[:2]
    cy = np.rint(nuclei.cy_um[selected] / pixel_um - 0.5).astype(np.int64) - y0_px
    cx = np.rint(nuclei.cx_um[selected] / pixel_um - 0.5).astype(np.int64)
    colours = np.asarray(NUCLEUS_RGB, np.float32) + nuclei.shade[selected][:, None]
    outline = nuclei.outline[selected]
    for index, (ry_um, rx_um, rotation) in enumerate(nuclei.catalogue):
        pick = np.flatnonzero(outline == index)
        if len(pick) == 0:
            continue
        # Pixel offsets of the outline from its centre (no shape given: nothing is clipped).
        dy, dx = ellipse(
            0, 0, max(ry_um / pixel_um, 0.5), max(rx_um / pixel_um, 0.5), rotation=rotation
        )
        ys = (cy[pick, None] + dy[None, :]).ravel()
        xs = (cx[pick, None] + dx[None, :]).ravel()
        keep = (ys >= 0) & (ys < rows) & (xs >= 0) & (xs < width)
        ys, xs = ys[keep], xs[keep]
        rgb = np.repeat(colours[pick], len(dy), axis=0)[keep]
        strip[ys, xs] = _colour_plus(rgb, texture[ys, xs])


def render_strip(
    width_px: int,
    y0_px: int,
    rows_px: int,
    pixel_um: float,
    slide_wh_um: tuple[float, float],
    nuclei: Nuclei,
    rng: np.random.Generator,
) -> np.ndarray:
    """Rows ``[y0_px, y0_px + rows_px)`` of a level whose pixels are ``pixel_um`` µm wide.

    Returns:
        ``rows_px×width_px×3`` uint8 RGB: glass, and textured stroma and nuclei.
    """
    width_um, height_um = slide_wh_um
    x_um = (np.arange(width_px) + 0.5) * pixel_um
    y_um = (np.arange(y0_px, y0_px + rows_px) + 0.5) * pixel_um
    texture = _texture(x_um, y_um, rng)
    strip = np.empty((rows_px, width_px, 3), np.uint8)
    channel = np.empty_like(texture)
    for c, value in enumerate(STROMA_RGB):  # channel by channel: fewer full-size float passes
        np.add(texture, np.float32(value + 0.5), out=channel)  # +0.5: rounding on the cast
        np.clip(channel, 0.0, 255.0, out=channel)
        strip[..., c] = channel
    strip[~tissue_inside(x_um[None, :], y_um[:, None], width_um, height_um)] = GLASS_RGB
    reach_um = max(nuclei.max_radius_um, pixel_um)
    selected = nuclei.rows_between(y_um[0] - reach_um, y_um[-1] + reach_um)
    _stamp_nuclei(strip, texture, y0_px, pixel_um, nuclei, selected)
    return strip


def _level_tiles(
    width_px: int,
    height_px: int,
    pixel_um: float,
    slide_wh_um: tuple[float, float],
    nuclei: Nuclei,
    seed: int,
) -> Iterator[np.ndarray]:
    """``TILE_PX²×3`` tiles of one level in row-major order (edge tiles padded with glass)."""
    rng = np.random.default_rng(seed)
    for y0 in range(0, height_px, TILE_PX):
        rows = min(TILE_PX, height_px - y0)
        strip = render_strip(width_px, y0, rows, pixel_um, slide_wh_um, nuclei, rng)
        padded = np.empty((TILE_PX, math.ceil(width_px / TILE_PX) * TILE_PX, 3), np.uint8)
        padded[:] = GLASS_RGB
        padded[:rows, :width_px] = strip
        for x0 in range(0, padded.shape[1], TILE_PX):
            yield padded[:, x0 : x0 + TILE_PX]


def pyramid_downsamples(width_px: int, height_px: int) -> tuple[int, ...]:
    """Level downsamples 1, 2, 4, ... while the level's long side stays >= MIN_LEVEL_PX."""
    downsamples = [1]
    while max(width_px, height_px) // (downsamples[-1] * 2) >= MIN_LEVEL_PX:
        downsamples.append(downsamples[-1] * 2)
    return tuple(downsamples)


def _aperio_description(
    width: int, height: int, mpp: float, level_wh: tuple[int, int] | None = None
) -> str:
    """ImageDescription of an SVS page: level 0 carries the metadata (``MPP``), others not."""
    head = f"{APERIO_PREFIX} \n{width}x{height} [0,0 {width}x{height}] ({TILE_PX}x{TILE_PX})"
    head += f" JPEG/RGB Q={JPEG_QUALITY}"
    if level_wh is not None:
        return f"{head} -> {level_wh[0]}x{level_wh[1]}"
    return f"{head}|AppMag = 40|StripeWidth = 1000|MPP = {mpp}"


def _resolution_tags(mpp: float, downsample: float) -> dict:
    px_per_cm = 1e4 / (mpp * downsample)
    return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}


def write_synthetic_slide(
    path: str | Path,
    width_px: int,
    height_px: int,
    mpp: float = 0.25,
    spec: TissueSpec | None = None,
) -> SyntheticSlide:
    """Writes an Aperio-style JPEG SVS of synthetic tissue; memory stays at a few strips.

    Args:
        path: output file (``.svs``), written under a temporary name and renamed when complete.
        width_px, height_px: level-0 size.
        mpp: level-0 µm per pixel (0.25: a 40× scan).
        spec: tissue content; the default gives about 3000 nuclei per mm² of tissue.
    """
    if width_px < 1 or height_px < 1:
        raise ValueError(f"slide size must be positive, got {width_px}x{height_px}")
    spec = spec or TissueSpec()
    path = Path(path)
    slide_wh_um = (width_px * mpp, height_px * mpp)
    nuclei = place_nuclei(*slide_wh_um, spec)
    downsamples = pyramid_downsamples(width_px, height_px)
    thumb_down = 2 ** max(0, math.ceil(math.log2(max(width_px, height_px) / THUMBNAIL_MAX_PX)))
    with (
        atomic_path(path) as partial,
        tifffile.TiffWriter(partial, bigtiff=3 * width_px * height_px >= 2**32) as tif,
    ):
        for index, down in enumerate(downsamples):
            _write_level(tif, (width_px, height_px), mpp, down, index, nuclei, spec.seed)
            if index == 0:
                thumb_um = mpp * thumb_down
                _write_thumbnail(tif, width_px, height_px, thumb_um, slide_wh_um, nuclei)
    return SyntheticSlide(
        path=path,
        width_px=width_px,
        height_px=height_px,
        mpp=mpp,
        downsamples=downsamples,
        tissue_fraction=tissue_fraction(width_px, height_px, mpp),
        nuclei=len(nuclei),
    )


def _write_level(
    tif: tifffile.TiffWriter,
    size_xy: tuple[int, int],
    mpp: float,
    downsample: int,
    index: int,
    nuclei: Nuclei,
    seed: int,
) -> None:
    """Pyramid level ``index`` (``downsample``× coarser than level 0) as JPEG tiles."""
    width_px, height_px = size_xy
    level_w, level_h = width_px // downsample, height_px // downsample
    slide_wh_um = (width_px * mpp, height_px * mpp)
    tiles = _level_tiles(level_w, level_h, mpp * downsample, slide_wh_um, nuclei, seed + index)
    tif.write(
        tiles,
        shape=(level_h, level_w, 3),
        dtype=np.uint8,
        tile=(TILE_PX, TILE_PX),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": JPEG_QUALITY},
        description=_aperio_description(
            width_px, height_px, mpp, None if index == 0 else (level_w, level_h)
        ),
        subfiletype=0,  # SVS levels are full images (tifffile's SVS parser relies on it)
        metadata=None,
        **_resolution_tags(mpp, downsample),
    )


def _write_thumbnail(
    tif: tifffile.TiffWriter,
    width_px: int,
    height_px: int,
    pixel_um: float,
    slide_wh_um: tuple[float, float],
    nuclei: Nuclei,
) -> None:
    """Directory 1 of an SVS: a stripped thumbnail (OpenSlide's aperio driver expects it)."""
    thumb_w = max(1, round(slide_wh_um[0] / pixel_um))
    thumb_h = max(1, round(slide_wh_um[1] / pixel_um))
    rng = np.random.default_rng(0)
    pixels = render_strip(thumb_w, 0, thumb_h, pixel_um, slide_wh_um, nuclei, rng)
    tif.write(
        pixels,
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": JPEG_QUALITY},
        description=f"{APERIO_PREFIX} \n{width_px}x{height_px} -> {thumb_w}x{thumb_h}",
        metadata=None,
    )
