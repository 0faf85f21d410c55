"""Synthetic whole-slide images for tests: small tiled pyramidal TIFFs written with tifffile.

``make_pyramid_tiff(path, image_rgb, mpp)`` writes ``image_rgb`` as level 0 plus 2×-downsampled
levels (exact 2×2 means, see :func:`downsample_levels`), tiled and losslessly compressed, so tests
can compare what a reader returns with numpy crops of the known pixels. With ``aperio=True`` (the
default) the file is an Aperio-style SVS: an ImageDescription starting "Aperio Image Library" with
``|MPP = …``, the levels in consecutive directories and a stripped thumbnail in directory 1 (the
layout both OpenSlide's aperio driver and tifffile's SVS series parser expect). With
``aperio=False`` it is a generic tiled TIFF (OpenSlide's generic-tiff driver) whose mpp lives only
in the resolution tags. Import it from test files as ``from slides import make_pyramid_tiff``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

APERIO_PREFIX = "Aperio Image Library v12.0.15"

# The shared synthetic slides of conftest.py (fixtures pyramid_slide, generic_pyramid_slide).
SYNTHETIC_MPP = 0.25
SYNTHETIC_SIZE_XY = (2048, 1536)
SYNTHETIC_LEVELS = 3  # subresolution levels: downsamples 1, 2, 4, 8


def downsample_levels(image_rgb: np.ndarray, count: int) -> list[np.ndarray]:
    """``[image, ½ image, ¼ image, …]`` (``count`` extra levels), each a rounded 2×2 block mean.

    Odd trailing rows/columns are dropped, as pyramid writers do (level size = floor(size / 2)).
    """
    levels = [image_rgb]
    for _ in range(count):
        prev = levels[-1]
        height, width = prev.shape[0] // 2, prev.shape[1] // 2
        blocks = prev[: 2 * height, : 2 * width].reshape(height, 2, width, 2, -1)
        levels.append(np.round(blocks.mean(axis=(1, 3))).astype(np.uint8))
    return levels


def smooth_test_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic ``H×W×3`` uint8 image: gradients, low-frequency waves and a little noise.

    Smooth enough that area resampling from different pyramid levels agrees to a few grey
    levels, varied enough that any misplaced pixel shows.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 40 + 170 * xx / max(width - 1, 1)
    green = 40 + 170 * yy / max(height - 1, 1)
    blue = 128 + 80 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
    image = np.stack([red, green, blue], axis=-1) + rng.normal(0, 3, (height, width, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _description(width: int, height: int, tile_px: int, mpp: float | None, level: int) -> str:
    size = f"{width}x{height} [0,0 {width}x{height}] ({tile_px}x{tile_px}) ZLIB"
    if level > 0:
        return f"{APERIO_PREFIX} \n{size}"
    fields = ["AppMag = 40", "StripeWidth = 1000", f"MPP = {mpp}" if mpp else None]
    return f"{APERIO_PREFIX} \n{size}|" + "|".join(f for f in fields if f)


def make_pyramid_tiff(
    path: str | Path,
    image_rgb: np.ndarray,
    mpp: float | None,
    *,
    levels: int = 3,
    tile_px: int = 256,
    aperio: bool = True,
    resolution_tags: bool = True,
    mpp_y: float | None = None,
    compression: str = "zlib",
) -> Path:
    """Write ``image_rgb`` (``H×W×3`` uint8) as a tiled pyramid with ``levels`` subresolutions.

    Args:
        mpp: level-0 µm per pixel written to the Aperio description (``aperio=True``) and to the
            resolution tags (``resolution_tags=True``, in pixels per centimetre); None writes no
            resolution anywhere (ResolutionUnit NONE).
        aperio: Aperio SVS layout and description, else a generic tiled TIFF.
        mpp_y: a different y resolution for the tags (anisotropic pixels); defaults to ``mpp``.
        compression: "zlib" keeps pixels exact; "jpeg" makes a realistic, lossy slide.

    Returns:
        ``path`` as a Path. Level ``k`` of the file equals ``downsample_levels(image, levels)[k]``.
    """
    path = Path(path)
    height, width = image_rgb.shape[:2]
    pyramid = downsample_levels(image_rgb, levels)
    with tifffile.TiffWriter(path) as tif:
        for index, pixels in enumerate(pyramid):
            scale = 2**index
            tags: dict = {"resolutionunit": "NONE", "resolution": (1, 1)}
            if mpp and resolution_tags:
                px_per_cm_x = 1e4 / (mpp * scale)
                px_per_cm_y = 1e4 / ((mpp_y or mpp) * scale)
                tags = {"resolutionunit": "CENTIMETER", "resolution": (px_per_cm_x, px_per_cm_y)}
            description = _description(width, height, tile_px, mpp, index) if aperio else None
            tif.write(
                pixels,
                tile=(tile_px, tile_px),
                photometric="rgb",
                compression=compression,
                description=description,
                # SVS levels are all full images (tifffile's SVS parser relies on it); generic
                # pyramids mark subresolutions as reduced images.
                subfiletype=0 if aperio or index == 0 else 1,
                metadata=None,
                **tags,
            )
            if aperio and index == 0:
                # Directory 1 of an SVS is a stripped thumbnail; tifffile's SVS parser needs it
                # to find the pyramid levels that follow.
                thumb = pyramid[-1]
                tif.write(
                    thumb,
                    photometric="rgb",
                    compression=compression,
                    description=f"{APERIO_PREFIX} \n{width}x{height} -> "
                    f"{thumb.shape[1]}x{thumb.shape[0]}",
                    metadata=None,
                )
    return path
