"""Segmentation metrics for nuclei: binary Dice/IoU and instance AJI, AJI+ and PQ (numpy only).

Definitions follow SPEC.md §8.4-8.5 and the reference implementation
``vqdang/hover_net:metrics/stats_utils.py`` (``get_fast_aji``, ``get_fast_aji_plus``,
``get_fast_pq``), aggregated per image and then averaged (``compute_stats.py``):

- Binary metrics take boolean foreground masks of one image (any shape, typically ``H×W``).
- Instance metrics take label maps (``H×W`` integer, 0 = background, any positive ids; ids need
  not be contiguous and are remapped internally, so ``remap_label`` is not needed first).

Empty inputs: when both inputs contain no foreground / no instance at all, every score is defined
as 1.0 (nothing to find and nothing found is a perfect result), so an image without nuclei does not
turn the mean into NaN. When only one side is empty, the scores are 0.0.

Efficiency: instance metrics never compare full masks pairwise. One pass over the pixels where both
maps are foreground counts the intersection of every *overlapping* (GT, prediction) pair
(``np.unique`` on combined pair codes), so a 1000×1000 tile with ~700 nuclei per map costs a few
tens of milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["aji", "aji_plus", "dice", "instance_metrics", "iou", "pq", "summarize"]


# --------------------------------------------------------------------------- binary metrics


def _foreground_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate two boolean masks of the same shape (refuse probabilities or labels silently)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    for name, mask in (("pred", pred), ("gt", gt)):
        if mask.dtype != np.bool_:
            raise ValueError(f"{name} must be a boolean mask, got dtype {mask.dtype}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray, eps: float = 0.0) -> float:
    """Binary foreground Dice ``(2|P∩G| + eps) / (|P| + |G| + eps)`` of one image.

    Args:
        pred: predicted foreground, boolean array (e.g. ``H×W``).
        gt: ground-truth foreground, boolean array of the same shape.
        eps: smoothing added to numerator and denominator (SPPNet's ``smooth``); the default 0
            gives the exact ratio, with the empty/empty case defined as 1.0.

    Returns:
        Dice in [0, 1].
    """
    pred, gt = _foreground_pair(pred, gt)
    inter = int(np.count_nonzero(pred & gt))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    if total == 0 and eps == 0:
        return 1.0
    return (2.0 * inter + eps) / (total + eps)


def iou(pred: np.ndarray, gt: np.ndarray, eps: float = 0.0) -> float:
    """Binary foreground IoU (Jaccard) ``(|P∩G| + eps) / (|P∪G| + eps)`` of one image.

    Same arguments and empty/empty convention (1.0) as :func:`dice`; equals sklearn's binary
    ``jaccard_score`` used by UCTransNet when ``eps = 0``.
    """
    pred, gt = _foreground_pair(pred, gt)
    inter = int(np.count_nonzero(pred & gt))
    union = int(np.count_nonzero(pred | gt))
    if union == 0 and eps == 0:
        return 1.0
    return (inter + eps) / (union + eps)


# --------------------------------------------------------------------------- pairwise overlaps


def _dense_ids(labels: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Remap a label map to ids 0..n (0 = background), flattened to int64.

    Returns:
        ``(ids, n)``: ``ids`` has ``labels.size`` elements, objects numbered 1..n in increasing
        order of their original id.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label map, got dtype {labels.dtype}")
    flat = labels.ravel().astype(np.int64, copy=False)
    if flat.size == 0:
        return flat, 0
    if flat.min() < 0:
        raise ValueError(f"{name} contains negative labels")
    top = int(flat.max())
    if top <= 4 * flat.size + 1024:
        # Cheap lookup table when ids are not astronomically sparse (the usual case).
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present) * present
        return lut[flat], int(present.sum())
    uniq, dense = np.unique(flat, return_inverse=True)
    if uniq[0] == 0:
        return dense.astype(np.int64), uniq.size - 1
    return dense.astype(np.int64) + 1, uniq.size


@dataclass(frozen=True)
class _Overlaps:
    """Sparse pairwise overlap table of two label maps (0-based object indices).

    ``gt_area``: (n_gt,) pixel counts; ``pred_area``: (n_pred,); ``gt_idx``, ``pred_idx``,
    ``inter``: (n_pairs,) one entry per (GT, prediction) pair sharing at least one pixel.
    """

    gt_area: np.ndarray
    pred_area: np.ndarray
    gt_idx: np.ndarray
    pred_idx: np.ndarray
    inter: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.gt_area[self.gt_idx] + self.pred_area[self.pred_idx] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union


def _overlaps(gt_labels: np.ndarray, pred_labels: np.ndarray) -> _Overlaps:
    """Count areas and intersections of all overlapping pairs in one pass over the pixels."""
    if np.shape(gt_labels) != np.shape(pred_labels):
        raise ValueError(
            f"gt_labels shape {np.shape(gt_labels)} differs from pred_labels shape "
            f"{np.shape(pred_labels)}"
        )
    gt, n_gt = _dense_ids(gt_labels, "gt_labels")
    pred, n_pred = _dense_ids(pred_labels, "pred_labels")
    both = (gt > 0) & (pred > 0)
    codes = gt[both] * (n_pred + 1) + pred[both]
    pair_codes, inter = np.unique(codes, return_counts=True)
    return _Overlaps(
        gt_area=np.bincount(gt, minlength=n_gt + 1)[1:],
        pred_area=np.bincount(pred, minlength=n_pred + 1)[1:],
        gt_idx=pair_codes // (n_pred + 1) - 1,
        pred_idx=pair_codes % (n_pred + 1) - 1,
        inter=inter.astype(np.int64),
    )


# --------------------------------------------------------------------------- pairings


def _max_iou_pairs(ov: _Overlaps) -> np.ndarray:
    """For every GT with an overlap, the index of its max-IoU pair (predictions may be reused).

    Ties go to the lowest prediction id, as ``np.argmax`` does in hover_net's ``get_fast_aji``.
    """
    if ov.inter.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((ov.pred_idx, -ov.iou, ov.gt_idx))
    gt_sorted = ov.gt_idx[order]
    first_of_gt = np.r_[True, gt_sorted[1:] != gt_sorted[:-1]]
    return order[first_of_gt]


def _one_to_one_pairs(ov: _Overlaps) -> np.ndarray:
    """Indices of the pairs of a one-to-one matching maximising the total IoU (Hungarian).

    The optimum decomposes over the connected components of the bipartite overlap graph (pairs
    without overlap add nothing), so the assignment is solved per component: isolated pairs are
    taken directly and only clusters of mutually overlapping objects go to
    ``scipy.optimize.linear_sum_assignment``.
    """
    n_pairs = ov.inter.size
    if n_pairs == 0:
        return np.zeros(0, dtype=np.int64)
    n_gt = ov.gt_area.size
    n_nodes = n_gt + ov.pred_area.size
    graph = coo_matrix((np.ones(n_pairs), (ov.gt_idx, n_gt + ov.pred_idx)), (n_nodes, n_nodes))
    _, node_component = connected_components(graph, directed=False)
    pair_component = node_component[ov.gt_idx]
    order = np.argsort(pair_component, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(pair_component[order]) != 0])
    sizes = np.diff(np.r_[starts, n_pairs])
    selected = [order[starts[sizes == 1]]]
    iou = ov.iou
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
        selected.append(_assign_cluster(ov, iou, order[start : start + size]))
    return np.sort(np.concatenate(selected))


def _assign_cluster(ov: _Overlaps, iou: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Hungarian matching inside one cluster of overlapping objects; returns pair indices."""
    gts, rows = np.unique(ov.gt_idx[pairs], return_inverse=True)
    preds, cols = np.unique(ov.pred_idx[pairs], return_inverse=True)
    table = np.zeros((gts.size, preds.size))
    table[rows, cols] = iou[pairs]
    pair_at = np.full((gts.size, preds.size), -1, dtype=np.int64)
    pair_at[rows, cols] = pairs
    r, c = linear_sum_assignment(table, maximize=True)
    chosen = pair_at[r, c]
    return chosen[chosen >= 0]


# --------------------------------------------------------------------------- instance metrics


def _aji_score(ov: _Overlaps, pairs: np.ndarray) -> float:
    """AJI = Σ|G∩S| over pairs / (Σ|G∪S| over pairs + areas of all unpaired GT and predictions)."""
    paired_gt = np.zeros(ov.gt_area.size, dtype=bool)
    paired_pred = np.zeros(ov.pred_area.size, dtype=bool)
    paired_gt[ov.gt_idx[pairs]] = True
    paired_pred[ov.pred_idx[pairs]] = True
    inter = int(ov.inter[pairs].sum())
    union = int(ov.union[pairs].sum())
    union += int(ov.gt_area[~paired_gt].sum()) + int(ov.pred_area[~paired_pred].sum())
    if union == 0:
        return 1.0  # both maps empty
    return inter / union


def aji(gt_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017), as hover_net's ``get_fast_aji``.

    Each GT nucleus is paired with the prediction of maximal IoU (a prediction may serve several
    GT nuclei); predictions never chosen and GT nuclei with no overlap add their whole area to the
    union.

    Args:
        gt_labels: ``H×W`` integer label map, 0 = background.
        pred_labels: ``H×W`` integer label map of the same shape.

    Returns:
        AJI in [0, 1] (1.0 when both maps are empty).
    """
    ov = _overlaps(gt_labels, pred_labels)
    return _aji_score(ov, _max_iou_pairs(ov))


def aji_plus(gt_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """AJI+ (Graham et al., Med. Image Anal. 2019; hover_net's ``get_fast_aji_plus``).

    As :func:`aji` but with a one-to-one pairing that maximises the total IoU (Hungarian), which
    avoids counting a merged prediction's area once per GT nucleus it covers.
    """
    ov = _overlaps(gt_labels, pred_labels)
    return _aji_score(ov, _one_to_one_pairs(ov))


def _pq_scores(ov: _Overlaps, iou_threshold: float) -> dict[str, float | int]:
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    iou_all = ov.iou
    if iou_threshold >= 0.5:
        # IoU > 0.5 makes a match unique on both sides (Kirillov et al. 2019, Theorem 1).
        pairs = np.flatnonzero(iou_all > iou_threshold)
    else:
        pairs = _one_to_one_pairs(ov)
        pairs = pairs[iou_all[pairs] > iou_threshold]
    tp = int(pairs.size)
    fp = int(ov.pred_area.size) - tp
    fn = int(ov.gt_area.size) - tp
    if tp + fp + fn == 0:
        dq = sq = 1.0  # both maps empty
    else:
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(iou_all[pairs].sum()) / tp if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


def pq(
    gt_labels: np.ndarray, pred_labels: np.ndarray, iou_threshold: float = 0.5
) -> dict[str, float | int]:
    """Panoptic Quality for one class (Kirillov et al., CVPR 2019), as hover_net's ``get_fast_pq``.

    A (GT, prediction) pair is a true positive when its IoU exceeds ``iou_threshold``; at 0.5 and
    above such matches are unique. Below 0.5 a one-to-one Hungarian pairing on IoU is made first
    and pairs above the threshold are kept (hover_net does the same).

    Args:
        gt_labels: ``H×W`` integer label map, 0 = background.
        pred_labels: ``H×W`` integer label map of the same shape.
        iou_threshold: matching threshold in [0, 1); 0.5 is the standard.

    Returns:
        ``{"pq", "dq", "sq", "tp", "fp", "fn"}`` with DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU
        of the matched pairs (0.0 without matches) and PQ = DQ·SQ; all 1.0 when both maps are
        empty.
    """
    return _pq_scores(_overlaps(gt_labels, pred_labels), iou_threshold)


def instance_metrics(
    gt_labels: np.ndarray, pred_labels: np.ndarray, iou_threshold: float = 0.5
) -> dict[str, float | int]:
    """AJI, AJI+ and PQ (with DQ, SQ, TP, FP, FN) of one image from a single overlap table.

    Equivalent to calling :func:`aji`, :func:`aji_plus` and :func:`pq` but counts the pixels once.

    Returns:
        ``{"aji", "aji_plus", "pq", "dq", "sq", "tp", "fp", "fn"}``.
    """
    ov = _overlaps(gt_labels, pred_labels)
    return {
        "aji": _aji_score(ov, _max_iou_pairs(ov)),
        "aji_plus": _aji_score(ov, _one_to_one_pairs(ov)),
        **_pq_scores(ov, iou_threshold),
    }


# --------------------------------------------------------------------------- aggregation


def _is_number(value: object) -> bool:
    return isinstance(value, Real | np.number) and not isinstance(value, bool | np.bool_)


def summarize(per_image: Sequence[Mapping[str, object]]) -> dict[str, dict[str, float]]:
    """Mean and population standard deviation (``np.std``, ddof 0) of every numeric metric.

    This is the "mean ± std over test images" of SPEC.md §8.4 (SPPNet's ``eval.py``).

    Args:
        per_image: one dict per image, e.g. ``{"image": "TCGA-..", "dice": 0.8, "tp": 40}``.
            Keys whose values are numbers in the first dict are summarised; other keys (names)
            are ignored. Every dict must carry every summarised key with a numeric value.

    Returns:
        ``{metric: {"mean": float, "std": float}}`` in the key order of the first dict.
    """
    if not per_image:
        raise ValueError("summarize needs at least one per-image result")
    keys = [key for key, value in per_image[0].items() if _is_number(value)]
    summary = {}
    for key in keys:
        values = []
        for index, row in enumerate(per_image):
            if key not in row or not _is_number(row[key]):
                raise ValueError(f"per-image result {index} lacks a numeric value for {key!r}")
            values.append(float(row[key]))
        summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    return summary
