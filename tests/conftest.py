"""Shared fixtures: synthetic pyramidal slides (session-scoped), the CMU slide, shared data.

The slide writer lives in ``tests/slides.py`` so test files can build slides with their own
content (``from slides import make_pyramid_tiff``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slides import (
    SYNTHETIC_LEVELS,
    SYNTHETIC_MPP,
    SYNTHETIC_SIZE_XY,
    make_pyramid_tiff,
    smooth_test_image,
)

DATA_DIR = Path(__file__).resolve().parent / "data"
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def synthetic_image() -> np.ndarray:
    """Level 0 of the synthetic slides: ``1536×2048×3`` uint8 (read-only)."""
    width, height = SYNTHETIC_SIZE_XY
    image = smooth_test_image(height, width, seed=0)
    image.flags.writeable = False
    return image


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def pyramid_slide(slide_dir: Path, synthetic_image: np.ndarray) -> Path:
    """Aperio-style SVS, 2048×1536 at 0.25 µm/px, tiled 256, levels 1/2/4/8, zlib (lossless)."""
    return make_pyramid_tiff(
        slide_dir / "pyramid.svs", synthetic_image, SYNTHETIC_MPP, levels=SYNTHETIC_LEVELS
    )


@pytest.fixture(scope="session")
def generic_pyramid_slide(slide_dir: Path, synthetic_image: np.ndarray) -> Path:
    """The same pixels as a generic tiled TIFF whose mpp is only in the resolution tags."""
    return make_pyramid_tiff(
        slide_dir / "generic.tiff",
        synthetic_image,
        SYNTHETIC_MPP,
        levels=SYNTHETIC_LEVELS,
        aperio=False,
    )


@pytest.fixture(scope="session")
def slide_without_mpp(slide_dir: Path, synthetic_image: np.ndarray) -> Path:
    """Aperio-style pyramid with no MPP in the description and no resolution tags."""
    return make_pyramid_tiff(slide_dir / "no_mpp.svs", synthetic_image[:512, :768], None, levels=1)


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """The committed real Aperio slide (2220×2967, one level, 0.499 µm/px; CC0)."""
    path = DATA_DIR / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def shared_wsi_dir() -> Path:
    """``../shared/data/wsi`` beside the repository; skips when absent."""
    path = SHARED_DIR / "data" / "wsi"
    if not path.is_dir():
        pytest.skip(f"shared data not available at {path}")
    return path


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one thread avoids waking a thread pool for each op (slow on a busy CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
