"""Metrics on hand-computed cases, plus a dense brute-force reference on random label maps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from cellseg import metrics


def _boxes(shape: tuple[int, int], boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """Label map with rectangles ``{id: (row0, row1, col0, col1)}`` (half-open)."""
    labels = np.zeros(shape, dtype=np.int32)
    for label, (r0, r1, c0, c1) in boxes.items():
        labels[r0:r1, c0:c1] = label
    return labels


def _all(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    scores = metrics.instance_metrics(gt, pred)
    scores["dice"] = metrics.dice(pred > 0, gt > 0)
    scores["iou"] = metrics.iou(pred > 0, gt > 0)
    return scores


# --------------------------------------------------------------------------- hand-computed cases


def test_identical_maps_score_one():
    gt = _boxes((12, 12), {1: (0, 4, 0, 4), 2: (0, 4, 4, 8), 3: (6, 10, 2, 11)})
    scores = _all(gt, gt.copy())
    for key in ("dice", "iou", "aji", "aji_plus", "pq", "dq", "sq"):
        assert scores[key] == 1.0, key
    assert (scores["tp"], scores["fp"], scores["fn"]) == (3, 0, 0)


def test_shifted_nucleus_by_one_pixel():
    # 4×4 square vs the same square one column right: |∩| = 4·3 = 12, |∪| = 20.
    gt = _boxes((6, 8), {7: (1, 5, 1, 5)})
    pred = _boxes((6, 8), {250: (1, 5, 2, 6)})
    assert metrics.iou(pred > 0, gt > 0) == 12 / 20
    assert metrics.dice(pred > 0, gt > 0) == 24 / 32
    assert metrics.aji(gt, pred) == 12 / 20
    assert metrics.pq(gt, pred) == {"pq": 0.6, "dq": 1.0, "sq": 0.6, "tp": 1, "fp": 0, "fn": 0}


def test_shifted_nucleus_by_two_pixels_is_no_match():
    # |∩| = 4·2 = 8, |∪| = 24: IoU 1/3 < 0.5, so one FN and one FP, but AJI still credits 8/24.
    gt = _boxes((6, 8), {1: (1, 5, 1, 5)})
    pred = _boxes((6, 8), {1: (1, 5, 3, 7)})
    assert metrics.aji(gt, pred) == 8 / 24
    assert metrics.pq(gt, pred) == {"pq": 0.0, "dq": 0.0, "sq": 0.0, "tp": 0, "fp": 1, "fn": 1}
    # With a lower threshold the same pair matches.
    assert metrics.pq(gt, pred, iou_threshold=0.3)["tp"] == 1


def test_split_nucleus():
    # One 4×4 GT (16 px) predicted as a 4×3 part (IoU 12/16) and a 4×1 part (IoU 4/16).
    gt = _boxes((6, 6), {1: (0, 4, 0, 4)})
    pred = _boxes((6, 6), {1: (0, 4, 0, 3), 2: (0, 4, 3, 4)})
    scores = _all(gt, pred)
    assert scores["dice"] == 1.0  # binary metrics cannot see the split
    # GT pairs with part 1 (∩ 12, ∪ 16); the unused part adds its 4 px to the union.
    assert scores["aji"] == 12 / 20
    assert scores["aji_plus"] == 12 / 20
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 1, 0)
    assert scores["dq"] == 1 / 1.5
    assert scores["sq"] == 0.75
    assert scores["pq"] == pytest.approx(0.5, abs=1e-15)


def test_merged_nuclei():
    # GT A 4×5 (20 px) and GT B 4×3 (12 px) touch; one 4×8 prediction (32 px) covers both.
    gt = _boxes((4, 8), {1: (0, 4, 0, 5), 2: (0, 4, 5, 8)})
    pred = _boxes((4, 8), {1: (0, 4, 0, 8)})
    scores = _all(gt, pred)
    assert scores["dice"] == 1.0
    # AJI reuses the merged prediction for both GT: ∩ 20 + 12, ∪ 32 + 32.
    assert scores["aji"] == 32 / 64
    # AJI+ pairs it with A only (IoU 0.625 > 0.375); B is unpaired: ∩ 20, ∪ 32 + 12.
    assert scores["aji_plus"] == 20 / 44
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 0, 1)
    assert scores["dq"] == 1 / 1.5
    assert scores["sq"] == 0.625
    assert scores["pq"] == pytest.approx(0.625 / 1.5, abs=1e-15)


def test_missing_and_extra_nuclei():
    # A (9 px) found exactly, B (6 px) missed, C (4 px) predicted where nothing is.
    gt = _boxes((10, 10), {1: (0, 3, 0, 3), 2: (5, 7, 0, 3)})
    pred = _boxes((10, 10), {4: (0, 3, 0, 3), 9: (5, 7, 6, 8)})
    scores = _all(gt, pred)
    assert scores["aji"] == 9 / (9 + 6 + 4)
    assert scores["aji_plus"] == 9 / (9 + 6 + 4)
    assert scores["dice"] == 2 * 9 / (13 + 15)
    assert scores["iou"] == 9 / 19
    assert metrics.pq(gt, pred) == {"pq": 0.5, "dq": 0.5, "sq": 1.0, "tp": 1, "fp": 1, "fn": 1}


def test_empty_inputs():
    empty = np.zeros((5, 5), dtype=np.int32)
    one = _boxes((5, 5), {3: (1, 3, 1, 3)})
    both_empty = _all(empty, empty)
    for key in ("dice", "iou", "aji", "aji_plus", "pq", "dq", "sq"):
        assert both_empty[key] == 1.0, key
    assert (both_empty["tp"], both_empty["fp"], both_empty["fn"]) == (0, 0, 0)
    for gt, pred, fp, fn in ((empty, one, 1, 0), (one, empty, 0, 1)):
        scores = _all(gt, pred)
        for key in ("dice", "iou", "aji", "aji_plus", "pq", "dq", "sq"):
            assert scores[key] == 0.0, key
        assert (scores["tp"], scores["fp"], scores["fn"]) == (0, fp, fn)
    zero_size = np.zeros((0, 0), dtype=np.int32)
    assert metrics.aji(zero_size, zero_size) == 1.0


def test_dice_and_iou_smoothing():
    empty = np.zeros((3, 3), dtype=bool)
    assert metrics.dice(empty, empty, eps=1.0) == 1.0
    pred = np.zeros((4, 4), dtype=bool)
    gt = np.zeros((4, 4), dtype=bool)
    pred[:2, :3], gt[:2, :2] = True, True  # |P| 6, |G| 4, |∩| 4, |∪| 6
    assert metrics.dice(pred, gt, eps=1.0) == (8 + 1) / (10 + 1)
    assert metrics.iou(pred, gt, eps=1.0) == (4 + 1) / (6 + 1)


def test_huge_sparse_ids_are_remapped():
    gt = _boxes((6, 6), {5: (0, 2, 0, 2), 2_000_000_000: (3, 6, 3, 6)})
    pred = _boxes((6, 6), {1: (0, 2, 0, 2), 2: (3, 6, 3, 6)})
    scores = metrics.instance_metrics(gt, pred.astype(np.uint16))
    assert (scores["aji"], scores["aji_plus"], scores["pq"], scores["tp"]) == (1.0, 1.0, 1.0, 2)


def test_invalid_inputs_raise():
    labels = np.zeros((4, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="shape"):
        metrics.aji(labels, np.zeros((4, 5), dtype=np.int32))
    with pytest.raises(ValueError, match="integer label map"):
        metrics.pq(labels.astype(np.float32), labels)
    with pytest.raises(ValueError, match="negative"):
        metrics.aji(labels - 1, labels)
    with pytest.raises(ValueError, match="boolean"):
        metrics.dice(np.full((2, 2), 0.7), np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="iou_threshold"):
        metrics.pq(labels, labels, iou_threshold=1.0)


# --------------------------------------------------------------------------- brute-force reference


def _random_pair(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """GT of overlapping random rectangles and a prediction of the same rectangles jittered by
    up to 1 px (painted in another order, with new ids) plus a few spurious ones: crowded maps
    with matches, near misses, splits and merges."""
    corners = rng.integers(0, size - 3, size=(15, 2))
    extents = rng.integers(2, 10, size=(15, 2))
    gt = np.zeros((size, size), dtype=np.int32)
    for label, ((r0, c0), (h, w)) in enumerate(zip(corners, extents, strict=True), start=1):
        gt[r0 : r0 + h, c0 : c0 + w] = 7 * label  # non-contiguous ids
    jitter = rng.integers(-1, 2, size=(15, 4))
    pred_boxes = np.concatenate([corners, corners + extents], axis=1) + jitter
    extra = rng.integers(0, size - 3, size=(5, 2))
    pred_boxes = np.concatenate([pred_boxes, np.concatenate([extra, extra + 4], axis=1)])
    pred = np.zeros_like(gt)
    for label, index in enumerate(rng.permutation(len(pred_boxes)), start=1):
        r0, c0, r1, c1 = np.clip(pred_boxes[index], 0, size)
        pred[r0:r1, c0:c1] = label
    return gt, pred


def _dense_tables(gt: np.ndarray, pred: np.ndarray):
    """hover_net-style full-mask pairwise tables (the slow reference)."""
    gt_masks = [gt == i for i in np.unique(gt) if i]
    pred_masks = [pred == j for j in np.unique(pred) if j]
    inter = np.zeros((len(gt_masks), len(pred_masks)))
    union = np.zeros_like(inter)
    for (i, g), (j, p) in itertools.product(enumerate(gt_masks), enumerate(pred_masks)):
        inter[i, j] = np.count_nonzero(g & p)
        union[i, j] = np.count_nonzero(g | p)
    gt_area = np.array([m.sum() for m in gt_masks])
    pred_area = np.array([m.sum() for m in pred_masks])
    return inter, union, gt_area, pred_area


def _reference_aji(gt: np.ndarray, pred: np.ndarray) -> float:
    inter, union, gt_area, pred_area = _dense_tables(gt, pred)
    iou = inter / union
    best = np.argmax(iou, axis=1)
    paired = np.flatnonzero(iou.max(axis=1) > 0)
    used = np.unique(best[paired])
    total_inter = inter[paired, best[paired]].sum()
    total_union = union[paired, best[paired]].sum()
    total_union += np.delete(gt_area, paired).sum() + np.delete(pred_area, used).sum()
    return total_inter / total_union


def _reference_pq(gt: np.ndarray, pred: np.ndarray) -> tuple[int, float]:
    inter, union, _, _ = _dense_tables(gt, pred)
    iou = inter / union
    matched = iou[iou > 0.5]
    return matched.size, matched.sum()


@pytest.mark.parametrize("seed", range(6))
def test_matches_dense_reference_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    gt, pred = _random_pair(rng)
    assert metrics.aji(gt, pred) == pytest.approx(_reference_aji(gt, pred), rel=1e-12)
    tp, iou_sum = _reference_pq(gt, pred)
    scores = metrics.pq(gt, pred)
    n_gt, n_pred = np.unique(gt).size - 1, np.unique(pred).size - 1
    assert (scores["tp"], scores["fp"], scores["fn"]) == (tp, n_pred - tp, n_gt - tp)
    assert scores["sq"] * scores["tp"] == pytest.approx(iou_sum, rel=1e-12)
    # At threshold 0 every Hungarian pair with overlap counts: the per-cluster matching must reach
    # the same total IoU as a dense Hungarian on the full table.
    inter, union, _, _ = _dense_tables(gt, pred)
    iou = inter / union
    rows, cols = linear_sum_assignment(iou, maximize=True)
    loose = metrics.pq(gt, pred, iou_threshold=0.0)
    assert loose["tp"] == np.count_nonzero(iou[rows, cols] > 0)
    assert loose["sq"] * loose["tp"] == pytest.approx(iou[rows, cols].sum(), rel=1e-12)


def test_large_tile_many_nuclei():
    """1000×1000 maps with ~700 nuclei each: the sparse overlap table gives exact scores."""
    rng = np.random.default_rng(0)
    centres = np.stack(np.meshgrid(np.arange(20, 1000, 37), np.arange(20, 1000, 37)), -1)
    centres = centres.reshape(-1, 2)[:700]
    gt = np.zeros((1000, 1000), dtype=np.int32)
    for label, (cy, cx) in enumerate(centres, start=1):
        r0, c0 = cy - 8, cx - 8
        gt[r0 : r0 + 16, c0 : c0 + 16] = label
    # Prediction: the same boxes shifted right by 4 px (IoU 12·16 / 20·16 = 0.6) with ids permuted.
    pred = np.zeros_like(gt)
    pred[:, 4:] = gt[:, :-4]
    permutation = rng.permutation(np.arange(1, 701)) * 3
    pred[pred > 0] = permutation[pred[pred > 0] - 1]
    scores = metrics.instance_metrics(gt, pred)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (700, 0, 0)
    assert scores["sq"] == pytest.approx(0.6, rel=1e-12)
    assert scores["aji"] == pytest.approx(0.6, rel=1e-12)
    assert scores["aji_plus"] == pytest.approx(0.6, rel=1e-12)


# --------------------------------------------------------------------------- summarize


def test_summarize_mean_and_population_std():
    rows = [
        {"image": "a", "dice": 0.5, "tp": 2},
        {"image": "b", "dice": 1.0, "tp": 4},
        {"image": "c", "dice": 0.75, "tp": np.int64(6)},
    ]
    summary = metrics.summarize(rows)
    assert list(summary) == ["dice", "tp"]
    assert summary["dice"]["mean"] == 0.75
    assert summary["dice"]["std"] == pytest.approx(np.sqrt((0.0625 + 0.0625 + 0) / 3), rel=1e-12)
    assert summary["tp"] == {"mean": 4.0, "std": pytest.approx(np.sqrt(8 / 3), rel=1e-12)}


def test_summarize_rejects_empty_and_inconsistent_rows():
    with pytest.raises(ValueError, match="at least one"):
        metrics.summarize([])
    with pytest.raises(ValueError, match="'dice'"):
        metrics.summarize([{"dice": 1.0}, {"iou": 1.0}])
