"""Resampling images and label maps between resolutions (bilinear images, nearest labels)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cellseg.data import Sample


def resize_labels_nearest(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize sampling at pixel centres (``torch`` ``nearest-exact``)."""
    rows = _nearest_indices(labels.shape[0], size_hw[0])
    cols = _nearest_indices(labels.shape[1], size_hw[1])
    return labels[np.ix_(rows, cols)]


def _nearest_indices(in_px: int, out_px: int) -> np.ndarray:
    centres = (np.arange(out_px) + 0.5) * (in_px / out_px)
    return np.minimum(centres.astype(np.int64), in_px - 1)


def resize_image(image: np.ndarray, size_hw: tuple[int, int], antialias: bool) -> np.ndarray:
    """Bilinear resize of ``H×W×3 uint8`` to ``size_hw`` (half-pixel centres), rounded to uint8.

    ``antialias=False`` reproduces ``cv2.resize`` INTER_LINEAR; ``antialias=True`` widens the
    filter when downsampling (as Pillow), so no aliasing when changing resolution.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(
        tensor, size=size_hw, mode="bilinear", align_corners=False, antialias=antialias
    )
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_sample(sample: Sample, target_mpp: float) -> Sample:
    """``sample`` resampled to about ``target_mpp`` µm/px.

    The image is bilinear with antialiasing when downsampling, labels are nearest. Sizes are
    rounded to whole pixels, so the returned ``mpp`` is the one achieved along x
    (e.g. 0.2527 µm/px at 1000 px → 505 px at 0.50040 µm/px).
    """
    height, width = sample.labels.shape
    factor = sample.mpp / target_mpp
    size_hw = (max(1, round(height * factor)), max(1, round(width * factor)))
    if size_hw == (height, width):
        return sample
    image = resize_image(sample.image, size_hw, antialias=factor < 1)
    labels = resize_labels_nearest(sample.labels, size_hw)
    return dataclasses.replace(
        sample, image=image, labels=labels, mpp=sample.mpp * width / size_hw[1]
    )
