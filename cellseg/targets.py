"""Training targets from instance label maps (SPEC §8.2; docs/ARCHITECTURE.md conventions).

Class targets are ``H×W uint8``: 0 background, 1 nucleus interior, 2 nucleus boundary.
Distance targets (models with ``distance_head``) are derived from the class targets, so every
augmentation that yields class maps yields consistent distances without carrying instance ids.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
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


def distance_targets(classes: np.ndarray) -> np.ndarray:
    """Normalised distance map of each nucleus interior (issue 10 point 4), ``float32`` in [0, 1].

    Each connected component of the interior class (``classes == 1``, 8-connected: the
    boundary class keeps the interiors of touching nuclei apart, even diagonally, see
    :func:`class_targets`) gets its Euclidean distance to the nearest non-interior pixel divided
    by its own maximum, as the distance-map output of Naylor et al. (IEEE TMI 2019): 1 on each
    nucleus's medial core, falling to 0 at its boundary, background 0. Dividing per nucleus
    makes one marker threshold work for small lymphocytes and large tumour nuclei alike.

    Args:
        classes: ``H×W`` or ``B×H×W`` integer class map (0 background, 1 interior, 2 boundary).

    Returns:
        ``float32`` array of the same shape.
    """
    classes = np.asarray(classes)
    if classes.ndim == 3:
        return np.stack([distance_targets(c) for c in classes])
    interior = classes == 1
    out = np.zeros(classes.shape, np.float32)
    components, n = ndimage.label(interior, structure=np.ones((3, 3), bool))
    if n == 0:
        return out
    # The image border counts as outside: a nucleus cut by a crop peaks inside the crop.
    distance = ndimage.distance_transform_edt(np.pad(interior, 1))[1:-1, 1:-1]
    peaks = ndimage.maximum(distance, components, np.arange(1, n + 1))
    scale = np.concatenate([[1.0], np.asarray(peaks, np.float64)])
    out[interior] = (distance[interior] / scale[components[interior]]).astype(np.float32)
    return out


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
