"""Training augmentations for (image, label map) pairs, on CPU with plain torch ops (SPEC §8.3).

Geometry (random crop box, scale, flips, rot90, small rotation) is composed into ONE affine map
per sample and applied with a single ``grid_sample`` call to the image (bilinear) and the label
map (nearest), so the two stay aligned and the image is interpolated only once. The label map is
the INSTANCE map: the datasets derive the class targets (interior / boundary ring) after the warp,
because a warped 1 px ring breaks under rotation and zoom (cellseg/data.py). Photometric changes
(Gaussian blur, colour jitter) touch the image only. All randomness comes from a
``numpy.random.Generator`` passed in, so a seed reproduces a run exactly.

Images are ``3×H×W float32`` in [0, 1] (torch, channel-first, RGB); label maps are ``H×W`` integer
maps (instance ids, exact in float32 below 2**24). Pixel coordinates are pixel centres:
pixel ``(x, y)`` covers ``[x - 0.5, x + 0.5] × [y - 0.5, y + 0.5]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale (contrast and saturation jitter).
_LUMA_RGB = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges of the training augmentations (SPEC §8.3; probabilities are the
    SPEC's proposal, since the paper gives none).

    - ``hflip_p``, ``vflip_p``: horizontal / vertical flip (SPEC: hflip p = 0.5, "add vertical").
    - ``rot90``: rotate by a uniform multiple of 90°. With both flips this draws uniformly from
      the 8 symmetries of the square; histology has no preferred orientation.
    - ``rotate_p``, ``max_rotate_deg``: small rotation, uniform in ±20° (UCTransNet
      ``random_rotate``), composed with the above.
    - ``blur_p``, ``blur_sigma``: Gaussian blur with σ uniform in 0.1-1.5 px.
    - ``jitter_p``: colour jitter as one block (torchvision ``ColorJitter`` semantics: brightness,
      contrast, saturation factors uniform in [1 - x, 1 + x], hue shift uniform in ±``hue`` of a
      full turn, the four applied in random order) — the paper's "colour intensity enhancement".
    - ``hed_p``, ``hed_scale``, ``hed_shift``: stain augmentation in haematoxylin-eosin-DAB space
      (Tellez et al., "Quantifying the effects of data augmentation and stain color normalization
      in convolutional neural networks for computational pathology", MedIA 2019): each stain
      channel ``s`` (H and E; DAB is left alone) of scikit-image's colour deconvolution becomes
      ``s · a + b`` with ``a``
      uniform in ``1 ± hed_scale`` and ``b`` uniform in ``± hed_shift``. It varies staining the
      way hospitals differ (more or less haematoxylin or eosin), which RGB/HSV jitter does not.
      Off by default (not in the paper); the ``wsi`` preset turns it on (``--no-stain-aug``).
    """

    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90: bool = True
    rotate_p: float = 0.5
    max_rotate_deg: float = 20.0
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    jitter_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    hed_p: float = 0.0
    hed_scale: float = 0.2
    hed_shift: float = 0.02


NO_AUGMENT = AugmentParams(
    hflip_p=0.0, vflip_p=0.0, rot90=False, rotate_p=0.0, blur_p=0.0, jitter_p=0.0
)
"""Geometry of the crop box only: no flips, rotations, blur or colour changes."""


@dataclass(frozen=True)
class CropBox:
    """An axis-aligned box in source pixels, before rotation.

    ``center_xy`` is in pixel-centre coordinates (the whole ``W×H`` image is centred at
    ``((W - 1) / 2, (H - 1) / 2)``); ``size_xy`` is (width, height) in source pixels.
    """

    center_xy: tuple[float, float]
    size_xy: tuple[float, float]


def full_box(height_px: int, width_px: int) -> CropBox:
    """The box covering the whole ``height_px × width_px`` image."""
    return CropBox(((width_px - 1) / 2, (height_px - 1) / 2), (float(width_px), float(height_px)))


def random_resized_box(
    height_px: int,
    width_px: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (0.9, 1.1),
) -> CropBox:
    """torchvision ``RandomResizedCrop`` box (SPEC §8.3, paper preset).

    The area is a fraction uniform in ``scale`` of the image area and the aspect ratio w/h is
    log-uniform in ``ratio``; the box is placed uniformly inside the image. Where the drawn box
    would not fit (scale near 1 with ratio ≠ 1), its sides are clipped to the image instead of
    torchvision's redraw-then-centre-crop fallback.
    """
    area = height_px * width_px * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    box_w = min(math.sqrt(area * aspect), float(width_px))
    box_h = min(math.sqrt(area / aspect), float(height_px))
    return _place_inside(height_px, width_px, box_w, box_h, rng)


def random_zoom_box(
    height_px: int,
    width_px: int,
    crop_px: int,
    rng: np.random.Generator,
    zoom: tuple[float, float] = (0.85, 1.15),
) -> CropBox:
    """A square box of ``crop_px × z`` source pixels, ``z`` uniform in ``zoom`` (wsi preset).

    Sampled back to ``crop_px`` pixels this jitters the resolution by ±15% around the physical
    mpp the image was resized to, so nuclei sizes stay realistic. The box is placed uniformly
    inside the image; a box larger than the image is centred (the warp reflects at the border).
    """
    side_px = crop_px * rng.uniform(*zoom)
    return _place_inside(height_px, width_px, side_px, side_px, rng)


def _place_inside(
    height_px: int, width_px: int, box_w: float, box_h: float, rng: np.random.Generator
) -> CropBox:
    """Box of the given size with its centre uniform over the positions that keep it inside."""
    centre_x = rng.uniform(box_w / 2, width_px - box_w / 2) if box_w < width_px else width_px / 2
    centre_y = rng.uniform(box_h / 2, height_px - box_h / 2) if box_h < height_px else height_px / 2
    # Convert from edge coordinates (image spans 0..W) to pixel-centre coordinates.
    return CropBox((centre_x - 0.5, centre_y - 0.5), (box_w, box_h))


def random_orientation(rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """``2×2`` linear map (box frame → image frame, x/y pixel units): flips, rot90, rotation."""
    linear = np.eye(2)
    if rng.random() < params.hflip_p:
        linear = linear @ np.diag([-1.0, 1.0])
    if rng.random() < params.vflip_p:
        linear = linear @ np.diag([1.0, -1.0])
    if params.rot90:
        linear = _rotation(math.pi / 2 * int(rng.integers(4))) @ linear
    if rng.random() < params.rotate_p:
        angle_deg = rng.uniform(-params.max_rotate_deg, params.max_rotate_deg)
        linear = _rotation(math.radians(angle_deg)) @ linear
    return linear


def _rotation(angle_rad: float) -> np.ndarray:
    """Rotation matrix, rounded so that multiples of 90° are exact permutations."""
    cos, sin = round(math.cos(angle_rad), 12), round(math.sin(angle_rad), 12)
    return np.array([[cos, -sin], [sin, cos]])


def affine_theta(box: CropBox, linear: np.ndarray, in_hw: tuple[int, int]) -> torch.Tensor:
    """``2×3`` ``affine_grid`` matrix (``align_corners=False``) sampling the output from ``box``.

    An output point at normalised ``u`` in [-1, 1]² sits at box-frame offset
    ``u · size / 2`` (pixels); ``linear`` turns that offset into the image frame around the box
    centre, and the result is normalised by the input size: pixel-centre ``x`` maps to
    ``(2x + 1) / W - 1``. The output size does not enter: any output grid samples the same box.
    """
    in_h, in_w = in_hw
    to_normalised = np.diag([2.0 / in_w, 2.0 / in_h])
    half_size = np.diag([box.size_xy[0] / 2, box.size_xy[1] / 2])
    matrix = to_normalised @ linear @ half_size
    offset = [(2 * box.center_xy[0] + 1) / in_w - 1, (2 * box.center_xy[1] + 1) / in_h - 1]
    return torch.tensor(np.column_stack([matrix, offset]), dtype=torch.float32)


def warp_pair(
    image: torch.Tensor, target: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``image`` (``3×H×W`` float, bilinear) and ``target`` (``H×W``, nearest) together.

    Both use reflection padding: the image because black corners are not tissue, the target so
    that every mirrored nucleus in the image is labelled as one, and nothing else is. Zero
    padding of the target would label mirrored image nuclei as background; border padding would
    smear edge nuclei into stripes the image does not show.
    """
    grid = F.affine_grid(theta[None], [1, 1, *out_hw], align_corners=False)
    image_out = F.grid_sample(
        image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )[0]
    target_out = F.grid_sample(
        target[None, None].float(),
        grid,
        mode="nearest",
        padding_mode="reflection",
        align_corners=False,
    )[0, 0]
    return image_out.clamp_(0.0, 1.0), target_out.round_().long()


def gaussian_blur(image: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``C×H×W`` float image (radius ``ceil(3σ)``, reflected edges)."""
    radius = max(1, math.ceil(3 * sigma_px))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    padded = F.pad(image[None], [radius, radius, radius, radius], mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, -1, -1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, -1, -1, -1), groups=channels)[0]


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """``1×H×W`` luma of a ``3×H×W`` RGB image (BT.601 weights)."""
    weights = torch.tensor(_LUMA_RGB, dtype=image.dtype).view(3, 1, 1)
    return (image * weights).sum(0, keepdim=True)


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """``3×H×W`` RGB in [0, 1] → HSV, each in [0, 1] (hue as a fraction of a turn)."""
    red, green, blue = image.unbind(0)
    value, _ = image.max(0)
    chroma = value - image.min(0).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), 0.0)
    safe_chroma = torch.where(chroma > 0, chroma, 1.0)
    hue = torch.where(
        value == red,
        (green - blue) / safe_chroma,
        torch.where(
            value == green, 2.0 + (blue - red) / safe_chroma, 4.0 + (red - green) / safe_chroma
        ),
    )
    hue = torch.where(chroma > 0, (hue / 6.0) % 1.0, 0.0)
    return torch.stack([hue, saturation, value])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv` (the standard sector formula)."""
    hue, saturation, value = hsv.unbind(0)
    sector_float = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector_float
    sector = sector_float.long() % 6
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    # Rows: R, G, B; columns: the six hue sectors.
    table = torch.stack(
        [
            torch.stack([value, q, p, p, t, value]),
            torch.stack([t, value, value, q, p, p]),
            torch.stack([p, p, t, value, value, q]),
        ]
    )
    return table.gather(1, sector.expand(3, 1, *sector.shape)).squeeze(1)


def adjust_hue(image: torch.Tensor, shift_turns: float) -> torch.Tensor:
    """Rotate the hue of a ``3×H×W`` RGB image by ``shift_turns`` of a full turn."""
    hsv = rgb_to_hsv(image)
    hsv[0] = (hsv[0] + shift_turns) % 1.0
    return hsv_to_rgb(hsv)


def color_jitter(
    image: torch.Tensor, rng: np.random.Generator, params: AugmentParams
) -> torch.Tensor:
    """torchvision ``ColorJitter`` on a ``3×H×W`` image in [0, 1]: the four adjustments with
    factors drawn from ``params``, in random order, clamped to [0, 1] after each."""
    brightness = rng.uniform(1 - params.brightness, 1 + params.brightness)
    contrast = rng.uniform(1 - params.contrast, 1 + params.contrast)
    saturation = rng.uniform(1 - params.saturation, 1 + params.saturation)
    hue = rng.uniform(-params.hue, params.hue)
    for step in rng.permutation(4):
        if step == 0:
            image = image * brightness
        elif step == 1:
            image = _blend(image, grayscale(image).mean(), contrast)
        elif step == 2:
            image = _blend(image, grayscale(image), saturation)
        else:
            image = adjust_hue(image, hue)
        image = image.clamp(0.0, 1.0)
    return image


def _stain_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's (Ruifrok & Johnston) ``hed_from_rgb`` and ``rgb_from_hed``, float32."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    return torch.from_numpy(hed_from_rgb).float(), torch.from_numpy(rgb_from_hed).float()


_LOG_ADJUST = math.log(1e-6)  # scikit-image's separate_stains / combine_stains scaling


def rgb_to_hed(image: torch.Tensor) -> torch.Tensor:
    """``3×H×W`` RGB in [0, 1] -> ``3×H×W`` stain amounts (H, E, DAB), as ``skimage.color.rgb2hed``
    but not clipped at 0, so that :func:`hed_to_rgb` inverts it exactly."""
    hed_from_rgb, _ = _stain_matrices()
    optical = torch.log(image.clamp(min=1e-6)) / _LOG_ADJUST
    return torch.einsum("chw,cd->dhw", optical, hed_from_rgb)


def hed_to_rgb(stains: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (``skimage.color.hed2rgb``), clipped to [0, 1]."""
    _, rgb_from_hed = _stain_matrices()
    log_rgb = torch.einsum("dhw,dc->chw", stains, rgb_from_hed) * _LOG_ADJUST
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def hed_jitter(
    image: torch.Tensor, rng: np.random.Generator, params: AugmentParams
) -> torch.Tensor:
    """Random stain amounts: each of H, E, DAB scaled by ``1 ± hed_scale`` and shifted by
    ``± hed_shift`` (:class:`AugmentParams`). ``image``: ``3×H×W`` float in [0, 1]."""
    scale = torch.from_numpy(rng.uniform(1 - params.hed_scale, 1 + params.hed_scale, 3)).float()
    shift = torch.from_numpy(rng.uniform(-params.hed_shift, params.hed_shift, 3)).float()
    # DAB is only the residual of an H&E deconvolution: moving it paints slides brown-yellow,
    # a colour no H&E scanner produces, so only H and E change.
    scale[2], shift[2] = 1.0, 0.0
    stains = rgb_to_hed(image)
    return hed_to_rgb(stains * scale[:, None, None] + shift[:, None, None])


def _blend(image: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor · image + (1 - factor) · other`` (torchvision ``_blend``, before clamping)."""
    return factor * image + (1.0 - factor) * other


def augment_pair(
    image: torch.Tensor,
    target: torch.Tensor,
    box: CropBox,
    out_px: int,
    rng: np.random.Generator,
    params: AugmentParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp ``box`` of (``image`` ``3×H×W`` float in [0, 1], ``target`` ``H×W``) to
    ``out_px × out_px`` with random flips/rotations, then blur and colour-jitter the image.

    Returns ``(3×out_px×out_px float32 in [0, 1], out_px×out_px int64)``.
    """
    linear = random_orientation(rng, params)
    theta = affine_theta(box, linear, (image.shape[1], image.shape[2]))
    image_out, target_out = warp_pair(image, target, theta, (out_px, out_px))
    if rng.random() < params.blur_p:
        image_out = gaussian_blur(image_out, rng.uniform(*params.blur_sigma))
    if params.hed_p > 0 and rng.random() < params.hed_p:  # no draw when off: old streams kept
        image_out = hed_jitter(image_out, rng, params)
    if rng.random() < params.jitter_p:
        image_out = color_jitter(image_out, rng, params)
    return image_out.contiguous(), target_out
