"""Stability score: how much a mask changes when its threshold moves."""

from __future__ import annotations

import torch


def calculate_stability_score(
    logits: torch.Tensor, mask_threshold: float, threshold_offset: float
) -> torch.Tensor:
    """IoU of the masks thresholded at ``t + offset`` and ``t - offset``.

    Parameters
    ----------
    logits : (N, H, W) float
        Mask logits (full resolution in reference mode, low resolution in fast
        mode).
    mask_threshold, threshold_offset : float

    Returns
    -------
    (N,) float32; an empty union gives NaN (as in segment-anything).
    """
    # row sums in int16 then int32, as the reference (exact for rows < 32768 px)
    inter = (logits > (mask_threshold + threshold_offset)).sum(-1, dtype=torch.int16)
    union = (logits > (mask_threshold - threshold_offset)).sum(-1, dtype=torch.int16)
    return inter.sum(-1, dtype=torch.int32) / union.sum(-1, dtype=torch.int32)
