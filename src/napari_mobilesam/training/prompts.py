"""Prompts for interactive training: first clicks and boxes, then corrective clicks.

SAM's recipe (Kirillov et al. 2023, appendix A): an object's first prompt is, with
equal probability, a foreground point drawn uniformly from its mask or its bounding
box with noise (standard deviation 10% of the box side, at most 20 px per
coordinate). Each later point is drawn uniformly from the error region between the
previous prediction and the ground truth, and is a foreground point where the model
missed the object (false negative) or a background point where it spilled over
(false positive).

All coordinates here are (x, y) pixels of the model's input frame (the image resized
so its longer side is the model's input size), as the prompt encoder takes them.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["corrective_points", "noisy_boxes", "points_from_masks"]


def points_from_masks(masks: torch.Tensor, gen: torch.Generator, scale: float) -> torch.Tensor:
    """One point per mask, uniform over its True pixels.

    Parameters
    ----------
    masks : (B, h, w) bool
        Non-empty masks in some frame (e.g. the original image).
    gen : torch.Generator
    scale : float
        Input-frame pixels per ``masks`` pixel.

    Returns
    -------
    (B, 2) float32
        (x, y) = (col, row) * scale: the input-frame coordinates the predictor gives
        a click on that pixel (``transforms.apply_coords``).
    """
    b, _, w = masks.shape
    flat = masks.reshape(b, -1).float()
    if bool((flat.sum(1) == 0).any()):
        raise ValueError("points_from_masks needs non-empty masks")
    idx = torch.multinomial(flat, 1, generator=gen)[:, 0]
    rows, cols = idx // w, idx % w
    return torch.stack([cols, rows], dim=1).float() * scale


def noisy_boxes(
    boxes: torch.Tensor, gen: torch.Generator, frac: float = 0.1, max_px: float = 20.0
) -> torch.Tensor:
    """Jitter XYXY boxes: each coordinate moves by N(0, frac * side), clipped to ``max_px``.

    Parameters
    ----------
    boxes : (B, 4) float XYXY, input-frame pixels
    gen : torch.Generator

    Returns
    -------
    (B, 4) float32, still with x0 <= x1 and y0 <= y1
    """
    sides = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1).clamp(
        min=1.0
    )
    noise = torch.randn(boxes.shape, generator=gen) * frac * sides
    out = boxes + noise.clamp(-max_px, max_px)
    x0 = torch.minimum(out[:, 0], out[:, 2])
    x1 = torch.maximum(out[:, 0], out[:, 2])
    y0 = torch.minimum(out[:, 1], out[:, 3])
    y1 = torch.maximum(out[:, 1], out[:, 3])
    return torch.stack([x0, y0, x1, y1], dim=1)


def corrective_points(
    pred: torch.Tensor, target: torch.Tensor, gen: torch.Generator, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per prompt from the error region of its prediction.

    Parameters
    ----------
    pred : (B, h, w) bool
        Predicted masks (low-resolution frame).
    target : (B, h, w) bool
        Ground truth in the same frame.
    gen : torch.Generator
    scale : float
        Input-frame pixels per ``pred`` pixel (4 for SAM's 256x256 logits).

    Returns
    -------
    coords : (B, 2) float32
        (x, y) input-frame pixels.
    labels : (B,) int64
        1 where the point lies in a missed part of the object, 0 where it lies on a
        false positive. A prediction without error gets a foreground point inside
        the object (or, for an empty target, a background point on the prompt's
        pixel-free region), which confirms the prediction.
    """
    b, _, w = pred.shape
    error = (pred ^ target).reshape(b, -1)
    fallback = target.reshape(b, -1).clone()
    empty = fallback.sum(1) == 0
    fallback[empty] = True
    weights = torch.where(error.any(1, keepdim=True), error, fallback).float()
    idx = torch.multinomial(weights, 1, generator=gen)[:, 0]
    rows, cols = idx // w, idx % w
    labels = target.reshape(b, -1).gather(1, idx[:, None])[:, 0].long()
    coords = (torch.stack([cols, rows], dim=1).float() + 0.5) * scale - 0.5
    return coords, labels


def background_points(
    labels: np.ndarray, n: int, rng: np.random.Generator, margin: int = 3
) -> np.ndarray:
    """``n`` (x, y) points on the background, at least ``margin`` pixels from any object.

    Parameters
    ----------
    labels : (H, W) integer
    n : int
    rng : numpy Generator

    Returns
    -------
    (m, 2) float64 with m <= n (0 when no such background exists)
    """
    from scipy import ndimage

    free = labels == 0
    if margin > 0:
        free = ndimage.binary_erosion(free, iterations=margin, border_value=1)
    ys, xs = np.nonzero(free)
    if len(xs) == 0 or n <= 0:
        return np.zeros((0, 2))
    idx = rng.integers(0, len(xs), size=n)
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float64)
