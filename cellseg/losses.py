"""Training losses of CausalCellSegmenter (paper eq. 7; SPEC.md §4 and §7).

``L = L_CIM + 0.5·Dice + 0.5·Focal``. Targets are class maps (0 background, 1 nucleus interior,
2 nucleus boundary); Dice and the focal balancing act on "nucleus" = interior ∪ boundary, the
paper's binary foreground, so a 2-class model gets exactly the paper's losses.
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

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "cim", "dice", "focal")}


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


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    dice_weight: float = 0.5,
) -> LossTerms:
    """Total loss of paper eq. 7 with λ = 0.5.

    ``sample_weights`` (``B``, summing to 1) come from the CIM; ``None`` means uniform weights, i.e.
    the "without CIM" ablation where ``L_CIM`` is the plain cross-entropy (SPEC §4, point 6).
    """
    # fp32 island (docs/NOTES.md): log-softmax, the focal term (1 - p)^γ and the batch sums of
    # Dice are computed on fp32 logits with autocast off, whatever the network's precision.
    with torch.autocast(logits.device.type, enabled=False):
        return _segmentation_loss_fp32(logits.float(), target, sample_weights, dice_weight)


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
