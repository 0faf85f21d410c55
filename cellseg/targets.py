"""Training targets from instance label maps (SPEC §8.2; docs/ARCHITECTURE.md conventions).

Class targets are ``H×W uint8``: 0 background, 1 nucleus interior, 2 nucleus boundary.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import find_boundaries

from cellseg.resample import resize_labels_nearest


def class_targets(labels: np.ndarray) -> np.ndarray:
    """``H×W uint8`` classes from ``H×W`` instance labels: 0 background, 1 interior, 2 boundary.

    The boundary is each instance's own pixels that 4-touch background or another instance
    (``find_boundaries(mode="inner", connectivity=1)``): 1 px wide against background, and 2 px
    (one per side) between touching nuclei, so interiors of touching nuclei never touch and can
    seed one watershed marker each. Instance edges on the image border are not boundary.
    """
    targets = (labels > 0).astype(np.uint8)
    targets[find_boundaries(labels, connectivity=1, mode="inner")] = 2
    return targets


def paper_mask(labels: np.ndarray, size: int = 224) -> np.ndarray:
    """UCTransNet ground truth (SPEC §8.2): the binary mask resized to ``size×size`` with
    bilinear interpolation as ``cv2.resize`` (half-pixel centres, no antialiasing), then ``> 0``.

    Returns ``size×size bool``. The threshold slightly dilates the nuclei (test-set foreground
    0.221 against 0.198 with nearest resizing, SPEC §8.2); kept for comparability.
    """
    foreground = torch.from_numpy((labels > 0).astype(np.float32))[None, None]
    resized = F.interpolate(
        foreground, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )
    return (resized[0, 0] > 0).numpy()


def paper_targets(labels: np.ndarray, size: int = 224) -> np.ndarray:
    """``size×size uint8`` class targets of the paper preset.

    Foreground is :func:`paper_mask`. Boundary (class 2) is the inner boundary of the
    nearest-resized instance map plus the rim that the bilinear threshold adds around it, so
    every interior pixel lies inside a boundary ring and the rim cannot bridge the interiors
    of neighbouring nuclei. The nearest map lies inside the paper mask (its sample is one of
    the bilinear taps, with weight ≥ 0.5), so binary metrics see exactly :func:`paper_mask`.
    """
    return paper_targets_from(paper_label_map(labels, size))


PAPER_RIM = -1
"""Label of the paper mask's rim in :func:`paper_label_map`: foreground outside every nucleus."""


def paper_label_map(labels: np.ndarray, size: int = 224) -> np.ndarray:
    """``size×size int32``: the nearest-resized instance map, plus :data:`PAPER_RIM` on the
    pixels that only the bilinear :func:`paper_mask` counts as foreground.

    This one map carries both parts of :func:`paper_targets`, so a geometric augmentation can
    warp it (nearest) and derive the targets afterwards with :func:`paper_targets_from`: the
    foreground keeps its SPEC §8.2 meaning and the boundary rings stay closed.
    """
    nearest = resize_labels_nearest(labels, (size, size)).astype(np.int32)
    combined = nearest.copy()
    combined[paper_mask(labels, size) & (nearest == 0)] = PAPER_RIM
    return combined


def paper_targets_from(label_map: np.ndarray) -> np.ndarray:
    """Class targets (``H×W uint8``) of a :func:`paper_label_map` (possibly warped)."""
    foreground = label_map != 0
    nearest = np.where(label_map == PAPER_RIM, 0, label_map)
    boundary = find_boundaries(nearest, connectivity=1, mode="inner") | (nearest == 0)
    targets = foreground.astype(np.uint8)
    targets[boundary & foreground] = 2
    return targets
