"""Whole-slide reading at a physical resolution: OpenSlide, tiffslide or plain images.

``open_slide(path)`` returns a :class:`Slide` that knows its level-0 resolution (``mpp``, µm per
pixel) and where that number came from, and reads any region of level 0 resampled to a requested
mpp in ONE call to the underlying reader (pyramid level nearest below the target, then area
resampling).

Coordinates follow OpenSlide: ``origin_xy`` is a level-0 pixel position (x, y) in the reader's frame
and pixel (c, r) covers the square [c, c+1) × [r, r+1). A region of ``size_px = (w, h)`` pixels at
``target_mpp`` therefore covers level-0 ``[x, x + w·s) × [y, y + h·s)`` with
``s = target_mpp / mpp``, and output pixel (j, i) is the area average of level 0 over
``[x + j·s, x + (j+1)·s) × [y + i·s, y + (i+1)·s)``.

mpp sources, first found wins (an unknown mpp is an error, never a guess; PEERS.md §5):
``override`` (``--mpp``), ``<backend>.mpp-x`` (``openslide.mpp-x``/``tiffslide.mpp-x``), the
Aperio ImageDescription ``|MPP = 0.499|`` (``aperio-description``), then the TIFF
XResolution/ResolutionUnit tags (``tiff-resolution``). The description comes before the tags
because many writers store a 72-dpi placeholder in the tags.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import openslide
import tifffile
import tiffslide
from PIL import Image
from scipy import sparse

from .errors import SlideError

log = logging.getLogger(__name__)

BACKENDS = ("openslide", "tiffslide", "image")
PLAIN_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".svs"})

MPP_RANGE = (0.05, 20.0)  # µm/px; outside it the metadata is a placeholder (e.g. 72 dpi = 352.8)
MPP_ANISOTROPY_WARN = 0.01  # relative x/y difference above which we warn
LEVEL_TOLERANCE = 0.01  # a level 1 % coarser than the target still counts as "not coarser"
MAX_PLAIN_IMAGE_PIXELS = 20_000 * 20_000  # plain images are decoded whole into memory
MAX_READ_PIXELS = 64 * 2**20  # level pixels per reader call when building a thumbnail
MAX_THUMBNAIL_PIXELS = 100_000_000
AREA_BLOCK_PX = 512  # output columns per block of the area-average resampler

_APERIO_MPP = re.compile(r"(?:^|\|)\s*MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?=\||$)")
_TIFF_UNIT_UM = {
    tifffile.RESUNIT.INCH: 25_400.0,
    tifffile.RESUNIT.CENTIMETER: 10_000.0,
    tifffile.RESUNIT.MILLIMETER: 1_000.0,
    tifffile.RESUNIT.MICROMETER: 1.0,
}
# What third-party decoders raise on broken files: OpenSlide's own errors, tifffile's, I/O and zlib
# errors; and ValueError/KeyError/IndexError/RuntimeError (imagecodecs' codec errors, tifffile's
# "unknown compression") when raised inside a decoder package. The same types raised by our own
# code are bugs and propagate (_is_decoder_error). Truncated TIFF directories are found before
# any decoder runs (_check_tiff_structure).
_DECODER_ERRORS = (
    openslide.OpenSlideError,
    tifffile.TiffFileError,
    OSError,
    zlib.error,
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
)
_ALWAYS_DECODER_ERRORS = (openslide.OpenSlideError, tifffile.TiffFileError, OSError, zlib.error)
DECODER_PACKAGES = frozenset(
    {"openslide", "tiffslide", "tifffile", "imagecodecs", "PIL", "zarr", "numcodecs", "fsspec"}
)
# Pillow also reports broken PNG/JPEG files as SyntaxError ("broken PNG file").
_PILLOW_ERRORS = (*_DECODER_ERRORS, SyntaxError, Image.DecompressionBombError)
NO_STRUCTURE_CHECK_SUFFIXES = frozenset({".ndpi"})  # NDPI stores 64-bit offsets in a classic TIFF


def _is_decoder_error(exc: BaseException) -> bool:
    """Whether ``exc`` (caught as one of ``_DECODER_ERRORS``) is a decoder's report of bad data:
    always for the decoders' own types, else only when raised inside a decoder package."""
    if isinstance(exc, (*_ALWAYS_DECODER_ERRORS, Image.DecompressionBombError)):
        return True
    if type(exc).__module__.split(".")[0] in DECODER_PACKAGES:  # e.g. imagecodecs.JpegError
        return True
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return module.split(".")[0] in DECODER_PACKAGES


def _tiff_directory_problem(path: Path) -> str | None:
    """Why the TIFF directory chain of ``path`` is broken, or None (also for non-TIFF files).

    Follows every IFD (classic and BigTIFF) and checks that each lies inside the file: a file cut
    short (an interrupted copy) otherwise opens with tiffslide and reads as blank tiles.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            return None
        order = "<" if head[:2] == b"II" else ">"
        magic = struct.unpack(order + "H", head[2:4])[0]
        if magic == 42:
            count_fmt, entry_bytes, offset_fmt = "H", 12, "I"
            offset = struct.unpack(order + "I", head[4:8])[0]
        elif magic == 43 and len(head) == 16:
            count_fmt, entry_bytes, offset_fmt = "Q", 20, "Q"
            offset = struct.unpack(order + "Q", head[8:16])[0]
        else:
            return None
        count_bytes, offset_bytes = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
        seen: set[int] = set()
        while offset:
            if offset in seen:
                return f"its directories form a loop at byte {offset}"
            seen.add(offset)
            f.seek(offset)
            raw = f.read(count_bytes)
            if len(raw) < count_bytes:
                return f"directory {len(seen)} at byte {offset} lies past the end ({size} bytes)"
            entries = struct.unpack(order + count_fmt, raw)[0]
            f.seek(offset + count_bytes + entries * entry_bytes)
            raw = f.read(offset_bytes)
            if len(raw) < offset_bytes:
                return f"directory {len(seen)} at byte {offset} is cut short ({size} bytes)"
            offset = struct.unpack(order + offset_fmt, raw)[0]
    return None


def _tiff_data_problem(path: Path) -> str | None:
    """Why some image data of the TIFF ``path`` lies outside the file, or None."""
    size = path.stat().st_size
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if offsets.size and int((offsets + counts).max()) > size:
                return f"image {page.index} has data past the end of the file ({size} bytes)"
    return None


def _check_tiff_structure(path: Path) -> None:
    """Raises SlideError when ``path`` is a TIFF whose directories or data are cut short."""
    if path.suffix.lower() in NO_STRUCTURE_CHECK_SUFFIXES:
        return
    try:
        problem = _tiff_directory_problem(path)
        if problem is None and _looks_like_tiff(path):
            problem = _tiff_data_problem(path)
    except OSError as exc:
        raise SlideError(f"{path}: cannot read file: {_one_line(exc)}") from exc
    except tifffile.TiffFileError as exc:
        raise SlideError(f"{path}: corrupt TIFF: {_one_line(exc)}") from exc
    if problem is not None:
        raise SlideError(f"{path}: truncated or corrupt file: {problem}")


def _looks_like_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (decoder messages sometimes span several)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------- readers


class _Reader(Protocol):
    """What :class:`Slide` needs from a backend (levels in reader coordinates)."""

    backend: str
    properties: Mapping[str, Any]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    def read_level(
        self, level: int, xy_level: tuple[int, int], size_xy: tuple[int, int]
    ) -> np.ndarray: ...

    def close(self) -> None: ...


def _to_rgb(pixels: np.ndarray) -> np.ndarray:
    """``H×W``, ``H×W×{1,3,4}`` uint8 -> ``H×W×3`` uint8, alpha composited on white.

    OpenSlide returns non-premultiplied RGBA whose alpha is 0 outside scanned areas; compositing
    on white makes those areas look like glass (the tissue detector then skips them).
    """
    if pixels.ndim == 2:
        pixels = pixels[..., np.newaxis]
    channels = pixels.shape[2]
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels == 3:
        return pixels
    if channels != 4:
        raise ValueError(f"unsupported number of channels: {channels}")
    alpha = pixels[..., 3:4].astype(np.uint16)
    if alpha.min() == 255:
        return np.ascontiguousarray(pixels[..., :3])
    rgb = pixels[..., :3].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


class _OpenSlideLikeReader:
    """OpenSlide or tiffslide handle (tiffslide copies openslide-python's API)."""

    def __init__(self, handle: Any, backend: str) -> None:
        self._handle = handle
        self.backend = backend
        self.properties: Mapping[str, Any] = dict(handle.properties)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)

    def read_level(
        self, level: int, xy_level: tuple[int, int], size_xy: tuple[int, int]
    ) -> np.ndarray:
        """``h×w×3`` uint8 of level pixels ``[x, x+w) × [y, y+h)`` (inside the level)."""
        downsample = self.level_downsamples[level]
        # Both readers take a level-0 location and divide it by the level's downsample
        # (tiffslide truncates); ceil(x·d) maps back to exactly level pixel x for any d >= 1.
        location = tuple(v if level == 0 else math.ceil(v * downsample - 1e-6) for v in xy_level)
        if self.backend == "tiffslide":
            pixels = self._handle.read_region(location, level, size_xy, as_array=True)
        else:
            pixels = np.asarray(self._handle.read_region(location, level, size_xy))
        return _to_rgb(pixels)

    def close(self) -> None:
        self._handle.close()


class _ImageReader:
    """A plain TIFF/PNG/JPEG decoded whole into memory: one level, downsample 1."""

    backend = "image"

    def __init__(self, pixels_rgb: np.ndarray) -> None:
        self._pixels: np.ndarray | None = pixels_rgb
        height, width = pixels_rgb.shape[:2]
        self.properties: Mapping[str, Any] = {}
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)

    def read_level(
        self, level: int, xy_level: tuple[int, int], size_xy: tuple[int, int]
    ) -> np.ndarray:
        if self._pixels is None:
            raise ValueError("image is closed")
        (x, y), (w, h) = xy_level, size_xy
        return self._pixels[y : y + h, x : x + w].copy()  # callers may write into regions

    def close(self) -> None:
        self._pixels = None


def _check_plain_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PLAIN_IMAGE_PIXELS:
        raise SlideError(
            f"{path}: plain image of {width}x{height} px is too large to decode whole "
            f"(limit {MAX_PLAIN_IMAGE_PIXELS:,} px); convert it to a tiled pyramidal TIFF "
            "(e.g. vips tiffsave --tile --pyramid)"
        )


def _load_tiff_pixels(path: Path) -> np.ndarray:
    """Level 0 of the first TIFF series as ``H×W×C`` (channels last) uint8."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0].levels[0]
        axes = series.axes
        sizes = dict(zip(axes, series.shape, strict=True))
        _check_plain_size(path, sizes.get("X", 0), sizes.get("Y", 0))
        if series.dtype != np.uint8:
            raise SlideError(f"{path}: unsupported pixel type {series.dtype} (expected 8-bit RGB)")
        pixels = series.asarray()
    if axes in ("YXS", "YX"):
        return pixels
    if axes in ("SYX", "CYX"):
        return np.moveaxis(pixels, 0, -1)
    raise SlideError(f"{path}: unsupported TIFF layout {axes!r} (expected a 2D RGB image)")


def _load_pillow_pixels(path: Path) -> np.ndarray:
    """A PNG/JPEG (any Pillow mode) as ``H×W×4`` RGBA uint8."""
    try:
        with warnings.catch_warnings():
            # Our own limit applies; Pillow's warning fires far below it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_plain_size(path, *image.size)
                return np.asarray(image.convert("RGBA"))
    except Image.DecompressionBombError as exc:
        # Pillow refuses images above 2 × Image.MAX_IMAGE_PIXELS (~179 MP) on its own.
        raise SlideError(
            f"{path}: plain image is too large to decode whole ({_one_line(exc)}); convert it to "
            "a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)"
        ) from exc


def _open_image(path: Path) -> _ImageReader:
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            pixels = _load_tiff_pixels(path)
        else:
            pixels = _load_pillow_pixels(path)
    except _PILLOW_ERRORS as exc:
        if not _is_decoder_error(exc):
            raise
        raise SlideError(f"{path}: cannot read image: {_one_line(exc)}") from exc
    return _ImageReader(_to_rgb(pixels))


def _open_reader(path: Path, backend: str) -> _Reader:
    """Open ``path`` with ``backend``; plain images the slide reader rejects fall back to image."""
    _check_tiff_structure(path)
    if backend == "image":
        return _open_image(path)
    opener = openslide.OpenSlide if backend == "openslide" else tiffslide.TiffSlide
    # "Not my format" (as opposed to "my format, but broken") is what allows the fallback.
    unsupported = (
        openslide.OpenSlideUnsupportedFormatError
        if backend == "openslide"
        else tifffile.TiffFileError
    )
    try:
        handle = opener(str(path))
    except unsupported as exc:
        if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
            log.info("%s: not a slide %s can read; reading it as a plain image", path, backend)
            return _open_image(path)
        raise SlideError(f"{path}: not a slide format {backend} can read") from exc
    except _DECODER_ERRORS as exc:
        if not _is_decoder_error(exc):
            raise
        raise SlideError(f"{path}: cannot open slide with {backend}: {_one_line(exc)}") from exc
    try:  # tiffslide parses levels and properties lazily: a truncated file can fail here
        return _OpenSlideLikeReader(handle, backend)
    except _DECODER_ERRORS as exc:
        handle.close()
        if not _is_decoder_error(exc):
            raise
        raise SlideError(f"{path}: cannot open slide with {backend}: {_one_line(exc)}") from exc


# ------------------------------------------------------------------------------------------ mpp


def _positive_pair(x: Any, y: Any) -> tuple[float, float] | None:
    """``(float(x), float(y))`` if both are finite and > 0 (some files store 0 for "unknown")."""
    try:
        values = (float(x), float(y))
    except (TypeError, ValueError):
        return None
    if all(math.isfinite(v) and v > 0 for v in values):
        return values
    return None


def _mpp_from_properties(props: Mapping[str, Any], backend: str) -> tuple[float, float] | None:
    x = props.get(f"{backend}.mpp-x")
    return _positive_pair(x, props.get(f"{backend}.mpp-y", x)) if x is not None else None


def _tiff_page0(path: Path) -> tifffile.TiffPage | None:
    """First TIFF page (tags already parsed), or None when the file is no TIFF."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            page.tags  # noqa: B018 - tags are parsed while the file is open
            return page
    except _DECODER_ERRORS as exc:
        if not _is_decoder_error(exc):
            raise
        return None


def _mpp_from_aperio_description(description: str | None) -> tuple[float, float] | None:
    match = _APERIO_MPP.search(description or "")
    return _positive_pair(match[1], match[1]) if match else None


def _mpp_from_tiff_tags(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """XResolution/YResolution (pixels per unit) and ResolutionUnit -> µm per pixel."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    um_per_unit = _TIFF_UNIT_UM.get(tags["ResolutionUnit"].value)
    if um_per_unit is None:  # RESUNIT.NONE: the ratio has no physical meaning
        return None
    x_num, x_den = tags["XResolution"].value
    y_num, y_den = tags["YResolution"].value if "YResolution" in tags else (x_num, x_den)
    if x_num <= 0 or y_num <= 0:
        return None
    return _positive_pair(um_per_unit * x_den / x_num, um_per_unit * y_den / y_num)


def _find_mpp(path: Path, reader: _Reader) -> tuple[float, float, str] | None:
    """``(mpp_x, mpp_y, source)`` from the first metadata source that has one."""
    found = _mpp_from_properties(reader.properties, reader.backend)
    if found:
        return (*found, f"{reader.backend}.mpp-x")
    page = _tiff_page0(path)
    description = reader.properties.get("tiff.ImageDescription")
    if description is None and page is not None:
        description = page.description
    found = _mpp_from_aperio_description(description)
    if found:
        return (*found, "aperio-description")
    found = _mpp_from_tiff_tags(page) if page is not None else None
    if found:
        return (*found, "tiff-resolution")
    return None


def _resolve_mpp(path: Path, reader: _Reader, override: float | None) -> tuple[float, str]:
    """Level-0 µm per pixel and its source; raise SlideError when unknown or implausible."""
    if override is not None:
        mpp, source = float(override), "override"
    else:
        found = _find_mpp(path, reader)
        if found is None:
            raise SlideError(f"{path}: resolution unknown (no mpp metadata); pass --mpp")
        mpp, mpp_y, source = found
        if abs(mpp - mpp_y) > MPP_ANISOTROPY_WARN * mpp:
            log.warning(
                "%s: pixels are not square (mpp x %.4f, y %.4f from %s); using x",
                path,
                mpp,
                mpp_y,
                source,
            )
    low, high = MPP_RANGE
    if not (math.isfinite(mpp) and low <= mpp <= high) and source == "override":
        raise SlideError(
            f"--mpp {mpp:g}: implausible resolution (expected {low:g}-{high:g} µm per pixel)"
        )
    if not (math.isfinite(mpp) and low <= mpp <= high):
        raise SlideError(
            f"{path}: implausible resolution {mpp:g} µm/px from {source} "
            f"(expected {low:g}-{high:g}); pass --mpp"
        )
    return mpp, source


def _bounds_xy(
    props: Mapping[str, Any], backend: str, dims_xy: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of the region QuPath shows: OpenSlide's bounds-* or the whole level 0.

    QuPath's OpenSlide server crops to ``openslide.bounds-*`` (PEERS.md §6.2), so level-0
    coordinates must be shifted by ``(-x, -y)`` for QuPath.
    """
    keys = [f"{backend}.bounds-{k}" for k in ("x", "y", "width", "height")]
    values = [props.get(k) for k in keys]
    if any(v is None for v in values):
        return (0, 0, *dims_xy)
    x, y, w, h = (int(v) for v in values)
    return (x, y, w, h)


# ---------------------------------------------------------------------------------------- Slide


class Slide:
    """An open slide with a known level-0 resolution; a context manager (``close()`` releases it).

    Attributes:
        path: the slide file.
        backend: ``"openslide"``, ``"tiffslide"`` or ``"image"``.
        dimensions_xy: level-0 (width, height) in the reader's coordinates.
        bounds_xy: (x, y, w, h) in level-0 pixels of the region QuPath shows (OpenSlide's
            ``openslide.bounds-*`` when present, else the whole level 0). Subtract (x, y) from
            level-0 coordinates to get QuPath coordinates.
        mpp: level-0 µm per pixel (x).
        mpp_source: where ``mpp`` came from (see the module docstring).
        level_dimensions_xy: (width, height) of every pyramid level, finest first.
        level_downsamples: level-0 pixels per level pixel, finest first.
        properties: the reader's metadata (``openslide.*``, ``tiffslide.*``, ``aperio.*``, ...).

    Slides pickle by re-opening the file (for worker processes).
    """

    def __init__(
        self,
        path: Path,
        reader: _Reader,
        mpp: float,
        mpp_source: str,
        *,
        mpp_override: float | None = None,
    ) -> None:
        self.path = path
        self.backend = reader.backend
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.level_dimensions_xy = reader.level_dimensions
        self.level_downsamples = reader.level_downsamples
        self.dimensions_xy = reader.level_dimensions[0]
        self.bounds_xy = _bounds_xy(reader.properties, reader.backend, self.dimensions_xy)
        self.properties = reader.properties
        self._reader: _Reader | None = reader
        self._mpp_override = mpp_override

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the reader (idempotent)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle by re-opening, so worker processes get their own reader handle."""
        return open_slide, (self.path, self.backend, self._mpp_override)

    def __repr__(self) -> str:
        width, height = self.dimensions_xy
        return (
            f"Slide({str(self.path)!r}, backend={self.backend!r}, {width}x{height} px, "
            f"mpp={self.mpp:g} from {self.mpp_source}, levels={len(self.level_downsamples)})"
        )

    # -- levels ----------------------------------------------------------------------------------

    def best_level(self, target_mpp: float) -> int:
        """Index of the coarsest level whose resolution is finer than or equal to ``target_mpp``.

        A level up to ``LEVEL_TOLERANCE`` coarser still counts (pyramid downsamples computed
        from rounded level sizes are often 4.0007 instead of 4). Targets finer than level 0
        give level 0 (the region is then upsampled).
        """
        if not target_mpp > 0:
            raise ValueError(f"target_mpp must be > 0, got {target_mpp}")
        wanted = target_mpp / self.mpp * (1 + LEVEL_TOLERANCE)
        candidates = [i for i, d in enumerate(self.level_downsamples) if d <= wanted]
        return max(candidates, key=lambda i: self.level_downsamples[i], default=0)

    # -- reading ---------------------------------------------------------------------------------

    def read_region_at_mpp(
        self, origin_xy: tuple[int, int], size_px: tuple[int, int], target_mpp: float
    ) -> np.ndarray:
        """``H×W×3`` uint8 RGB region at ``target_mpp``.

        Args:
            origin_xy: top-left corner in level-0 pixels (reader coordinates, not bounds-shifted).
            size_px: (w, h) of the output in target-resolution pixels.
            target_mpp: µm per output pixel.

        Reads the level chosen by :meth:`best_level` in ONE reader call, then takes exact area
        averages when downsampling (any fractional factor and sub-pixel offset) or interpolates
        bilinearly when upsampling. Exactly 1:1 reads are plain crops. Areas outside the slide
        are white (255); transparent pixels are composited on white.

        Raises:
            SlideError: the pixels cannot be decoded (truncated or corrupt file).
        """
        width, height = (int(v) for v in size_px)
        if width <= 0 or height <= 0:
            raise ValueError(f"size_px must be positive, got {size_px}")
        return self._read_at_mpp(
            (float(origin_xy[0]), float(origin_xy[1])), (width, height), target_mpp
        )

    def thumbnail(self, target_mpp: float) -> np.ndarray:
        """The whole level 0 as ``H×W×3`` uint8 at ``target_mpp`` (coarse, e.g. 8 µm/px).

        ``H = ceil(height·mpp/target_mpp)`` and likewise ``W``; thumbnail pixel (j, i) covers
        level-0 ``[j·s, (j+1)·s) × [i·s, (i+1)·s)`` with ``s = target_mpp / mpp`` (the last
        row/column may stick out of the slide and is padded with white). Reads the coarsest
        suitable level, in horizontal strips of at most ``MAX_READ_PIXELS`` level pixels so a
        slide without a pyramid is never decoded whole.
        """
        step0 = target_mpp / self.mpp
        width = max(1, math.ceil(self.dimensions_xy[0] / step0 - 1e-6))
        height = max(1, math.ceil(self.dimensions_xy[1] / step0 - 1e-6))
        if width * height > MAX_THUMBNAIL_PIXELS:
            raise ValueError(
                f"a thumbnail at {target_mpp} µm/px would be {width}x{height} px; use a coarser mpp"
            )
        level = self.best_level(target_mpp)
        step_level = step0 / self.level_downsamples[level]
        level_px_per_row = math.ceil(width * step_level) * math.ceil(step_level + 1)
        rows_per_read = max(1, MAX_READ_PIXELS // level_px_per_row)
        strips = [
            self._read_at_mpp(
                (0.0, row * step0), (width, min(rows_per_read, height - row)), target_mpp
            )
            for row in range(0, height, rows_per_read)
        ]
        return np.concatenate(strips, axis=0)

    def _read_at_mpp(
        self, origin_xy: tuple[float, float], size_px: tuple[int, int], target_mpp: float
    ) -> np.ndarray:
        """:meth:`read_region_at_mpp` with a fractional level-0 origin."""
        level = self.best_level(target_mpp)
        downsample = self.level_downsamples[level]
        step = target_mpp / self.mpp / downsample  # level pixels per output pixel
        x_level, y_level = origin_xy[0] / downsample, origin_xy[1] / downsample
        # Level-pixel window covering every level pixel the output region touches.
        x0, y0 = math.floor(x_level + 1e-9), math.floor(y_level + 1e-9)
        x1 = math.ceil(x_level + size_px[0] * step - 1e-9)
        y1 = math.ceil(y_level + size_px[1] * step - 1e-9)
        window = self._read_window(level, (x0, y0), (x1 - x0, y1 - y0))
        box = (
            x_level - x0,
            y_level - y0,
            x_level - x0 + size_px[0] * step,
            y_level - y0 + size_px[1] * step,
        )
        return _resample(window, size_px, box, step)

    def _read_window(
        self, level: int, xy_level: tuple[int, int], size_xy: tuple[int, int]
    ) -> np.ndarray:
        """``h×w×3`` level pixels ``[x, x+w) × [y, y+h)``; white outside the level."""
        if self._reader is None:
            raise ValueError(f"{self.path}: slide is closed")
        (x, y), (w, h) = xy_level, size_xy
        level_w, level_h = self.level_dimensions_xy[level]
        ix0, iy0 = max(x, 0), max(y, 0)
        ix1, iy1 = min(x + w, level_w), min(y + h, level_h)
        if (ix0, iy0, ix1, iy1) == (x, y, x + w, y + h):
            return self._read_level(level, (x, y), (w, h))
        canvas = np.full((h, w, 3), 255, dtype=np.uint8)
        if ix1 > ix0 and iy1 > iy0:
            inside = self._read_level(level, (ix0, iy0), (ix1 - ix0, iy1 - iy0))
            canvas[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = inside
        return canvas

    def _read_level(
        self, level: int, xy_level: tuple[int, int], size_xy: tuple[int, int]
    ) -> np.ndarray:
        if self._reader is None:
            raise ValueError(f"{self.path}: slide is closed")
        try:
            return self._reader.read_level(level, xy_level, size_xy)
        except _DECODER_ERRORS as exc:
            if not _is_decoder_error(exc):
                raise
            (x, y), (w, h) = xy_level, size_xy
            raise SlideError(
                f"{self.path}: cannot read pixels (level {level}, {w}x{h} at {x},{y}): "
                f"{_one_line(exc)}"
            ) from exc


def _area_weights(size_out: int, start: float, step: float, size_in: int) -> sparse.csr_matrix:
    """``size_out×size_in`` matrix of exact area-averaging weights along one axis.

    Output pixel j covers source ``[start + j·step, start + (j+1)·step)``; source pixel i covers
    ``[i, i+1)``; the weight is their overlap divided by ``step``, so every row sums to 1 (the
    cv2 ``INTER_AREA`` rule, for any fractional factor and offset).
    """
    edges = start + step * np.arange(size_out + 1)
    first = np.floor(edges[:-1]).astype(np.int64)
    span = int(np.max(np.ceil(edges[1:]) - first))
    cols = first[:, np.newaxis] + np.arange(span)
    overlap = np.minimum(cols + 1, edges[1:, np.newaxis]) - np.maximum(cols, edges[:-1, np.newaxis])
    rows = np.broadcast_to(np.arange(size_out)[:, np.newaxis], cols.shape)
    keep = (overlap > 0) & (cols < size_in)
    weights = (overlap[keep] / step).astype(np.float32)
    return sparse.csr_matrix((weights, (rows[keep], cols[keep])), shape=(size_out, size_in))


def _resample(
    window: np.ndarray,
    size_px: tuple[int, int],
    box: tuple[float, float, float, float],
    step: float,
) -> np.ndarray:
    """Resample ``box`` (x0, y0, x1, y1; pixel i spans [i, i+1)) of ``window`` to ``size_px``.

    Downsampling is exact area averaging (:func:`_area_average`); upsampling is bilinear
    (Pillow, with the sub-pixel source box); a 1:1 step at an integer offset is a plain crop.
    """
    (x0, y0), (width, height) = box[:2], size_px
    if abs(step - 1) < 1e-9 and abs(x0 - round(x0)) < 1e-6 and abs(y0 - round(y0)) < 1e-6:
        col, row = round(x0), round(y0)
        return np.ascontiguousarray(window[row : row + height, col : col + width])
    if step < 1:
        image = Image.fromarray(np.ascontiguousarray(window))
        resized = image.resize(size_px, resample=Image.Resampling.BILINEAR, box=box)
        return np.array(resized)  # a writeable copy
    return _area_average(window, size_px, (x0, y0), step)


def _area_average(
    window: np.ndarray, size_px: tuple[int, int], start_xy: tuple[float, float], step: float
) -> np.ndarray:
    """Exact area-average downsampling of ``window`` (``H×W×3`` uint8), see _area_weights.

    Rows are reduced first (one sparse product for all channels), then columns; the work goes
    in blocks of ``AREA_BLOCK_PX`` output columns so the float32 copy stays small.
    """
    (width, height), (x0, y0) = size_px, start_xy
    rows = _area_weights(height, y0, step, window.shape[0])
    out = np.empty((height, width, 3), dtype=np.uint8)
    for j0 in range(0, width, AREA_BLOCK_PX):
        j1 = min(j0 + AREA_BLOCK_PX, width)
        a = math.floor(x0 + j0 * step)
        b = min(math.ceil(x0 + j1 * step), window.shape[1])
        cols = _area_weights(j1 - j0, x0 + j0 * step - a, step, b - a)
        block = window[:, a:b].astype(np.float32).reshape(window.shape[0], -1)
        reduced = rows @ block  # height × (b - a)·3
        reduced = reduced.reshape(height, b - a, 3).transpose(1, 0, 2).reshape(b - a, -1)
        averaged = (cols @ reduced).reshape(j1 - j0, height, 3).transpose(1, 0, 2)
        out[:, j0:j1] = np.clip(np.rint(averaged), 0, 255)
    return out


def open_slide(path: str | Path, backend: str = "openslide", mpp: float | None = None) -> Slide:
    """Open a slide (or a small plain image) and establish its level-0 mpp.

    Args:
        path: slide file (.svs, .ndpi, .mrxs, pyramidal .tiff, ...) or plain TIFF/PNG/JPEG.
        backend: ``"openslide"`` (default), ``"tiffslide"`` or ``"image"``. Plain .png/.jpg/.tif
            files that the slide reader rejects as unsupported fall back to ``"image"``.
        mpp: µm per level-0 pixel; overrides the metadata (source ``"override"``).

    Raises:
        SlideError: missing, unopenable or corrupt file; unknown or implausible mpp; plain image
            too large to decode whole.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(path)
    if path.is_dir():
        raise SlideError(f"{path}: is a folder, not a slide file")
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    reader = _open_reader(path, backend)
    try:
        slide_mpp, source = _resolve_mpp(path, reader, mpp)
    except BaseException:
        reader.close()
        raise
    slide = Slide(path, reader, slide_mpp, source, mpp_override=mpp)
    log.debug("opened %r", slide)  # worker processes open the slide too: debug, not info
    return slide
