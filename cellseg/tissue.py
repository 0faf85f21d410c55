"""Tissue detection on a low-resolution slide thumbnail, so the pipeline can skip bare glass.

Stained tissue is coloured and glass is grey-white, so the HSV saturation separates them better
than brightness does (pale eosin stroma is almost as bright as glass but clearly pink). The
threshold is Otsu's (scikit-image) on the saturation of the smoothed thumbnail, kept only when
it separates two real populations and clamped to a band: on a thumbnail that is all glass Otsu
merely splits sensor noise (one population: a fixed threshold is used instead), and on one that
is all tissue it splits haematoxylin from eosin (it lands above the band and is clamped down).
This is the CLAM/HistomicsTK recipe (saturation threshold, then morphology) with Otsu kept for
stains that are paler or stronger than usual.

A greyscale image (a grey PNG, a desaturated scan) has no saturation at all; there tissue is
found by darkness instead (glass is the brightest thing on a slide), with the same Otsu rule.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import color, filters, morphology

SATURATION_BAND = (0.04, 0.10)  # clamp for Otsu: glass stays below 0.04, pale stroma above 0.10
FALLBACK_SATURATION = 0.07  # used when Otsu splits a single population (all glass, one stain)
MIN_OTSU_EFFECTIVENESS = 0.8  # σ²_between / σ²_total; a unimodal Gaussian gives 2/π ≈ 0.64
SMOOTHING_SIGMA_PX = 1.0
GREY_SPREAD = 8 / 255  # max - min over R, G, B below which a pixel is grey
GREY_FRACTION = 0.99  # share of grey pixels that makes the whole thumbnail greyscale
DARKNESS_BAND = (0.08, 0.25)  # 1 - brightness: glass is ~0.05, the palest tissue ~0.15
FALLBACK_DARKNESS = 0.12


def _otsu_effectiveness(values: np.ndarray, threshold: float) -> float:
    """Otsu's separability measure η = σ²_between / σ²_total of the split at ``threshold``."""
    upper = values > threshold
    fraction = np.count_nonzero(upper) / values.size
    if fraction in (0.0, 1.0):
        return 0.0
    between = fraction * (1 - fraction) * (values[upper].mean() - values[~upper].mean()) ** 2
    return float(between / values.var())


def is_greyscale(rgb: np.ndarray) -> bool:
    """Whether an ``H×W×3`` float image in [0, 1] is grey (R = G = B) almost everywhere."""
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return float(np.mean(spread <= GREY_SPREAD)) >= GREY_FRACTION


def tissue_threshold(
    saturation: np.ndarray,
    band: tuple[float, float] = SATURATION_BAND,
    fallback: float = FALLBACK_SATURATION,
) -> float:
    """Saturation threshold separating tissue (above) from glass (below), values in [0, 1].

    Otsu's threshold when it splits two distinct populations (effectiveness η ≥
    ``MIN_OTSU_EFFECTIVENESS``), clamped to ``band``; otherwise ``fallback``. (Used on darkness
    too, for greyscale images.)
    """
    if np.ptp(saturation) == 0:  # a constant image has no Otsu threshold
        return fallback
    threshold = float(filters.threshold_otsu(saturation))
    if _otsu_effectiveness(saturation, threshold) < MIN_OTSU_EFFECTIVENESS:
        return fallback
    return float(np.clip(threshold, *band))


def tissue_mask(
    thumbnail_rgb: np.ndarray,
    *,
    band: tuple[float, float] = SATURATION_BAND,
    closing_radius_px: int = 2,
    min_object_px: int = 64,
) -> np.ndarray:
    """Boolean ``H×W`` tissue mask of an ``H×W×3`` uint8 RGB thumbnail (typically 4-16 µm/px).

    Steps: Gaussian smoothing of the RGB (σ = 1 px) so sensor and JPEG noise do not inflate the
    saturation (max − min is biased upwards by noise); HSV saturation; threshold
    (:func:`tissue_threshold`); morphological closing (disk of ``closing_radius_px``) to join
    fragmented stroma and opening (disk of 1 px) to drop dust; holes filled (lumens and fat inside
    tissue still get segmented, which is cheaper than missing nuclei at their rims); connected
    objects smaller than ``min_object_px`` removed.
    """
    if thumbnail_rgb.ndim != 3 or thumbnail_rgb.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB thumbnail, got shape {thumbnail_rgb.shape}")
    rgb = ndi.gaussian_filter(
        thumbnail_rgb.astype(np.float32) / 255, (SMOOTHING_SIGMA_PX,) * 2 + (0,)
    )
    if is_greyscale(rgb):
        darkness = 1.0 - rgb.mean(axis=-1)
        mask = darkness > tissue_threshold(darkness, DARKNESS_BAND, FALLBACK_DARKNESS)
    else:
        saturation = color.rgb2hsv(np.clip(rgb, 0, 1))[..., 1]
        mask = saturation > tissue_threshold(saturation, band)
    if closing_radius_px > 0:
        mask = morphology.closing(mask, morphology.disk(closing_radius_px))
    mask = morphology.opening(mask, morphology.disk(1))
    mask = ndi.binary_fill_holes(mask)
    return morphology.remove_small_objects(mask, max_size=min_object_px - 1)


def tissue_area_mm2(mask: np.ndarray, mpp_of_mask: float) -> float:
    """Area of the True pixels of ``mask`` in mm², each pixel being ``mpp_of_mask`` µm wide."""
    return float(np.count_nonzero(mask)) * (mpp_of_mask / 1000.0) ** 2
