"""Tissue detection on synthetic thumbnails (pink tissue on white glass) and the CMU slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import filters

from cellseg.slide import open_slide
from cellseg.tissue import (
    FALLBACK_SATURATION,
    SATURATION_BAND,
    tissue_area_mm2,
    tissue_mask,
    tissue_threshold,
)

GLASS_RGB = (238, 236, 240)
EOSIN_RGB = (232, 150, 190)  # saturation 0.35
HAEMATOXYLIN_RGB = (110, 70, 150)  # saturation 0.53
PALE_EOSIN_RGB = (240, 205, 222)  # saturation 0.15: faint stroma must still count


def _thumbnail(shape: tuple[int, int], seed: int = 0, noise: float = 4.0) -> np.ndarray:
    """Glass with sensor noise, ``H×W×3`` uint8."""
    rng = np.random.default_rng(seed)
    image = np.broadcast_to(np.asarray(GLASS_RGB, np.float64), (*shape, 3))
    return np.clip(image + rng.normal(0, noise, (*shape, 3)), 0, 255).astype(np.uint8)


def _disc(shape: tuple[int, int], centre_rc: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre_rc[0]) ** 2 + (cols - centre_rc[1]) ** 2 <= radius**2


def _paint(image: np.ndarray, where: np.ndarray, rgb: tuple[int, int, int]) -> None:
    image[where] = np.clip(image[where].astype(int) - np.asarray(GLASS_RGB) + rgb, 0, 255)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def test_pink_blob_on_glass() -> None:
    image = _thumbnail((120, 160))
    blob = _disc(image.shape[:2], (60, 70), 35)
    _paint(image, blob, EOSIN_RGB)
    _paint(image, _disc(image.shape[:2], (60, 70), 12), HAEMATOXYLIN_RGB)
    mask = tissue_mask(image)
    assert mask.dtype == bool and mask.shape == (120, 160)
    assert _iou(mask, blob) > 0.95


def test_pale_tissue_is_found_next_to_dark_tissue() -> None:
    image = _thumbnail((100, 200), seed=1)
    dark = _disc(image.shape[:2], (50, 50), 30)
    pale = _disc(image.shape[:2], (50, 150), 30)
    _paint(image, dark, HAEMATOXYLIN_RGB)
    _paint(image, pale, PALE_EOSIN_RGB)
    mask = tissue_mask(image)
    assert _iou(mask, dark | pale) > 0.9
    assert mask[pale].mean() > 0.95


def test_all_glass_has_no_tissue() -> None:
    image = _thumbnail((100, 100), seed=2, noise=6.0)
    assert not tissue_mask(image).any()
    assert not tissue_mask(np.full((50, 50, 3), 255, np.uint8)).any()


def test_all_tissue_is_all_tissue() -> None:
    rng = np.random.default_rng(3)
    image = np.where(
        rng.random((100, 100, 1)) < 0.5,
        np.asarray(EOSIN_RGB, np.uint8),
        np.asarray(HAEMATOXYLIN_RGB, np.uint8),
    )
    assert tissue_mask(image).all()


def test_holes_are_filled_and_specks_removed() -> None:
    image = _thumbnail((120, 120), seed=4)
    ring = _disc(image.shape[:2], (60, 60), 40) & ~_disc(image.shape[:2], (60, 60), 15)
    speck = _disc(image.shape[:2], (8, 110), 2)  # 13 px of dust
    _paint(image, ring, EOSIN_RGB)
    _paint(image, speck, HAEMATOXYLIN_RGB)
    mask = tissue_mask(image)
    assert mask[_disc(image.shape[:2], (60, 60), 14)].all()  # the lumen counts as tissue
    assert not mask[speck].any()


def test_threshold_is_otsu_when_meaningful_else_fixed() -> None:
    rng = np.random.default_rng(5)
    low, high = SATURATION_BAND
    assert tissue_threshold(np.zeros((10, 10))) == FALLBACK_SATURATION
    glass = rng.normal(0.015, 0.005, 5000)
    assert tissue_threshold(glass) == FALLBACK_SATURATION  # one population: Otsu meaningless
    two_stains = np.r_[rng.normal(0.35, 0.03, 3000), rng.normal(0.55, 0.03, 3000)]
    assert tissue_threshold(two_stains) == high  # Otsu between two stains: clamped down
    glass_and_tissue = np.r_[rng.normal(0.02, 0.01, 5000), rng.normal(0.14, 0.03, 3000)]
    otsu = filters.threshold_otsu(glass_and_tissue)
    assert low < otsu < high
    assert tissue_threshold(glass_and_tissue) == pytest.approx(otsu)


def test_tissue_area_mm2_by_hand() -> None:
    mask = np.zeros((100, 100), bool)
    mask[:40, :25] = True  # 1000 px of 8 µm: 1000 · 64 µm² = 0.064 mm²
    assert tissue_area_mm2(mask, 8.0) == pytest.approx(0.064)
    assert tissue_area_mm2(np.zeros((5, 5), bool), 8.0) == 0.0


def test_rejects_non_rgb_input() -> None:
    with pytest.raises(ValueError, match="RGB"):
        tissue_mask(np.zeros((10, 10), np.uint8))


def test_cmu_slide_tissue(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as slide:
        thumb = slide.thumbnail(8.0)
    mask = tissue_mask(thumb)
    assert mask.shape == (186, 139)
    # The section covers about 40 % of this region; the right and left margins are glass.
    assert 0.3 < mask.mean() < 0.5
    assert not mask[:20, :20].any() and not mask[-30:, -25:].any()
    assert not mask[:60, :40].any()  # glass left of the section
    assert mask[160:186, 60:100].all()  # the epidermis at the bottom
    area = tissue_area_mm2(mask, 8.0)
    assert area == pytest.approx(mask.sum() * 64e-6)
    assert 0.5 < area < 0.9  # of 1.11 × 1.48 mm
