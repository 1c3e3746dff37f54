"""SAM's mask losses, per mask: sigmoid focal loss, dice loss and mask IoU.

With ``p = sigmoid(x)`` for logits ``x`` and a {0, 1} target ``y``:

- focal loss (Lin et al. 2017), alpha = 0.25, gamma = 2, averaged over pixels:
  ``alpha_t * (1 - p_t) ** gamma * BCE(x, y)`` with ``p_t = p y + (1 - p)(1 - y)``
  and ``alpha_t = alpha y + (1 - alpha)(1 - y)``;
- dice loss: ``1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1)``;
- mask IoU of thresholded predictions, the IoU head's regression target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_loss_per_mask", "focal_loss_per_mask", "mask_iou"]


def _weighted_sum(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    x = x.flatten(-2)
    return x.sum(-1) if weight is None else (x * weight.flatten(-2)).sum(-1)


def focal_loss_per_mask(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss of (..., h, w) logits, averaged over the last two axes.

    ``weight`` (broadcastable to the logits) makes it a weighted mean: pixels that
    stand for several (a sample of a larger region) count that many times.
    """
    target = target.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    loss = alpha_t * (1 - p_t) ** gamma * ce
    if weight is None:
        return loss.mean((-2, -1))
    weight = weight.expand_as(loss)
    return _weighted_sum(loss, weight) / _weighted_sum(torch.ones_like(loss), weight)


def dice_loss_per_mask(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Dice loss of (..., h, w) logits against a {0, 1} target, per mask (...);
    ``weight`` as in :func:`focal_loss_per_mask`."""
    p = torch.sigmoid(logits)
    y = target.to(p.dtype)
    if weight is not None:
        weight = weight.expand_as(p)
    inter = _weighted_sum(p * y, weight)
    return 1 - (2 * inter + 1) / (_weighted_sum(p, weight) + _weighted_sum(y, weight) + 1)


def mask_iou(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """IoU of (..., h, w) bool masks, per mask; 1 where both are empty; ``weight`` as in
    :func:`focal_loss_per_mask`."""
    target = target.to(torch.bool)
    if weight is not None:
        weight = weight.expand(pred.shape).float()
    inter = _weighted_sum((pred & target).float(), weight)
    union = _weighted_sum((pred | target).float(), weight)
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.ones_like(union))
