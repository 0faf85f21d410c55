"""Training losses of CausalCellSegmenter (paper eq. 7; SPEC.md §4 and §7).

``L = L_CIM + 0.5·Dice + 0.5·Focal``. Targets are class maps (0 background, 1 nucleus interior,
2 nucleus boundary); Dice and the focal balancing act on "nucleus" = interior ∪ boundary, the
paper's binary foreground, so a 2-class model gets exactly the paper's losses. A model with a
distance head (issue 10 point 4) adds ``distance_weight · MSE`` between the sigmoid of its last
channel and :func:`cellseg.targets.distance_targets`, a term beyond the paper. Training with
``--shift-consistency`` adds a translation-consistency term (:func:`shift_consistency_loss`,
issue 11), also beyond the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    total: torch.Tensor
    cim: torch.Tensor
    dice: torch.Tensor
    focal: torch.Tensor
    distance: torch.Tensor | None = None  # models with a distance head only
    consistency: torch.Tensor | None = None  # runs with --shift-consistency only

    NAMES = ("total", "cim", "dice", "focal", "distance", "consistency")

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k in self.NAMES if (v := getattr(self, k)) is not None}


def per_image_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean cross-entropy of each image: ``B×C×H×W, B×H×W -> B`` (f(·) of paper eq. 7)."""
    return F.cross_entropy(logits, target, reduction="none").flatten(1).mean(dim=1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Foreground soft Dice over the batch: ``1 - (2Σpg + ε) / (Σp + Σg + ε)`` (SPEC §7.1)."""
    p_fg = 1 - torch.softmax(logits, dim=1)[:, 0]
    g_fg = (target > 0).to(p_fg.dtype)
    inter = (p_fg * g_fg).sum()
    return 1 - (2 * inter + eps) / (p_fg.sum() + g_fg.sum() + eps)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha_fg: float = 0.8, gamma: float = 2.0
) -> torch.Tensor:
    """Per-pixel focal loss ``-α_t (1-p_t)^γ log p_t`` averaged over pixels (SPEC §7.2).

    ``α_t = alpha_fg`` on nucleus pixels (interior or boundary) and ``1 - alpha_fg`` on background,
    the RetinaNet convention with the nucleus as the positive class.
    """
    log_p = F.log_softmax(logits, dim=1)
    log_pt = log_p.gather(1, target[:, None]).squeeze(1)
    alpha_t = torch.where(target > 0, alpha_fg, 1 - alpha_fg)
    return (-alpha_t * (1 - log_pt.exp()).pow(gamma) * log_pt).mean()


# Weight of the distance-map MSE. Its values are around 0.02-0.05 once trained, a tenth of the
# class terms; HoVer-Net (Graham et al. 2019) weighs its map regression 1-2x its class loss,
# and 2 keeps the map's gradient from being drowned by the class terms early in fine-tuning.
DISTANCE_WEIGHT = 2.0


def distance_loss(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean squared error of ``sigmoid(logit)`` against the distance map: ``B×H×W`` -> ()."""
    return (torch.sigmoid(logit) - target).pow(2).mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    dice_weight: float = 0.5,
    distance_target: torch.Tensor | None = None,
) -> LossTerms:
    """Total loss of paper eq. 7 with λ = 0.5, plus the distance-map term if the model has one.

    ``sample_weights`` (``B``, summing to 1) come from the CIM; ``None`` means uniform weights, i.e.
    the "without CIM" ablation where ``L_CIM`` is the plain cross-entropy (SPEC §4, point 6).
    ``distance_target`` (``B×H×W`` float, :func:`cellseg.targets.distance_targets`) is given for
    models with a distance head, whose last logit channel it supervises; the CIM weights only
    the cross-entropy, as in the paper, so the distance term is a plain batch mean.
    """
    # fp32 island (docs/NOTES.md): log-softmax, the focal term (1 - p)^γ and the batch sums of
    # Dice are computed on fp32 logits with autocast off, whatever the network's precision.
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()
        if distance_target is None:
            return _segmentation_loss_fp32(logits, target, sample_weights, dice_weight)
        terms = _segmentation_loss_fp32(logits[:, :-1], target, sample_weights, dice_weight)
        terms.distance = distance_loss(logits[:, -1], distance_target.to(logits.dtype))
        terms.total = terms.total + DISTANCE_WEIGHT * terms.distance
        return terms


def _segmentation_loss_fp32(
    logits: torch.Tensor,
    target: torch.Tensor,
    sample_weights: torch.Tensor | None,
    dice_weight: float,
) -> LossTerms:
    if logits.shape[1] == 2:
        # A 2-class (paper) model: interior and boundary are both "nucleus" (class 1).
        target = target.clamp(max=1)
    ce = per_image_cross_entropy(logits, target)
    cim = ce.mean() if sample_weights is None else (sample_weights.to(ce.dtype) * ce).sum()
    dice = soft_dice_loss(logits, target)
    focal = focal_loss(logits, target)
    total = cim + dice_weight * dice + (1 - dice_weight) * focal
    return LossTerms(total, cim, dice, focal)


def output_probabilities(logits: torch.Tensor, distance_head: bool) -> torch.Tensor:
    """What predict blends: class softmax (and the distance head's sigmoid), ``B×C×H×W`` fp32."""
    logits = logits.float()
    if not distance_head:
        return torch.softmax(logits, dim=1)
    classes = torch.softmax(logits[:, :-1], dim=1)
    return torch.cat([classes, torch.sigmoid(logits[:, -1:])], dim=1)


def shift_consistency_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    shift_yx: tuple[int, int],
    distance_head: bool = False,
) -> torch.Tensor:
    """Squared difference of two windows' outputs on the pixels they share (issue 11), ``()``.

    Window B is window A moved by ``shift_yx = (dy, dx)`` pixels over the same image, so the
    content at ``A[y, x]`` is at ``B[y - dy, x - dx]``. A translation-equivariant network gives
    the same probabilities there; the network's real outputs differ, because its receptive field
    (the stage-1 Transformer attends across the whole tile) and the zero padding at the tile
    border make every output depend on where the content sits in the tile, and whole-slide
    prediction places each nucleus wherever the tile grid puts it. The term is the mean over the
    shared pixels of the squared differences summed over the output channels (Laine & Aila's
    Π-model consistency, applied to translations); both windows receive its gradient.

    Args:
        logits_a, logits_b: ``B×C×H×W`` logits of the two windows (same shape).
        shift_yx: B's offset from A in pixels; ``|dy| < H``, ``|dx| < W``.
        distance_head: the last channel is a distance-map logit (sigmoid), not a class.
    """
    dy, dx = shift_yx
    height, width = logits_a.shape[-2:]
    if not (abs(dy) < height and abs(dx) < width):
        raise ValueError(f"shift {shift_yx} leaves no shared pixels in a {height}×{width} window")
    rows_a = slice(max(dy, 0), height + min(dy, 0))
    cols_a = slice(max(dx, 0), width + min(dx, 0))
    rows_b = slice(max(-dy, 0), height + min(-dy, 0))
    cols_b = slice(max(-dx, 0), width + min(-dx, 0))
    with torch.autocast(logits_a.device.type, enabled=False):
        p_a = output_probabilities(logits_a[..., rows_a, cols_a], distance_head)
        p_b = output_probabilities(logits_b[..., rows_b, cols_b], distance_head)
        return (p_a - p_b).pow(2).sum(dim=1).mean()
