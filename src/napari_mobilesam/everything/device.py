"""Segment-everything steps that stay on the model's device (``mode="device"``).

For GPUs: the reference computation (full-resolution stability scores, box NMS) on
batched tensors, with the host reading only small per-batch index tensors, one
(M, M) overlap matrix per crop for the greedy NMS, and the final label image, never
one mask at a time. The grid is decoded by the engine's grid decoder (per-image
cache, factorised attention, 16 bits with a reduced precision) in as few passes as
the GPU's memory allows. On a CPU the same code runs (it is how the tests check it
against reference mode), but fast mode is quicker there.
"""

from __future__ import annotations

import torch

from ..model import Sam
from .boxes import batched_mask_to_box, is_box_near_crop_edge
from .labels import check_fraction
from .mask_data import MaskData
from .pipeline import CropImage, Pipeline, uncrop_masks
from .rle import masks_to_rle
from .stability import calculate_stability_score

__all__ = ["DevicePipeline", "full_res_masks", "labels_from_masks"]


class DevicePipeline(Pipeline):
    """Reference mode's decisions on the model's device, without per-mask host work."""

    mode = "device"

    def batch(self, image: CropImage, points, crop_box, orig_size, state, boxes=None) -> MaskData:
        f = self.filters
        orig_h, orig_w = orig_size
        decoded = self.decode_grid(image, points, f.pred_iou_thresh or None, boxes)
        n_masks = decoded.low_res.shape[1]
        masks, iou, stability, index = full_res_masks(
            self.model, decoded.low_res.flatten(0, 1), decoded.iou.flatten(0, 1),
            image.input_size, image.size,
            pred_iou_thresh=f.pred_iou_thresh,
            stability_score_thresh=f.stability_score_thresh,
            stability_score_offset=f.stability_score_offset,
        )  # fmt: skip
        boxes = batched_mask_to_box(masks)
        keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        rows = index[keep]
        pts = torch.as_tensor(points, dtype=torch.float64)[
            decoded.rows.repeat_interleave(n_masks)[rows.cpu()]
        ]
        return MaskData(
            masks=masks[keep], boxes=boxes[keep], iou_preds=iou[keep],
            stability_score=stability[keep], points=pts,
        )  # fmt: skip

    def finish(self, data: MaskData, crop_box, orig_size, keep_masks: bool) -> MaskData:
        """Boxes and scores to the host; masks as RLEs, unless ``keep_masks`` keeps them
        on the device (for :func:`labels_from_masks`)."""
        data["boxes"] = data["boxes"].cpu()
        if not keep_masks:
            data["rles"] = masks_to_rle(uncrop_masks(data["masks"], crop_box, *orig_size))
            del data["masks"]
        for key in ("iou_preds", "stability_score"):
            data[key] = data[key].cpu()
        return super().finish(data, crop_box, orig_size, keep_masks)


def full_res_masks(
    model: Sam,
    low_res: torch.Tensor,
    iou_preds: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    *,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    stability_score_offset: float,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Filter low-res mask logits the way the reference does, at full resolution.

    Parameters
    ----------
    model : Sam
        Gives ``postprocess_masks`` (upsample, crop the padding, resize to the
        original size) and ``mask_threshold``.
    low_res : (M, h, w) float tensor
        Low-resolution logits (4x the embedding grid), on the model's device.
    iou_preds : (M,) float tensor
    input_size, original_size : (int, int)
        (h, w) of the resized image before padding, and (H, W) of the image.
    pred_iou_thresh, stability_score_thresh, stability_score_offset : float
        As :class:`~napari_mobilesam.everything.MaskGenerator` takes them (0 disables a
        filter).
    chunk : int
        Masks upsampled at once (bounds the float32 logits held: chunk x H x W).

    Returns
    -------
    masks : (K, H, W) bool
        The masks that pass both filters, on the device.
    iou_preds, stability : (K,) float32
    index : (K,) int64
        Their rows in ``low_res``.
    """
    dev = low_res.device
    keep = torch.ones(len(iou_preds), dtype=torch.bool, device=dev)
    if pred_iou_thresh > 0.0:
        keep &= iou_preds > pred_iou_thresh
    index = torch.nonzero(keep).flatten()
    threshold = model.mask_threshold
    masks, stability, kept = [], [], []
    for start in range(0, len(index), chunk):
        rows = index[start : start + chunk]
        logits = model.postprocess_masks(low_res[rows][:, None], input_size, original_size)[:, 0]
        stab = calculate_stability_score(logits, threshold, stability_score_offset)
        ok = stab >= stability_score_thresh if stability_score_thresh > 0.0 else None
        if ok is not None:
            logits, stab, rows = logits[ok], stab[ok], rows[ok]
        masks.append(logits > threshold)
        stability.append(stab.float())
        kept.append(rows)
    if not masks:
        h, w = original_size
        empty = torch.zeros(0, device=dev)
        return (torch.zeros(0, h, w, dtype=torch.bool, device=dev), empty, empty.clone(),
                torch.zeros(0, dtype=torch.long, device=dev))  # fmt: skip
    index = torch.cat(kept)
    return torch.cat(masks), iou_preds[index].float(), torch.cat(stability), index


def labels_from_masks(
    masks: torch.Tensor, scores: torch.Tensor, chunk: int = 64, min_visible: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint overlapping masks into a label image without a host sync per mask.

    Same result as :func:`~napari_mobilesam.everything.labels.masks_to_labels`:
    where masks overlap the higher score wins (ties: the earlier mask), ids are dense
    in that priority order, and a mask left without pixels, or with less than
    ``min_visible`` of its pixels, gets no id (its pixels become background).

    Parameters
    ----------
    masks : (M, H, W) bool tensor
    scores : (M,) tensor
    chunk : int
        Masks compared at once (bounds the uint8 copy held: chunk x H x W).
    min_visible : float in [0, 1]
        As :func:`~napari_mobilesam.everything.labels.masks_to_labels` takes it.

    Returns
    -------
    labels : (H, W) int64 tensor on the masks' device
        0 background, 1..K.
    sources : (K,) int64 CPU tensor
        ``sources[k]`` is the row of ``masks`` painted as id ``k + 1``.
    """
    check_fraction(min_visible, "min_visible")
    m, h, w = masks.shape
    dev = masks.device
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    order_dev = order.to(dev)
    labels = torch.zeros(h, w, dtype=torch.int64, device=dev)
    for start in range(0, m, chunk):
        sub = masks[order_dev[start : start + chunk]]
        covered = sub.any(dim=0)
        first = sub.to(torch.uint8).argmax(dim=0)  # the first (best) mask covering a pixel
        new = covered & (labels == 0)
        labels = torch.where(new, first + start + 1, labels)
    # keep ids of masks that own a pixel, renumbered densely in priority order
    counts = torch.bincount(labels.flatten(), minlength=m + 1)[1:]
    present = counts > 0
    if min_visible > 0 and m:
        areas = masks.flatten(1).sum(1)[order_dev]
        present &= counts.double() >= min_visible * areas.double()
    remap = torch.zeros(m + 1, dtype=torch.int64, device=dev)
    remap[1:] = torch.cumsum(present.to(torch.int64), 0) * present
    sources = order[present.cpu()]
    return remap[labels], sources
