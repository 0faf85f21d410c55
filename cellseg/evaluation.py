"""Evaluation protocols of ``cellseg evaluate`` (issue 2 point 8; SPEC.md §8.4-8.5).

- ``paper``: each tile resized to 224² (UCTransNet lineage), per-image foreground Dice and IoU
  against the cv2-linear>0 resized mask, mean ± std over images.
- ``native``: sliding-window prediction at the model's mpp over each full tile, probabilities
  resampled to the ground truth's resolution, instances by the model's post-processing, then
  Dice, IoU, AJI and PQ (DQ, SQ) per image against the full-resolution instance labels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import ModelBundle
from .data import Sample
from .errors import ModelError
from .inference import Predictor, predict_array
from .instances import PostProcess, label_instances
from .metrics import dice, instance_metrics, iou, summarize
from .resample import resize_image
from .targets import paper_mask

PROTOCOLS = ("paper", "native")


def _resize_probs(probs: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(probs)[None]
    return F.interpolate(x, size=size_hw, mode="bilinear", align_corners=False)[0].numpy()


def native_probabilities(sample: Sample, predictor: Predictor, overlap_px: int = 64) -> np.ndarray:
    """Sliding-window probabilities at the model's mpp, resized to the tile's own grid (C×H×W)."""
    h, w = sample.labels.shape
    scale = sample.mpp / predictor.mpp
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    image = resize_image(sample.image, size, antialias=True)
    probs = predict_array(image, predictor, predictor.tile_px, overlap_px)
    return _resize_probs(probs, (h, w))


def evaluate_paper(sample: Sample, predictor: Predictor) -> dict:
    """Per-image foreground Dice/IoU at 224² (SPEC §8.4 DEFAULT protocol)."""
    image = resize_image(sample.image, (224, 224), antialias=False)  # like cv2.INTER_LINEAR
    probs = predictor(image[None])[0]
    pred = (1 - probs[0]) > 0.5
    gt = paper_mask(sample.labels, 224)
    return {"image_id": sample.image_id, "dice": dice(pred, gt), "iou": iou(pred, gt)}


def evaluate_native(
    sample: Sample, predictor: Predictor, post: PostProcess, overlap_px: int = 64
) -> dict:
    """Dice, IoU, AJI and PQ of one tile at the ground truth's resolution."""
    probs = native_probabilities(sample, predictor, overlap_px)
    labels = label_instances(probs, sample.mpp, post)
    gt = sample.labels
    pred_fg, gt_fg = labels > 0, gt > 0
    return {
        "image_id": sample.image_id,
        "dice": dice(pred_fg, gt_fg),
        "iou": iou(pred_fg, gt_fg),
        **instance_metrics(gt, labels),
        "nuclei_true": int(len(np.unique(gt)) - (1 if 0 in gt else 0)),
        "nuclei_pred": int(labels.max()),
    }


def postprocess_of(bundle: ModelBundle) -> PostProcess:
    """The post-processing parameters stored with a model (defaults if it has none)."""
    try:
        return PostProcess.from_dict(bundle.meta.get("postprocess", {}))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{bundle.path}: invalid post-processing parameters ({exc})") from None


def evaluate(
    bundle: ModelBundle,
    samples: list[Sample],
    protocol: str = "native",
    device: str = "auto",
    post: PostProcess | None = None,
    progress: bool = True,
    tta: bool = False,
    precision: str = "auto",
) -> dict:
    """Runs one protocol over ``samples``; returns per-image rows and their mean ± std.

    ``tta``: average the 8 rotations/reflections of each tile (:class:`Predictor`).
    ``precision``: ``auto``/``fp32``/``bf16`` (:mod:`cellseg.precision`); the resolved one is in
    the result.
    """
    from tqdm import tqdm

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}")
    predictor = Predictor(bundle, device=device, precision=precision, tta=tta)
    post = post or postprocess_of(bundle)
    rows = []
    for s in tqdm(samples, desc=f"evaluate ({protocol})", disable=not progress, leave=False):
        if protocol == "paper":
            rows.append(evaluate_paper(s, predictor))
        else:
            rows.append(evaluate_native(s, predictor, post))
    return {
        "protocol": protocol,
        "model": bundle.name,
        "model_mpp": predictor.mpp,
        "tta": tta,
        "precision": predictor.precision,
        "images": len(rows),
        "per_image": rows,
        "summary": summarize(rows),
    }


def tune_postprocess(
    bundle: ModelBundle,
    samples: list[Sample],
    device: str = "auto",
    fg_thresholds: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8),
    marker_thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9),
    progress: bool = True,
) -> tuple[PostProcess, list[dict]]:
    """Grid-searches the watershed thresholds for the best mean AJI on *validation* tiles.

    The network runs once per tile; only the post-processing is repeated. Returns the best
    parameters and one row per grid point (mean AJI, PQ, Dice), for the model card.
    """
    from dataclasses import replace

    from tqdm import tqdm

    predictor = Predictor(bundle, device=device)
    base = postprocess_of(bundle)
    cached = []
    for s in tqdm(samples, desc="predict validation tiles", disable=not progress, leave=False):
        cached.append((s, native_probabilities(s, predictor)))
    rows = []
    for fg in fg_thresholds:
        for marker in marker_thresholds:
            post = replace(base, fg_threshold=fg, marker_threshold=marker)
            scores = []
            for s, probs in cached:
                labels = label_instances(probs, s.mpp, post)
                m = instance_metrics(s.labels, labels)
                scores.append((m["aji"], m["pq"], dice(labels > 0, s.labels > 0)))
            aji_mean, pq_mean, dice_mean = np.mean(scores, axis=0)
            rows.append(
                {
                    "fg_threshold": fg,
                    "marker_threshold": marker,
                    "aji": aji_mean,
                    "pq": pq_mean,
                    "dice": dice_mean,
                }
            )
    best = max(rows, key=lambda r: r["aji"])
    return replace(
        base, fg_threshold=best["fg_threshold"], marker_threshold=best["marker_threshold"]
    ), rows
