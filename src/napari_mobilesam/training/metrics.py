"""Instance segmentation scores against ground truth: matching, F1, AP50, mean IoU.

A predicted object *matches* a ground-truth object when their IoU is at least the
threshold (0.5 by default); above 0.5 a match is necessarily one-to-one, and below
it the pairs are assigned globally (Hungarian, on IoU) so that each object is used
once. Precision = matched / predicted, recall = matched / ground truth.

AP50 ranks the predictions by score and walks down the list, matching each to the
best still-unmatched ground-truth object with IoU >= 0.5 (COCO's greedy rule); the
precision-recall curve is made monotone and integrated over recall (all points).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["average_precision", "iou_matrix", "mask_iou", "match_counts"]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of the same shape (1.0 when both are empty)."""
    union = np.count_nonzero(np.logical_or(a, b))  # (count_nonzero: ~10x a bool sum)
    return float(np.count_nonzero(np.logical_and(a, b)) / union) if union else 1.0


def iou_matrix(pred: list[np.ndarray] | np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of every predicted mask with every ground-truth object.

    Parameters
    ----------
    pred : sequence of (H, W) bool masks, or an (H, W) label image (0 = background)
    truth : (H, W) integer label image, ids 1..N need not be consecutive

    Returns
    -------
    (P, T) float64
        Rows follow ``pred`` (label ids in increasing order for a label image),
        columns the sorted non-zero ids of ``truth``.
    """
    truth = np.asarray(truth)
    t_ids, t_inv = np.unique(truth, return_inverse=True)
    t_inv = t_inv.reshape(truth.shape)
    has_bg = len(t_ids) and t_ids[0] == 0
    t_area = np.bincount(t_inv.ravel(), minlength=len(t_ids))
    if isinstance(pred, np.ndarray) and pred.ndim == truth.ndim and pred.dtype.kind in "iu":
        ids = np.unique(pred)
        masks = [pred == i for i in ids[ids > 0]]
    else:
        masks = list(pred)
    out = np.zeros((len(masks), len(t_ids)), np.float64)
    for r, m in enumerate(masks):
        m = np.asarray(m, bool)
        if m.shape != truth.shape:
            raise ValueError(f"mask {r} has shape {m.shape}, the ground truth {truth.shape}")
        inter = np.bincount(t_inv[m], minlength=len(t_ids))
        union = m.sum() + t_area - inter
        out[r] = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return out[:, 1:] if has_bg else out


def match_counts(ious: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall and F1 of a (P, T) IoU matrix at ``threshold``.

    Returns
    -------
    dict
        ``tp``, ``n_pred``, ``n_true``, ``precision``, ``recall``, ``f1`` (an empty
        prediction for an empty truth scores 1), ``matched_iou`` (mean IoU of the
        matched pairs, NaN when none).
    """
    p, t = ious.shape
    tp, matched = 0, []
    if p and t:
        rows, cols = linear_sum_assignment(-ious)
        good = ious[rows, cols] >= threshold
        tp = int(good.sum())
        matched = ious[rows, cols][good].tolist()
    precision = tp / p if p else float(t == 0)
    recall = tp / t if t else float(p == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tp": tp,
        "n_pred": p,
        "n_true": t,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "matched_iou": float(np.mean(matched)) if matched else float("nan"),
    }


def average_precision(scored: list[tuple[np.ndarray, np.ndarray]], threshold: float = 0.5) -> float:
    """AP at an IoU threshold over several images.

    Parameters
    ----------
    scored : list of (ious (P, T), scores (P,))
        One entry per image: the IoU matrix of its predictions and their scores.

    Returns
    -------
    float
        Area under the monotone precision-recall curve; NaN without ground truth.
    """
    n_true = sum(ious.shape[1] for ious, _ in scored)
    if n_true == 0:
        return float("nan")
    hits = []
    for ious, scores in scored:
        used = np.zeros(ious.shape[1], bool)
        for r in np.argsort(-np.asarray(scores), kind="stable"):
            cand = np.where(used, -1.0, ious[r]) if ious.shape[1] else np.zeros(0)
            j = int(np.argmax(cand)) if cand.size else -1
            ok = j >= 0 and cand[j] >= threshold
            if ok:
                used[j] = True
            hits.append((float(scores[r]), ok))
    if not hits:
        return 0.0
    hits.sort(key=lambda h: -h[0])
    tp = np.cumsum([h[1] for h in hits])
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / n_true
    # monotone envelope, then sum precision over recall steps
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))
