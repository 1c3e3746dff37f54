"""Masks stored as tight bounding-box crops, and operations on them.

A crop mask is a bool array covering exactly its mask's inclusive XYXY box, so a
10000 x 10000 image with a thousand small objects costs what the objects cost.
"""

from __future__ import annotations

import numpy as np
import torch

from .boxes import greedy_nms


def tight_crop(mask: np.ndarray, r0: int, c0: int) -> tuple[np.ndarray, list[int]] | None:
    """Shrink a window mask placed at (r0, c0) to its bounding box.

    Returns (crop, [x0, y0, x1, y1] inclusive in the window's frame + offset) or
    None when the mask is empty.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    crop = np.ascontiguousarray(mask[top : bottom + 1, left : right + 1])
    return crop, [c0 + int(left), r0 + int(top), c0 + int(right), r0 + int(bottom)]


def paste(crop: np.ndarray, box, shape: tuple[int, int]) -> np.ndarray:
    """Full (H, W) bool mask from a crop and its inclusive box."""
    full = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    full[y0 : y1 + 1, x0 : x1 + 1] = crop
    return full


def crop_to_rle(crop: np.ndarray, box, shape: tuple[int, int]) -> dict:
    """Uncompressed column-major RLE of the full-size mask, without building it.

    Only the columns the box spans are materialised (H x box width). Equal to
    ``masks_to_rle(paste(crop, box, shape)[None])[0]``.
    """
    h, w = shape
    x0, y0, x1, y1 = (int(v) for v in box)
    slab = np.zeros((x1 - x0 + 1, h), dtype=bool)  # the box's columns, column-major
    slab[:, y0 : y1 + 1] = crop.T
    flat = slab.ravel()
    start, end, total = x0 * h, x0 * h + flat.size, h * w
    bounds = [start + np.flatnonzero(flat[1:] != flat[:-1]) + 1]
    if flat[0] and start > 0:  # background before the slab, then foreground
        bounds.insert(0, [start])
    if flat[-1] and end < total:  # foreground at the slab's end, background after
        bounds.append([end])
    edges = np.concatenate([[0], *bounds, [total]])
    counts = np.diff(edges)
    if flat[0] and start == 0:  # RLE starts with a (here empty) background run
        counts = np.concatenate([[0], counts])
    return {"size": [h, w], "counts": counts.tolist()}


class PackedMasks:
    """Crop masks as bit-packed rows on 64-bit words aligned to image columns.

    Two masks' intersection is then an AND and a popcount over the words their
    boxes share: exact, and 64 pixels per operation.
    """

    def __init__(self, crops: list[np.ndarray], boxes: np.ndarray) -> None:
        self.boxes = boxes
        self.word0 = boxes[:, 0] // 64  # first word column of each mask
        self.words: list[np.ndarray] = []
        for crop, box in zip(crops, boxes, strict=True):
            lead = int(box[0]) % 64
            width = -(-(lead + crop.shape[1]) // 64) * 64
            bits = np.zeros((crop.shape[0], width), dtype=bool)
            bits[:, lead : lead + crop.shape[1]] = crop
            self.words.append(np.packbits(bits, axis=1, bitorder="little").view(np.uint64))

    def intersection(self, i: int, j: int) -> int:
        bi, bj = self.boxes[i], self.boxes[j]
        r0, r1 = max(bi[1], bj[1]), min(bi[3], bj[3]) + 1
        w0, w1 = (
            max(self.word0[i], self.word0[j]),
            min(self.word0[i] + self.words[i].shape[1], self.word0[j] + self.words[j].shape[1]),
        )
        if r0 >= r1 or w0 >= w1:
            return 0
        a = self.words[i][r0 - bi[1] : r1 - bi[1], w0 - self.word0[i] : w1 - self.word0[i]]
        b = self.words[j][r0 - bj[1] : r1 - bj[1], w0 - self.word0[j] : w1 - self.word0[j]]
        return int(_popcount(a & b))


def _popcount(words: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return int(np.bitwise_count(words).sum(dtype=np.int64))
    return int(np.unpackbits(words.view(np.uint8)).sum(dtype=np.int64))


def mask_iou_above(crops: list[np.ndarray], boxes: np.ndarray, areas: np.ndarray, threshold: float):
    """``overlap_above(i, candidates)`` for :func:`greedy_nms` on exact mask IoU.

    A candidate is only compared when its IoU with ``i`` could exceed the
    threshold: the intersection is at most the boxes' overlap and the smaller
    area, which bounds the IoU from above. The rest is counted on bit-packed
    rows (:class:`PackedMasks`).
    """
    packed = PackedMasks(crops, boxes)

    def above(i: int, rest: torch.Tensor) -> torch.Tensor:
        idx = rest.numpy()
        b, bi = boxes[idx], boxes[i]
        ow = np.minimum(b[:, 2], bi[2]) - np.maximum(b[:, 0], bi[0]) + 1
        oh = np.minimum(b[:, 3], bi[3]) - np.maximum(b[:, 1], bi[1]) + 1
        inter_ub = np.minimum(np.clip(ow, 0, None) * np.clip(oh, 0, None), areas[idx])
        inter_ub = np.minimum(inter_ub, areas[i])
        union_lb = areas[i] + areas[idx] - inter_ub
        possible = inter_ub > threshold * np.maximum(union_lb, 1)
        out = np.zeros(len(idx), dtype=bool)
        for k in np.flatnonzero(possible):
            j = idx[k]
            inter = packed.intersection(i, j)
            union = areas[i] + areas[j] - inter
            out[k] = union > 0 and inter / union > threshold
        return torch.from_numpy(out)

    return above


def mask_nms(
    crops: list[np.ndarray], boxes: np.ndarray, scores: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Greedy NMS by mask IoU; kept indices by decreasing score (stable)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    areas = np.array([np.count_nonzero(c) for c in crops], dtype=np.int64)
    return greedy_nms(scores, mask_iou_above(crops, boxes, areas, threshold), len(crops))
