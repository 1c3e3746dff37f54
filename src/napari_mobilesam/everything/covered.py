"""Masks mostly covered by better-scored ones: parts of an object, and near-copies.

segment-anything's generator keeps every mask that passes its filters and survives
NMS, so its records hold a whole cell next to a part of it (a mask of one lobe,
90% inside the cell's mask) and near-copies that NMS let through. Each is a false
object when the records are read as instances. :func:`covered_masks` finds them: a
mask whose pixels lie more than ``max_covered`` inside the union of the
better-scored masks kept before it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["covered_masks"]


def covered_masks(
    crops: list[np.ndarray],
    boxes: np.ndarray,
    scores: np.ndarray,
    shape: tuple[int, int],
    max_covered: float,
) -> np.ndarray:
    """Which masks lie mostly inside better-scored kept masks.

    Masks are visited by decreasing score (ties: the earlier first). A mask is
    dropped when more than ``max_covered`` of its pixels lie inside the union of
    the masks kept so far; otherwise it is kept and joins that union. A dropped
    mask covers nothing, so a mask under it alone stays.

    Parameters
    ----------
    crops : list of (h_i, w_i) bool arrays
        Each mask restricted to its inclusive XYXY box.
    boxes : (N, 4) int
        Inclusive (x0, y0, x1, y1) boxes in image pixels.
    scores : (N,) float
        Priority, e.g. the predicted IoU: the higher is visited first.
    shape : (H, W)
        The image's size.
    max_covered : float in [0, 1]
        The largest covered fraction a kept mask may have; 1 keeps every mask.

    Returns
    -------
    (N,) bool
        True for the masks to drop, in the input's order.
    """
    if isinstance(max_covered, bool) or not (
        isinstance(max_covered, int | float) and 0 <= max_covered <= 1
    ):
        raise ValueError(f"max_covered must be a number in [0, 1], got {max_covered!r}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if not (len(crops) == len(boxes) == len(scores)):
        raise ValueError(
            f"crops, boxes and scores differ in length: {len(crops)}, {len(boxes)}, {len(scores)}"
        )
    drop = np.zeros(len(crops), dtype=bool)
    if max_covered >= 1 or len(crops) == 0:
        return drop
    union = np.zeros(shape, dtype=bool)
    for i in np.argsort(-scores, kind="stable"):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        region = union[y0 : y1 + 1, x0 : x1 + 1]
        mask = crops[i]
        if mask.shape != region.shape:
            raise ValueError(
                f"mask {i} is {mask.shape[0]} x {mask.shape[1]} but its box "
                f"{[x0, y0, x1, y1]} holds {region.shape[0]} x {region.shape[1]} pixels "
                f"of the {shape[0]} x {shape[1]} image"
            )
        area = int(np.count_nonzero(mask))
        if np.count_nonzero(mask & region) > max_covered * area:
            drop[i] = True
        else:
            region |= mask
    return drop


def covered_on_device(masks, scores, max_covered: float):
    """:func:`covered_masks` for full-size masks on the model's device, without a host
    sync per mask (each decision stays a device tensor that gates the union's update).

    Parameters
    ----------
    masks : (N, H, W) bool torch tensor
    scores : (N,) torch tensor
    max_covered : float in [0, 1]

    Returns
    -------
    (N,) bool torch tensor on the masks' device
        True for the masks to drop.
    """
    import torch

    covered_masks([], np.zeros((0, 4)), np.zeros(0), (0, 0), max_covered)  # checks the value
    n = masks.shape[0]
    drop = torch.zeros(n, dtype=torch.bool, device=masks.device)
    if max_covered >= 1 or n == 0:
        return drop
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices.tolist()
    union = torch.zeros(masks.shape[1:], dtype=torch.bool, device=masks.device)
    areas = masks.flatten(1).sum(1)
    for i in order:
        covered = (masks[i] & union).sum()
        dropped = covered > max_covered * areas[i]
        drop[i] = dropped
        union |= masks[i] & ~dropped
    return drop
