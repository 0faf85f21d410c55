"""Oracle "models" and disc slides for the whole-slide pipeline tests.

An oracle's output at a pixel depends on that pixel's colour only, so the pipeline's stitched
probabilities can be compared exactly with the oracle applied to the whole image (issue 3: "exact
stitching round trip with an oracle model"). :class:`DiscOracle` outputs 0 or 1, for which the
weighted blend ``Σ w·p / Σ w`` is exact in float32; :class:`QuarterOracle` outputs multiples of
1/4, exact up to one float32 rounding and exactly equal once stored as uint8.

Import from test files as ``from oracle import DiscOracle, disc_image``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import disk

BACKGROUND_RGB = (236, 180, 210)  # pink "eosin"
RIM_RGB = (130, 100, 170)  # nucleus boundary class
INTERIOR_RGB = (60, 30, 110)  # nucleus interior class


class DiscOracle:
    """Three-class oracle: dark pixels are interior, medium ones boundary, the rest background.

    Attributes match ``cellseg.inference.Predictor``: ``mpp``, ``tile_px``, ``num_classes``.
    ``calls`` counts tiles seen (to check what a resumed run recomputes).
    """

    tile_px = 224
    num_classes = 3

    def __init__(self, mpp: float = 0.5) -> None:
        self.mpp = mpp
        self.calls = 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        assert tiles.dtype == np.uint8 and tiles.shape[1:] == (self.tile_px, self.tile_px, 3)
        self.calls += len(tiles)
        return self.probabilities(tiles)

    @staticmethod
    def probabilities(images: np.ndarray) -> np.ndarray:
        """``N×H×W×3`` uint8 -> ``N×3×H×W`` float32."""
        grey = images.astype(np.int16).sum(axis=-1)
        interior = grey < 300
        boundary = (grey >= 300) & (grey < 450)
        probs = np.zeros((images.shape[0], 3, *images.shape[1:3]), np.float32)
        probs[:, 0] = ~(interior | boundary)
        probs[:, 1] = interior
        probs[:, 2] = boundary
        return probs


class QuarterOracle(DiscOracle):
    """Graded probabilities (0, 1/4, 3/4, 1: ``p·255`` is never near .5, so uint8 is exact)."""

    @staticmethod
    def probabilities(images: np.ndarray) -> np.ndarray:
        values = np.array([0.0, 0.25, 0.75, 1.0], np.float32)
        red, green = images[..., 0].astype(np.int64), images[..., 1].astype(np.int64)
        p0 = values[red % 4]
        p1 = np.minimum(values[green % 4], 1.0 - p0)
        probs = np.stack([p0, p1, 1.0 - p0 - p1], axis=1)
        return probs.astype(np.float32)


def draw_disc(image: np.ndarray, truth: np.ndarray, centre_yx, radius: float, label: int) -> None:
    """Paints one nucleus: a rim of the boundary colour around a dark interior."""
    rr, cc = disk(centre_yx, radius, shape=truth.shape)
    truth[rr, cc] = label
    image[rr, cc] = RIM_RGB
    y0, x0 = max(0, rr.min() - 1), max(0, cc.min() - 1)
    box = (slice(y0, rr.max() + 2), slice(x0, cc.max() + 2))
    inner = ndi.binary_erosion(truth[box] == label, iterations=2)
    image[box][inner] = INTERIOR_RGB


def disc_image(
    height: int,
    width: int,
    centres_yx: list[tuple[float, float]],
    radius: float = 9.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(H×W×3 uint8 image, H×W int32 truth labels)`` with one disc per centre (ids 1..n).

    Centres closer than ``2·radius + 4`` to an earlier one are skipped, so discs never touch.
    """
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUND_RGB
    truth = np.zeros((height, width), np.int32)
    kept: list[tuple[float, float]] = []
    for cy, cx in centres_yx:
        if any((cy - y) ** 2 + (cx - x) ** 2 < (2 * radius + 4) ** 2 for y, x in kept):
            continue
        kept.append((cy, cx))
        draw_disc(image, truth, (cy, cx), radius, len(kept))
    return image, truth


def seam_centres(
    height: int, width: int, seams: list[int], step: int = 37
) -> list[tuple[int, int]]:
    """Disc centres ON every seam line (both axes) and at their crossings."""
    centres = [(y, x) for y in seams for x in seams if y < height and x < width]
    for seam in seams:
        centres += [(y, seam) for y in range(15, height - 15, step) if seam < width]
        centres += [(seam, x) for x in range(15, width - 15, step) if seam < height]
    return [(y, x) for y, x in centres if 12 <= y < height - 12 and 12 <= x < width - 12]


def use_oracle_in_cli(monkeypatch) -> None:
    """``cellseg predict`` with the disc oracle instead of a checkpoint, reading in-process."""
    import cellseg.cli.predict as cli_predict

    from cellseg import predict

    monkeypatch.setattr(cli_predict, "_load_predictor", lambda *args, **kwargs: DiscOracle())
    monkeypatch.setattr(predict, "default_workers", lambda: 0)
    monkeypatch.setattr(predict, "default_label_workers", lambda: 0)
