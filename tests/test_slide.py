"""Slide reading: mpp sources, pyramid levels, exact regions, white padding, backends, bad files."""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from slides import (
    SYNTHETIC_MPP,
    SYNTHETIC_SIZE_XY,
    downsample_levels,
    make_pyramid_tiff,
    smooth_test_image,
)

from cellseg import slide as slide_module
from cellseg.errors import SlideError
from cellseg.slide import open_slide

PYRAMID_BACKENDS = ["openslide", "tiffslide"]
ALL_BACKENDS = [*PYRAMID_BACKENDS, "image"]


@pytest.fixture(scope="module")
def levels(synthetic_image: np.ndarray) -> list[np.ndarray]:
    """The exact pixels of every level of the synthetic slides."""
    return downsample_levels(synthetic_image, 3)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    height, width = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[: height * factor, : width * factor].astype(np.float64)
    return blocks.reshape(height, factor, width, factor, 3).mean(axis=(1, 3))


def _plain_tiff(path: Path, pixels: np.ndarray, **tags) -> Path:
    tifffile.imwrite(path, pixels, photometric="rgb", metadata=None, **tags)
    return path


# ---------------------------------------------------------------------------------- opening/mpp


@pytest.mark.parametrize("backend", PYRAMID_BACKENDS)
def test_synthetic_svs_opens_as_aperio_pyramid(pyramid_slide: Path, backend: str) -> None:
    with open_slide(pyramid_slide, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.dimensions_xy == SYNTHETIC_SIZE_XY
        assert slide.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        assert slide.level_dimensions_xy[3] == (256, 192)
        assert slide.mpp == pytest.approx(SYNTHETIC_MPP)
        assert slide.mpp_source == f"{backend}.mpp-x"
        assert slide.bounds_xy == (0, 0, *SYNTHETIC_SIZE_XY)
    if backend == "openslide":
        handle = openslide.OpenSlide(str(pyramid_slide))
        assert handle.properties["openslide.vendor"] == "aperio"
        assert handle.level_count == 4


def test_jpeg_pyramid_is_readable_and_close(tmp_path: Path) -> None:
    image = smooth_test_image(512, 640, seed=9)
    path = make_pyramid_tiff(tmp_path / "jpeg.svs", image, 0.5, levels=1, compression="jpeg")
    for backend in PYRAMID_BACKENDS:
        with open_slide(path, backend=backend) as slide:
            assert slide.level_downsamples == (1.0, 2.0)
            region = slide.read_region_at_mpp((0, 0), (640, 512), 0.5).astype(np.float64)
        assert np.abs(region - image).mean() < 4  # lossy, but the same picture


def test_generic_tiff_pyramid_gets_mpp_from_resolution_tags(generic_pyramid_slide: Path) -> None:
    handle = openslide.OpenSlide(str(generic_pyramid_slide))
    assert handle.properties["openslide.vendor"] == "generic-tiff"
    assert handle.level_count == 4
    with open_slide(generic_pyramid_slide) as slide:
        assert slide.mpp == pytest.approx(SYNTHETIC_MPP)
        assert slide.mpp_source == "openslide.mpp-x"
    with open_slide(generic_pyramid_slide, backend="image") as slide:
        assert slide.mpp == pytest.approx(SYNTHETIC_MPP)
        assert slide.mpp_source == "tiff-resolution"
        assert slide.level_downsamples == (1.0,)


def test_image_backend_reads_the_aperio_description(pyramid_slide: Path) -> None:
    with open_slide(pyramid_slide, backend="image") as slide:
        assert (slide.mpp, slide.mpp_source) == (SYNTHETIC_MPP, "aperio-description")


def test_aperio_description_beats_placeholder_resolution_tags(tmp_path: Path) -> None:
    path = _plain_tiff(
        tmp_path / "desc.tif",
        np.zeros((8, 8, 3), np.uint8),
        description="Aperio Image Library v12 \n8x8 |AppMag = 20|MPP = 0.5|Filtered = 5",
        resolution=(72, 72),
        resolutionunit="INCH",
    )
    with open_slide(path, backend="image") as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "aperio-description")


@pytest.mark.parametrize(
    ("unit", "px_per_unit", "mpp"),
    [("CENTIMETER", 20_000, 0.5), ("INCH", 50_800, 0.5), ("MILLIMETER", 4_000, 0.25)],
)
def test_tiff_resolution_units(tmp_path: Path, unit: str, px_per_unit: float, mpp: float) -> None:
    path = _plain_tiff(
        tmp_path / "res.tif",
        np.zeros((8, 8, 3), np.uint8),
        resolution=(px_per_unit, px_per_unit),
        resolutionunit=unit,
    )
    with open_slide(path, backend="image") as slide:
        assert slide.mpp == pytest.approx(mpp)
        assert slide.mpp_source == "tiff-resolution"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mpp_override_wins(pyramid_slide: Path, backend: str) -> None:
    with open_slide(pyramid_slide, backend=backend, mpp=0.3) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.3, "override")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_missing_mpp_is_a_clear_error(slide_without_mpp: Path, backend: str) -> None:
    with pytest.raises(SlideError) as info:
        open_slide(slide_without_mpp, backend=backend)
    assert str(info.value) == (
        f"{slide_without_mpp}: resolution unknown (no mpp metadata); pass --mpp"
    )
    with open_slide(slide_without_mpp, backend=backend, mpp=0.5) as slide:
        assert slide.mpp_source == "override"


def test_placeholder_resolution_is_rejected_not_used(tmp_path: Path) -> None:
    path = _plain_tiff(
        tmp_path / "dpi72.tif",
        np.zeros((8, 8, 3), np.uint8),
        resolution=(72, 72),
        resolutionunit="INCH",
    )
    with pytest.raises(SlideError, match=r"dpi72\.tif: implausible resolution 352\.778 µm/px"):
        open_slide(path, backend="image")
    with open_slide(path, backend="image", mpp=0.5) as slide:
        assert slide.mpp == 0.5


@pytest.mark.parametrize("bad_mpp", [0.001, 50.0, float("nan")])
def test_implausible_override_is_rejected(pyramid_slide: Path, bad_mpp: float) -> None:
    with pytest.raises(SlideError, match="implausible resolution"):
        open_slide(pyramid_slide, mpp=bad_mpp)


def test_anisotropic_pixels_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = smooth_test_image(256, 256)
    path = make_pyramid_tiff(tmp_path / "aniso.tiff", image, 0.25, mpp_y=0.26, aperio=False)
    with caplog.at_level(logging.WARNING, logger="cellseg.slide"), open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)
    assert "not square" in caplog.text


def test_square_pixels_do_not_warn(pyramid_slide: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cellseg.slide"), open_slide(pyramid_slide):
        pass
    assert caplog.text == ""


def test_unknown_backend_is_rejected(pyramid_slide: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        open_slide(pyramid_slide, backend="bioformats")


# ------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    ("origin_xy", "size_px"),
    [((0, 0), (256, 256)), ((333, 517), (301, 199)), ((1800, 1400), (248, 136))],
)
def test_level0_read_is_an_exact_crop(
    pyramid_slide: Path,
    synthetic_image: np.ndarray,
    backend: str,
    origin_xy: tuple[int, int],
    size_px: tuple[int, int],
) -> None:
    (x, y), (w, h) = origin_xy, size_px
    with open_slide(pyramid_slide, backend=backend) as slide:
        region = slide.read_region_at_mpp(origin_xy, size_px, SYNTHETIC_MPP)
    assert region.shape == (h, w, 3)
    assert region.dtype == np.uint8
    np.testing.assert_array_equal(region, synthetic_image[y : y + h, x : x + w])


@pytest.mark.parametrize("backend", PYRAMID_BACKENDS)
@pytest.mark.parametrize(("target_mpp", "level"), [(0.5, 1), (1.0, 2), (2.0, 3)])
def test_read_at_a_level_resolution_is_exact_from_that_level(
    pyramid_slide: Path, levels: list[np.ndarray], backend: str, target_mpp: float, level: int
) -> None:
    downsample = 2**level
    origin_xy = (96 * downsample, 40 * downsample)
    with open_slide(pyramid_slide, backend=backend) as slide:
        assert slide.best_level(target_mpp) == level
        region = slide.read_region_at_mpp(origin_xy, (100, 60), target_mpp)
    np.testing.assert_array_equal(region, levels[level][40:100, 96:196])


def test_best_level_is_the_coarsest_not_coarser_than_the_target(pyramid_slide: Path) -> None:
    targets = (0.1, 0.25, 0.3, 0.49, 0.5, 0.9, 1.96, 2.0, 9.0)
    with open_slide(pyramid_slide) as slide:
        chosen = {m: slide.best_level(m) for m in targets}
        # Within LEVEL_TOLERANCE (1 %) a level counts as not coarser: 0.499 uses the 0.5 level.
        assert (slide.best_level(0.499), slide.best_level(1.99)) == (1, 3)
        with pytest.raises(ValueError, match="target_mpp"):
            slide.best_level(0.0)
    assert chosen == {0.1: 0, 0.25: 0, 0.3: 0, 0.49: 0, 0.5: 1, 0.9: 1, 1.96: 2, 2.0: 3, 9.0: 3}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_read_between_levels_is_an_area_average(
    pyramid_slide: Path, synthetic_image: np.ndarray, backend: str
) -> None:
    # 0.75 µm/px = 3 level-0 pixels per output pixel, read from level 1 (or level 0 for "image")
    # and compared with the exact 3×3 block means of level 0.
    with open_slide(pyramid_slide, backend=backend) as slide:
        region = slide.read_region_at_mpp((600, 300), (120, 90), 0.75).astype(np.float64)
    expected = _block_mean(synthetic_image[300 : 300 + 270, 600 : 600 + 360], 3)
    error = np.abs(region - expected)
    assert error.mean() < 1.0
    assert error.max() <= 6


def test_fractional_factor_is_an_exact_area_average(
    pyramid_slide: Path, synthetic_image: np.ndarray
) -> None:
    # 0.625 µm/px = 2.5 level-0 px per output pixel. Brute force: repeat every level-0 pixel
    # 2×2 (each copy a quarter pixel), then output pixel = mean of a 5×5 block of copies.
    with open_slide(pyramid_slide, backend="image") as slide:
        region = slide.read_region_at_mpp((10, 20), (40, 30), 0.625).astype(np.float64)
    crop = synthetic_image[20 : 20 + 75, 10 : 10 + 100]
    expected = _block_mean(crop.repeat(2, axis=0).repeat(2, axis=1), 5)
    assert np.abs(region - expected).max() <= 0.5 + 1e-6


def test_area_weights_by_hand() -> None:
    # Output pixels [0.5, 2) and [2, 3.5) of a 4-pixel row, 1.5 source pixels each.
    weights = slide_module._area_weights(2, 0.5, 1.5, 4).toarray()
    np.testing.assert_allclose(weights, [[1 / 3, 2 / 3, 0, 0], [0, 0, 2 / 3, 1 / 3]], rtol=1e-6)


def test_fractional_origin_at_a_coarse_level_stays_aligned(
    pyramid_slide: Path, levels: list[np.ndarray]
) -> None:
    # Level-0 origin (13, 7) is level-1 (6.5, 3.5): each 0.5 µm/px output pixel is then exactly
    # the mean of a 2×2 group of level-1 pixels starting half a pixel in, not a level-1 pixel.
    with open_slide(pyramid_slide) as slide:
        region = slide.read_region_at_mpp((13, 7), (64, 48), 0.5).astype(np.float64)
    level1 = levels[1].astype(np.float64)
    pairs = (level1[3:52] + level1[4:53]) / 2
    expected = (pairs[:, 6:70] + pairs[:, 7:71]) / 2
    assert np.abs(region - expected[:48]).max() <= 0.5 + 1e-6
    misaligned = level1[3:51, 6:70]  # what reading from the level-pixel boundary would give
    assert np.abs(region - misaligned).mean() > 0.5


def test_upsampling_finer_than_level0(pyramid_slide: Path, synthetic_image: np.ndarray) -> None:
    with open_slide(pyramid_slide) as slide:
        region = slide.read_region_at_mpp((400, 200), (128, 96), SYNTHETIC_MPP / 2)
    assert region.shape == (96, 128, 3)
    restored = _block_mean(region, 2)
    error = np.abs(restored - synthetic_image[200:248, 400:464])
    assert error.mean() < 2.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_outside_the_slide_is_white(
    pyramid_slide: Path, synthetic_image: np.ndarray, backend: str
) -> None:
    width, height = SYNTHETIC_SIZE_XY
    with open_slide(pyramid_slide, backend=backend) as slide:
        top_left = slide.read_region_at_mpp((-10, -20), (50, 40), SYNTHETIC_MPP)
        bottom_right = slide.read_region_at_mpp((width - 30, height - 10), (50, 40), SYNTHETIC_MPP)
        coarse = slide.read_region_at_mpp((width - 64, height - 64), (40, 40), 1.0)
        nowhere = slide.read_region_at_mpp((width + 100, 0), (16, 16), 0.5)
    np.testing.assert_array_equal(top_left[20:, 10:], synthetic_image[:20, :40])
    assert (top_left[:20] == 255).all() and (top_left[:, :10] == 255).all()
    np.testing.assert_array_equal(bottom_right[:10, :30], synthetic_image[-10:, -30:])
    assert (bottom_right[10:] == 255).all() and (bottom_right[:, 30:] == 255).all()
    assert (coarse[16:] == 255).all() and (coarse[:, 16:] == 255).all()
    assert (coarse[:16, :16] != 255).any()
    assert (nowhere == 255).all()


def test_backends_agree(pyramid_slide: Path) -> None:
    regions = {}
    for backend in PYRAMID_BACKENDS:
        with open_slide(pyramid_slide, backend=backend) as slide:
            regions[backend] = [
                slide.read_region_at_mpp((137, 91), (200, 150), m) for m in (0.25, 0.4, 0.75, 1.6)
            ]
    for ours, theirs in zip(*regions.values(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_one_reader_call_per_region(
    pyramid_slide: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_slide(pyramid_slide, backend=backend) as slide:
        reader = slide._reader
        calls = []
        original = reader.read_level
        monkeypatch.setattr(reader, "read_level", lambda *a: calls.append(a) or original(*a))
        slide.read_region_at_mpp((-100, 900), (1024, 1024), 0.6)
    assert len(calls) == 1


def test_returned_regions_are_writeable_copies(pyramid_slide: Path) -> None:
    with open_slide(pyramid_slide, backend="image") as slide:
        first = slide.read_region_at_mpp((0, 0), (8, 8), SYNTHETIC_MPP)
        first[:] = 0
        again = slide.read_region_at_mpp((0, 0), (8, 8), SYNTHETIC_MPP)
    assert (again != 0).any()


def test_invalid_region_size_is_rejected(pyramid_slide: Path) -> None:
    with open_slide(pyramid_slide) as slide, pytest.raises(ValueError, match="size_px"):
        slide.read_region_at_mpp((0, 0), (0, 10), 0.5)


# ------------------------------------------------------------------------------------ thumbnail


def test_thumbnail_at_a_level_resolution_is_that_level(
    pyramid_slide: Path, levels: list[np.ndarray]
) -> None:
    with open_slide(pyramid_slide) as slide:
        thumb = slide.thumbnail(2.0)
    np.testing.assert_array_equal(thumb, levels[3])


def test_thumbnail_shape_covers_the_slide(pyramid_slide: Path, levels: list[np.ndarray]) -> None:
    with open_slide(pyramid_slide) as slide:
        assert slide.best_level(3.0) == 3
        thumb = slide.thumbnail(3.0)  # 12 level-0 px (1.5 level-3 px) per thumbnail px
    assert thumb.shape == (128, 171, 3)  # ceil(2048 / 12), 1536 / 12
    # 2×2 thumbnail pixels are exactly the area average of 3×3 level-3 pixels.
    error = np.abs(_block_mean(thumb[:, :170], 2) - _block_mean(levels[3][:, :255], 3))
    assert error.max() < 1.0
    # The last column covers 1 level-3 pixel of slide and 0.5 of white padding.
    assert thumb[:, 170].mean() > thumb[:, 169].mean() + 15


def test_thumbnail_in_strips_equals_one_read(
    pyramid_slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_slide(pyramid_slide) as slide:
        whole = slide.thumbnail(1.3)
        monkeypatch.setattr(slide_module, "MAX_READ_PIXELS", 20_000)
        strips = slide.thumbnail(1.3)
    np.testing.assert_array_equal(strips, whole)


# --------------------------------------------------------------------------------------- bounds


def test_bounds_come_from_openslide_properties(
    pyramid_slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bounds = {
        "openslide.bounds-x": "100",
        "openslide.bounds-y": "50",
        "openslide.bounds-width": "1800",
        "openslide.bounds-height": "1400",
    }

    class BoundedOpenSlide(openslide.OpenSlide):
        @property
        def properties(self):  # a MIRAX-like slide whose scanned area is offset
            return {**super().properties, **bounds}

    monkeypatch.setattr(openslide, "OpenSlide", BoundedOpenSlide)
    with open_slide(pyramid_slide) as slide:
        assert slide.bounds_xy == (100, 50, 1800, 1400)
        assert slide.dimensions_xy == SYNTHETIC_SIZE_XY  # reads stay in reader coordinates


# ----------------------------------------------------------------------------------- real slide


@pytest.mark.parametrize("backend", PYRAMID_BACKENDS)
def test_cmu_slide(cmu_slide: Path, backend: str) -> None:
    with open_slide(cmu_slide, backend=backend) as slide:
        assert slide.dimensions_xy == (2220, 2967)
        assert slide.level_downsamples == (1.0,)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == f"{backend}.mpp-x"
        assert slide.bounds_xy == (0, 0, 2220, 2967)
        thumb = slide.thumbnail(8.0)
        region = slide.read_region_at_mpp((1000, 1500), (224, 224), 0.5)
    assert thumb.shape == (186, 139, 3)
    assert region.shape == (224, 224, 3)
    assert 60 < region.mean() < 240  # tissue, not padding


def test_cmu_backends_agree(cmu_slide: Path) -> None:
    regions = []
    for backend in PYRAMID_BACKENDS:
        with open_slide(cmu_slide, backend=backend) as slide:
            regions.append(slide.read_region_at_mpp((700, 1200), (300, 300), 1.0).astype(int))
    # Two JPEG decoders (OpenSlide's libjpeg-turbo, imagecodecs) may differ by a grey level.
    assert np.abs(regions[0] - regions[1]).max() <= 2


# ------------------------------------------------------------------------- bad and plain inputs


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unopenable_slide_is_a_one_line_error(shared_wsi_dir: Path, backend: str) -> None:
    path = shared_wsi_dir / "broken" / "unopenable.tiff"
    with pytest.raises(SlideError) as info:
        slide = open_slide(path, backend=backend)
        slide.read_region_at_mpp((0, 0), (1, 1), slide.mpp)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


@pytest.mark.parametrize("backend", PYRAMID_BACKENDS)
def test_unreadable_slide_fails_on_read(shared_wsi_dir: Path, backend: str) -> None:
    path = shared_wsi_dir / "broken" / "unreadable.svs"
    with open_slide(path, backend=backend) as slide:
        with pytest.raises(SlideError) as info:
            slide.read_region_at_mpp((0, 0), (16, 16), slide.mpp)
        with pytest.raises(SlideError):
            slide.thumbnail(8.0)
    assert str(info.value).startswith(f"{path}: cannot read pixels")
    assert "\n" not in str(info.value)


def test_unreadable_slide_fails_on_open_as_plain_image(shared_wsi_dir: Path) -> None:
    path = shared_wsi_dir / "broken" / "unreadable.svs"
    with pytest.raises(SlideError, match="cannot read image"):
        open_slide(path, backend="image")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_missing_file(tmp_path: Path, backend: str) -> None:
    with pytest.raises(SlideError, match=r"missing\.svs: no such file"):
        open_slide(tmp_path / "missing.svs", backend=backend)
    with pytest.raises(SlideError, match="is a folder, not a slide file"):
        open_slide(tmp_path, backend=backend)


@pytest.mark.parametrize("backend", PYRAMID_BACKENDS)
def test_not_a_slide(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "not_a_slide.svs"
    path.write_bytes(b"this is not a slide\n")
    with pytest.raises(SlideError, match=rf"not_a_slide\.svs: not a slide format {backend}"):
        open_slide(path, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_truncated_slide(tmp_path: Path, pyramid_slide: Path, backend: str) -> None:
    data = pyramid_slide.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: len(data) // 2])
    # The error may come at open or at read; either way it names the file.
    with (
        pytest.raises(SlideError, match=r"truncated\.svs: "),
        open_slide(path, backend=backend) as slide,
    ):
        slide.read_region_at_mpp((0, 0), SYNTHETIC_SIZE_XY, SYNTHETIC_MPP)


def test_png_falls_back_to_plain_image(tmp_path: Path) -> None:
    pixels = smooth_test_image(120, 160, seed=3)
    path = tmp_path / "tile.png"
    Image.fromarray(pixels).save(path)
    with pytest.raises(SlideError, match="resolution unknown"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.backend == "image"
        assert slide.dimensions_xy == (160, 120)
        np.testing.assert_array_equal(slide.read_region_at_mpp((0, 0), (160, 120), 0.5), pixels)


def test_plain_image_modes_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((4, 4), 90, np.uint8)).save(tmp_path / "grey.png")
    with open_slide(tmp_path / "rgba.png", backend="image", mpp=1.0) as slide:
        region = slide.read_region_at_mpp((0, 0), (4, 4), 1.0)
    np.testing.assert_array_equal(region[:2].reshape(-1, 3), [[200, 0, 0]] * 8)
    assert (region[2:] == 255).all()
    with open_slide(tmp_path / "grey.png", backend="image", mpp=1.0) as slide:
        assert (slide.read_region_at_mpp((0, 0), (4, 4), 1.0) == 90).all()


def test_plain_tiff_falls_back_from_openslide(tmp_path: Path) -> None:
    pixels = smooth_test_image(64, 96, seed=4)
    path = _plain_tiff(
        tmp_path / "plain.tif", pixels, resolution=(20_000, 20_000), resolutionunit="CENTIMETER"
    )
    with open_slide(path) as slide:
        assert (slide.backend, slide.mpp, slide.mpp_source) == ("image", 0.5, "tiff-resolution")
        np.testing.assert_array_equal(slide.read_region_at_mpp((0, 0), (96, 64), 0.5), pixels)


@pytest.mark.parametrize("name", ["big.png", "big.tif"])
def test_too_large_plain_image_is_refused(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pixels = np.zeros((20, 30, 3), np.uint8)
    if name.endswith(".png"):
        Image.fromarray(pixels).save(tmp_path / name)
    else:
        _plain_tiff(tmp_path / name, pixels)
    monkeypatch.setattr(slide_module, "MAX_PLAIN_IMAGE_PIXELS", 599)
    with pytest.raises(SlideError, match=r"30x20 px is too large .*pyramidal TIFF"):
        open_slide(tmp_path / name, backend="image", mpp=0.5)


# ------------------------------------------------------------------------------------ lifecycle


def test_closed_slide_refuses_reads(pyramid_slide: Path) -> None:
    with open_slide(pyramid_slide) as slide:
        pass
    slide.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        slide.read_region_at_mpp((0, 0), (4, 4), 0.25)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_pickle_reopens_the_slide(pyramid_slide: Path, tmp_path: Path, backend: str) -> None:
    copy = shutil.copy(pyramid_slide, tmp_path / "copy.svs")
    with open_slide(copy, backend=backend, mpp=0.3) as slide:
        clone = pickle.loads(pickle.dumps(slide))
        expected = slide.read_region_at_mpp((10, 10), (32, 32), 0.6)
    with clone:
        assert (clone.backend, clone.mpp, clone.mpp_source) == (backend, 0.3, "override")
        np.testing.assert_array_equal(clone.read_region_at_mpp((10, 10), (32, 32), 0.6), expected)
