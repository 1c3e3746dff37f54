"""Boxes of masks, crop-edge tests and non-maximum suppression.

Mask boxes are XYXY with *inclusive* ends (``x1`` is the last column that holds
the mask), as segment-anything computes them; an empty mask has box [0, 0, 0, 0].
"""

from __future__ import annotations

import numpy as np
import torch


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool -> (..., 4) int64 XYXY inclusive boxes; empty -> [0, 0, 0, 0]."""
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    h, w = masks.shape[-2:]
    flat = masks.reshape(-1, h, w)
    rows = flat.any(dim=-1)  # (N, H)
    cols = flat.any(dim=-2)  # (N, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    bottom = (rows * ar_h).amax(dim=-1)
    top = torch.where(rows, ar_h, h).amin(dim=-1)
    right = (cols * ar_w).amax(dim=-1)
    left = torch.where(cols, ar_w, w).amin(dim=-1)
    empty = (right < left) | (bottom < top)
    out = torch.stack([left, top, right, bottom], dim=-1) * (~empty).unsqueeze(-1)
    return out.reshape(*masks.shape[:-2], 4)


def box_xyxy_to_xywh(box: np.ndarray) -> np.ndarray:
    """XYXY -> XYWH (width = x1 - x0, as segment-anything reports ``bbox``)."""
    box = np.array(box, copy=True)
    box[..., 2] = box[..., 2] - box[..., 0]
    box[..., 3] = box[..., 3] - box[..., 1]
    return box


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """(N,) bool: box (crop coordinates) within ``atol`` of a crop edge that is not an
    edge of the original image, i.e. the object was probably cut by the crop."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    offset = torch.as_tensor(
        [crop_box[0], crop_box[1], crop_box[0], crop_box[1]], device=boxes.device
    )
    boxes = (boxes + offset).float()
    near_crop = torch.isclose(boxes, crop[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None, :], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_image, dim=1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) XYXY -> (N,) ``(x1 - x0) * (y1 - y0)``."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """(N, N) IoU of XYXY boxes as torchvision's NMS computes it (float32).

    Area is ``(x1 - x0) * (y1 - y0)``; two empty boxes give 0 / 0 = NaN, which
    never exceeds a threshold (so empty boxes never suppress each other).
    """
    b = boxes.float()
    area = box_area(b)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[:, None] + area[None, :] - inter)


def greedy_nms(scores: torch.Tensor, overlap_above, n: int) -> torch.Tensor:
    """Greedy NMS: indices kept, by decreasing score (stable for ties).

    ``overlap_above(i, candidates)`` returns, for kept index ``i`` and a 1-D tensor
    of later candidate indices, a bool tensor: which of them overlap ``i`` by more
    than the threshold (and are suppressed).
    """
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores.cpu().float(), descending=True, stable=True).indices
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    for pos in range(n):
        i = int(order[pos])
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        rest = rest[~suppressed[rest]]
        if len(rest):
            suppressed[rest[overlap_above(i, rest)]] = True
    return torch.as_tensor(keep, dtype=torch.int64)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Box NMS with torchvision's semantics (``torchvision.ops.nms``), on the CPU.

    Returns the kept indices (int64) in decreasing score order; ties keep the
    input order.
    """
    boxes = boxes.cpu()
    iou = box_iou(boxes)
    return greedy_nms(scores, lambda i, rest: iou[i, rest] > iou_threshold, len(boxes))
