"""A generator's final :class:`MaskData` as segment-anything's records or label info.

Masks arrive either as full-size RLEs (reference and device modes) or as tight crops
with inclusive boxes (fast mode); these functions accept both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .boxes import batched_mask_to_box, box_xyxy_to_xywh, nms
from .mask_data import MaskData
from .masks import crop_to_rle, paste, tight_crop
from .regions import remove_small_regions
from .rle import area_from_rle, masks_to_rle, rle_to_coco, rle_to_mask

__all__ = ["crops_and_boxes", "label_info", "records", "reference_small_regions"]


def records(data: MaskData, shape: tuple[int, int], output_mode: str) -> list[dict[str, Any]]:
    """One dict per mask with segment-anything's keys (see ``MaskGenerator.generate``).

    Parameters
    ----------
    data : MaskData
        With ``boxes`` (inclusive XYXY), ``crop_boxes``, ``points``, ``iou_preds``,
        ``stability_score`` and either ``rles`` or ``crops``.
    shape : (int, int)
        (H, W) of the image.
    output_mode : {"binary_mask", "uncompressed_rle", "coco_rle"}
    """
    out: list[dict[str, Any]] = []
    n = len(data)
    if n == 0:
        return out
    boxes = np.asarray(data["boxes"], dtype=np.int64).reshape(-1, 4)
    crop_boxes = np.asarray(data["crop_boxes"]).reshape(-1, 4)
    points = np.asarray(data["points"], dtype=np.float64).reshape(-1, 2)
    iou = np.asarray(data["iou_preds"], dtype=np.float64)
    stab = np.asarray(data["stability_score"], dtype=np.float64)
    for i in range(n):
        if "rles" in data:
            rle = data["rles"][i]
            area = area_from_rle(rle)
            seg = None
        else:
            crop = data["crops"][i]
            area = int(np.count_nonzero(crop))
            seg = (crop, boxes[i])
        if output_mode == "binary_mask":
            segmentation = rle_to_mask(rle) if seg is None else paste(*seg, shape)
        else:
            if seg is not None:
                rle = crop_to_rle(*seg, shape)
            segmentation = rle if output_mode == "uncompressed_rle" else rle_to_coco(rle)
        out.append(
            {
                "segmentation": segmentation,
                "area": int(area),
                "bbox": box_xyxy_to_xywh(boxes[i]).tolist(),
                "predicted_iou": float(iou[i]),
                "point_coords": [points[i].tolist()],
                "stability_score": float(stab[i]),
                "crop_box": box_xyxy_to_xywh(crop_boxes[i]).tolist(),
            }
        )
    return out


def crops_and_boxes(data: MaskData, shape) -> tuple[list[np.ndarray], np.ndarray]:
    """Tight crop masks and (N, 4) inclusive boxes in image coordinates."""
    if "crops" in data:
        return data["crops"], np.asarray(data["boxes"], dtype=np.int64).reshape(-1, 4)
    crops, boxes = [], []
    for rle in data["rles"]:
        found = tight_crop(rle_to_mask(rle), 0, 0)
        crop, box = found if found is not None else (np.zeros((1, 1), bool), [0, 0, 0, 0])
        crops.append(crop)
        boxes.append(box)
    return crops, np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def label_info(data: MaskData, sources: np.ndarray, areas: np.ndarray) -> dict[str, np.ndarray]:
    """``generate_labels``'s info: per label ``k + 1``, the record ``sources[k]``'s scores,
    prompt point, whole-mask area (``areas`` holds every record's) and its index."""
    if len(sources) == 0:
        empty = np.zeros(0, dtype=np.float64)
        return {
            "predicted_iou": empty,
            "stability_score": empty.copy(),
            "point_coords": np.zeros((0, 2), dtype=np.float64),
            "mask_area": np.zeros(0, dtype=np.int64),
            "order": sources,
        }
    return {
        "predicted_iou": np.asarray(data["iou_preds"], dtype=np.float64)[sources],
        "stability_score": np.asarray(data["stability_score"], dtype=np.float64)[sources],
        "point_coords": np.asarray(data["points"], dtype=np.float64).reshape(-1, 2)[sources],
        "mask_area": np.asarray(areas)[sources].astype(np.int64),
        "order": sources,
    }


def reference_small_regions(data: MaskData, min_area: int, nms_thresh: float) -> None:
    """segment-anything's ``postprocess_small_regions`` on full-size masks (RLEs), in
    place: fill small holes, remove small islands, then NMS preferring masks that
    needed no cleanup."""
    new_masks, scores = [], []
    for rle in data["rles"]:
        mask = rle_to_mask(rle)
        mask, changed = remove_small_regions(mask, min_area, mode="holes")
        unchanged = not changed
        mask, changed = remove_small_regions(mask, min_area, mode="islands")
        unchanged = unchanged and not changed
        new_masks.append(torch.as_tensor(mask)[None])
        scores.append(float(unchanged))
    masks = torch.cat(new_masks, dim=0)
    boxes = batched_mask_to_box(masks)
    keep = nms(boxes.float(), torch.as_tensor(scores), nms_thresh)
    for i in keep.tolist():
        if scores[i] == 0.0:
            data["rles"][i] = masks_to_rle(masks[i][None])[0]
            data["boxes"][i] = boxes[i]
    data.filter(keep)
