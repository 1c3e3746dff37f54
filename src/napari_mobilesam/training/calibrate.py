"""Calibrate the IoU head on segment-everything prompts.

Segment-everything keeps a mask only when the IoU head predicts at least
``pred_iou_thresh`` (0.88 by default) for it. A decoder trained with the interactive
recipe learns its IoU head on prompts inside objects and on a few 'no object' points;
for the grid points of segment-everything (anywhere: inside, on an edge, between
touching cells, on the background) its predictions can be far from the masks' real
quality. This module fits the IoU head alone (a 3-layer MLP on the IoU token; the rest
of the model frozen) to the real IoU of every mask of every grid point:

- prompts: the ``points_per_side`` x ``points_per_side`` grid of segment-everything,
  one positive point each;
- outputs: all four (the single-mask output and the three multimask outputs);
- target: the mask's best IoU with any ground-truth object, at full resolution
  (0 when it covers none).

The IoU-token features are computed once; fitting them takes seconds.

Fitted by mean squared error, the head predicts the mean IoU of masks that look alike
to it. Where it cannot tell a mask of IoU 0.95 from one of 0.7, both get the mean, and
the default threshold of 0.88 drops most good masks with the bad. ``quantile=q`` fits
the q-quantile of their IoU instead (pinball loss): among masks the head scores alike,
a fraction q has an IoU at most the prediction. Above 0.5 it is an optimistic score, and
a knob between the recall and the precision of segment-everything at a fixed threshold.

:func:`scale_mask_logits` makes every mask logit k times larger without changing a mask
or what a mask prompt does; the stability score (the area above logit +1 over the area
above -1) of a good mask then passes the default 0.95 where a shallow boundary kept it
below.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..accel.decoder import decode_tokens, prepare_image
from ..distill.data import preprocess
from ..everything.grid import build_point_grid
from ..model import Sam
from .data import Example

__all__ = [
    "best_iou_with_objects", "calibrate_iou_head", "iou_head_samples", "pinball_loss",
    "scale_mask_logits",
]  # fmt: skip


def best_iou_with_objects(masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each mask's best IoU with an object of ``labels``.

    Parameters
    ----------
    masks : (N, H, W) bool
    labels : (H, W) int, 0 = background

    Returns
    -------
    (N,) float32; 0 for a mask that covers no object (or is empty).
    """
    if masks.shape[1:] != labels.shape:
        raise ValueError(f"masks of shape {masks.shape[1:]} but labels of shape {labels.shape}")
    flat = labels.ravel().astype(np.int64)
    n_ids = int(flat.max()) + 1 if flat.size else 1
    area = np.bincount(flat, minlength=n_ids).astype(np.float64)
    out = np.zeros(len(masks), np.float32)
    for i, m in enumerate(masks.reshape(len(masks), -1)):
        inter = np.bincount(flat[m], minlength=n_ids).astype(np.float64)
        inter[0] = 0.0
        if not inter.any():
            continue
        union = area + m.sum() - inter
        out[i] = float((inter / np.maximum(union, 1.0))[1:].max())
    return out


@torch.no_grad()
def iou_head_samples(
    model: Sam, examples: Iterable[Example], points_per_side: int = 16, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU-token features and real IoUs of every mask of every grid point.

    Returns
    -------
    features : (P, C) float32, the IoU head's inputs
    targets : (P, T) float32, the real IoU of each of the T mask outputs
    """
    device = next(model.parameters()).device
    dec, pe_layer = model.mask_decoder, model.prompt_encoder
    feats, targets = [], []
    for ex in examples:
        h, w = ex.labels.shape
        x, isz = preprocess(ex.rgb(), model.img_size, model.pixel_mean.flatten().tolist(),
                            model.pixel_std.flatten().tolist())  # fmt: skip
        emb = model.image_encoder(x[None].to(device))
        _, no_mask = pe_layer(None, None, None)
        # the per-image cache and factorised attentions of the fast path (the same
        # tokens to float rounding, many times cheaper for a grid of prompts)
        cache = prepare_image(dec, emb, pe_layer.get_dense_pe(), no_mask)
        scale = model.img_size / max(h, w)
        grid = build_point_grid(points_per_side) * np.array([w, h])  # (x, y) pixels
        points = torch.as_tensor(grid * scale, dtype=torch.float32)
        for i in range(0, len(points), chunk):
            xy = points[i : i + chunk, None].to(device)
            labels = torch.ones(xy.shape[:2], dtype=torch.int64, device=device)
            sparse, _ = pe_layer((xy, labels), None, None)
            hs, keys, size = decode_tokens(dec, sparse, cache=cache)
            logits = dec.masks_from_tokens(hs, keys, size, slice(0, None))
            b, t = logits.shape[:2]
            full = model.postprocess_masks(logits.float(), isz, (h, w)) > 0
            iou = best_iou_with_objects(full.reshape(b * t, h, w).cpu().numpy(), ex.labels)
            feats.append(hs[:, 0].float().cpu())
            targets.append(torch.from_numpy(iou.reshape(b, t)))
    return torch.cat(feats), torch.cat(targets)


def calibrate_iou_head(
    model: Sam,
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int = 200,
    lr: float = 1e-3,
    batch: int = 512,
    seed: int = 0,
    quantile: float | None = None,
) -> dict:
    """Fit ``model.mask_decoder.iou_prediction_head`` to ``targets``, in place.

    Parameters
    ----------
    features, targets : from :func:`iou_head_samples`
    epochs, lr, batch : AdamW over shuffled mini-batches
    seed : seeds the shuffling
    quantile : None: mean squared error (the mean IoU); q in (0, 1): pinball loss (the
        q-quantile of the IoU, :func:`pinball_loss`)

    Returns
    -------
    dict with the mean squared error ``before`` and ``after`` (whichever loss was fitted),
    the mean prediction minus the mean target after (``bias``) and ``samples``.
    """
    if len(features) == 0:
        raise ValueError("no samples to calibrate the IoU head on")
    if quantile is not None and not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be between 0 and 1 (exclusive), not {quantile}")

    def loss_fn(pred, target):
        if quantile is None:
            return F.mse_loss(pred, target)
        return pinball_loss(pred, target, quantile)

    head = model.mask_decoder.iou_prediction_head
    device = next(head.parameters()).device
    x, y = features.to(device), targets.to(device)
    was_training = head.training
    head.train()
    params = list(head.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        before = float(F.mse_loss(head(x), y))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * max(1, -(-len(x) // batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = loss_fn(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        pred = head(x)
        after, bias = float(F.mse_loss(pred, y)), float((pred - y).mean())
    for p, r in zip(params, saved, strict=True):
        p.requires_grad_(r)
    head.train(was_training)
    return {"before": before, "after": after, "bias": bias, "samples": len(x)}


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean pinball (quantile) loss: minimised when ``pred`` is the ``quantile`` of
    ``target`` (0.5: the median). Shapes broadcast; returns a scalar."""
    d = target - pred
    return torch.maximum(quantile * d, (quantile - 1.0) * d).mean()


@torch.no_grad()
def scale_mask_logits(model: Sam, factor: float) -> None:
    """Multiply every mask logit of ``model`` by ``factor``, in place.

    The masks (logit > 0) stay the same, and so does a low-res logit mask given back as
    a mask prompt: the hypernetworks' last layers (which make each output's logits by a
    dot product with the upscaled image features) are multiplied by ``factor`` and the
    first convolution of the mask-prompt encoder divided by it. Only the logits' slope
    changes, so the stability score of every mask rises towards 1. The result loads and
    runs as any checkpoint of the official format.

    Raises
    ------
    ValueError
        when ``factor`` is not a finite number above 0.
    """
    if not (np.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a finite number above 0, not {factor}")
    for mlp in model.mask_decoder.output_hypernetworks_mlps:
        mlp.layers[-1].weight.mul_(factor)
        mlp.layers[-1].bias.mul_(factor)
    model.prompt_encoder.mask_downscaling[0].weight.div_(factor)
