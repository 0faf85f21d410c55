"""Tissue detection on a low-resolution slide thumbnail, so the pipeline can skip bare glass.

Stained tissue is coloured and glass is grey-white, so the HSV saturation separates them better
than brightness does (pale eosin stroma is almost as bright as glass but clearly pink). The
threshold is Otsu's (scikit-image) on the smoothed saturation, clamped to a fixed band: on a
thumbnail that is all glass Otsu only splits sensor noise (it lands below the band), and on one
that is all tissue it splits haematoxylin from eosin (it lands above the band); in both cases the
clamp turns it into a fixed saturation threshold. This is the CLAM/HistomicsTK recipe (saturation
threshold, then morphology) with Otsu kept for stains that are paler or stronger than usual.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import color, filters, morphology

SATURATION_BAND = (0.04, 0.12)  # clamp for Otsu's threshold; glass is < 0.03, pale eosin > 0.12
SMOOTHING_SIGMA_PX = 1.0


def tissue_threshold(saturation: np.ndarray, band: tuple[float, float] = SATURATION_BAND) -> float:
    """Otsu's threshold of ``saturation`` (values in [0, 1]) clamped to ``band``."""
    low, high = band
    if np.ptp(saturation) == 0:  # a constant image has no Otsu threshold
        return low
    return float(np.clip(filters.threshold_otsu(saturation), low, high))


def tissue_mask(
    thumbnail_rgb: np.ndarray,
    *,
    band: tuple[float, float] = SATURATION_BAND,
    closing_radius_px: int = 2,
    min_object_px: int = 64,
) -> np.ndarray:
    """Boolean ``H×W`` tissue mask of an ``H×W×3`` uint8 RGB thumbnail (typically 4-16 µm/px).

    Steps: saturation (HSV) smoothed with a Gaussian (σ = 1 px) against JPEG noise; threshold
    (:func:`tissue_threshold`); morphological closing (disk of ``closing_radius_px``) to join
    fragmented stroma and opening (disk of 1 px) to drop dust; holes filled (lumens and fat inside
    tissue still get segmented, which is cheaper than missing nuclei at their rims); connected
    objects smaller than ``min_object_px`` removed.
    """
    if thumbnail_rgb.ndim != 3 or thumbnail_rgb.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB thumbnail, got shape {thumbnail_rgb.shape}")
    saturation = color.rgb2hsv(thumbnail_rgb)[..., 1]
    saturation = ndi.gaussian_filter(saturation, SMOOTHING_SIGMA_PX)
    mask = saturation > tissue_threshold(saturation, band)
    if closing_radius_px > 0:
        mask = morphology.closing(mask, morphology.disk(closing_radius_px))
    mask = morphology.opening(mask, morphology.disk(1))
    mask = ndi.binary_fill_holes(mask)
    return morphology.remove_small_objects(mask, max_size=min_object_px - 1)


def tissue_area_mm2(mask: np.ndarray, mpp_of_mask: float) -> float:
    """Area of the True pixels of ``mask`` in mm², each pixel being ``mpp_of_mask`` µm wide."""
    return float(np.count_nonzero(mask)) * (mpp_of_mask / 1000.0) ** 2
