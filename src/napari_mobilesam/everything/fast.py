"""``mode="fast"``: reference mode's decisions made earlier and cheaper.

Prompts none of whose masks pass the IoU filter are never upscaled (the engine
decoder's ``min_iou``), masks empty at low resolution are dropped, and each other mask
that passes the IoU filter is upsampled only inside its own window (:mod:`.upsample`),
where its stability score is computed at full resolution as in reference mode, and kept
as a tight crop (:mod:`.masks`). Memory grows with the objects, not the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .boxes import batched_mask_to_box, is_box_near_crop_edge, nms
from .mask_data import MaskData
from .masks import mask_nms, tight_crop
from .pipeline import CropImage, Pipeline
from .regions import remove_small_regions
from .stability import calculate_stability_score
from .upsample import Upsampler

__all__ = ["FastPipeline", "clean_crop"]


@dataclass(frozen=True)
class _CropState:
    upsampler: Upsampler
    #: low-res rows/columns that pixels of the crop read (one past the image when its
    #: size is a multiple of 4: bilinear reads into the padding)
    valid: tuple[int, int]


class FastPipeline(Pipeline):
    """Filters on low-res logits, windowed upsampling, tight crop masks."""

    mode = "fast"
    full_size = False
    # batches share only read-only state (the crop's embedding and upsampler): on a CPU
    # they run on worker threads of one torch thread each (engine.workers)
    parallel_batches = True

    def crop_state(self, image: CropImage) -> _CropState:
        low_res = self.model.prompt_encoder.mask_input_size
        up = Upsampler.create(low_res, self.model.img_size, image.input_size, image.size)
        return _CropState(up, (int(up.row_hi.max()) + 1, int(up.col_hi.max()) + 1))

    boxes_in_image = True

    def batch(
        self, image: CropImage, points, crop_box, orig_size, state: _CropState, boxes=None
    ) -> MaskData:
        f = self.filters
        decoded = self.decode_grid(image, points, f.pred_iou_thresh or None, boxes)
        low_res, iou_preds, prompts = decoded.low_res, decoded.iou, decoded.rows
        n_masks = low_res.shape[1]
        vh, vw = state.valid
        low_res_full = low_res.flatten(0, 1)
        low_res = low_res_full[:, :vh, :vw]
        iou_preds = iou_preds.flatten(0, 1)
        pts = torch.as_tensor(points[prompts.numpy()].repeat(n_masks, axis=0))
        keep = torch.ones(len(iou_preds), dtype=torch.bool, device=low_res.device)
        if f.pred_iou_thresh > 0.0:
            keep &= iou_preds > f.pred_iou_thresh
        threshold, reach_below = self.model.mask_threshold, abs(f.stability_score_offset)
        keep &= (low_res > threshold).flatten(1).any(dim=1)  # else empty at full size too
        idx = torch.nonzero(keep).flatten().cpu()
        # every pixel above t - offset reads a low-res sample above it (the resize's
        # weights are convex): the windows of those samples hold the mask and both
        # masks of its stability score, which is then computed at full resolution
        reach = low_res[idx.to(low_res.device)] > threshold - reach_below
        low_boxes = batched_mask_to_box(reach).cpu().numpy()
        found = self._upsample(low_res_full[idx.to(low_res_full.device)], low_boxes, image, state)
        least = f.stability_score_thresh
        kept = [k for k, c in enumerate(found) if c is not None and (least <= 0 or c[2] >= least)]
        crops = [found[k][0] for k in kept]
        boxes = [found[k][1] for k in kept]
        stability = torch.tensor([float(found[k][2]) for k in kept], dtype=torch.float32)
        orig_h, orig_w = orig_size
        boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.int64).reshape(-1, 4))
        edge = is_box_near_crop_edge(boxes_t, crop_box, [0, 0, orig_w, orig_h])
        sel = [i for i, e in enumerate(edge.tolist()) if not e]
        kept_idx = idx[torch.as_tensor(kept, dtype=torch.long)][sel]
        offset = torch.tensor([[crop_box[0], crop_box[1], crop_box[0], crop_box[1]]])
        return MaskData(
            crops=[crops[i] for i in sel],
            boxes=boxes_t[sel] + offset,
            iou_preds=iou_preds[kept_idx.to(iou_preds.device)].float().cpu(),
            stability_score=stability[sel],
            points=pts[kept_idx],
        )

    def finish(self, data: MaskData, crop_box, orig_size, keep_masks: bool) -> MaskData:
        return data  # boxes are in image coordinates already

    def _upsample(self, low_res: torch.Tensor, low_boxes: np.ndarray, image: CropImage, state):
        """(tight crop mask, inclusive box, stability score) at crop resolution, or None
        where the mask is empty.

        Each mask is upsampled inside the window that the low-res samples in its
        ``low_boxes`` box (those above ``t - offset``) reach; masks whose window covers
        more than a quarter of the crop go through the exact batched postprocessing
        instead, which is cheaper there.
        """
        up: Upsampler = state.upsampler
        size = image.size
        threshold = self.model.mask_threshold
        offset = self.filters.stability_score_offset
        out: list = [None] * len(low_res)
        low_cpu = low_res.float().cpu()

        def measured(logits: torch.Tensor, r0: int, c0: int):
            found = tight_crop((logits > threshold).numpy(), r0, c0)
            if found is None:
                return None
            score = calculate_stability_score(logits[None], threshold, offset)
            return found[0], found[1], float(score[0])

        large = []
        for k in range(len(low_cpu)):
            win = up.window(tuple(low_boxes[k]))
            if (win[1] - win[0]) * (win[3] - win[2]) * 4 > size[0] * size[1]:
                large.append(k)
                continue
            out[k] = measured(up.logits(low_cpu[k], win), win[0], win[2])
        for start in range(0, len(large), 8):
            ks = large[start : start + 8]
            logits = self.model.postprocess_masks(low_res[ks][:, None], image.input_size, size)
            for k, one in zip(ks, logits[:, 0].float().cpu(), strict=True):
                out[k] = measured(one, 0, 0)
        return out


def small_regions_of_crops(data: MaskData, min_area: int, nms_thresh: float, shape,
                           nms_kind: str) -> None:  # fmt: skip
    """Fill small holes and remove small islands of every crop mask (:func:`clean_crop`),
    then NMS preferring the masks that needed no cleanup, as segment-anything does."""
    crops, boxes = data["crops"], np.asarray(data["boxes"], dtype=np.int64)
    new_crops, new_boxes, unchanged = [], [], []
    for crop, box in zip(crops, boxes, strict=True):
        crop2, box2, changed = clean_crop(crop, box, min_area, shape)
        new_crops.append(crop2)
        new_boxes.append(box2)
        unchanged.append(float(not changed))
    scores = torch.tensor(unchanged)
    new_boxes_arr = np.asarray(new_boxes, dtype=np.int64).reshape(-1, 4)
    if nms_kind == "mask":
        keep = mask_nms(new_crops, new_boxes_arr, scores, nms_thresh)
    else:
        keep = nms(torch.as_tensor(new_boxes_arr).float(), scores, nms_thresh)
    data["crops"] = new_crops
    data["boxes"] = torch.as_tensor(new_boxes_arr)
    data.filter(keep)


def clean_crop(crop: np.ndarray, box, min_area: int, shape) -> tuple[np.ndarray, list, bool]:
    """Fill small holes, remove small islands of one crop mask, as on the full mask.

    Holes are found in a window around the box wide enough that the background
    around the object alone holds ``min_area`` pixels (or reaches the image
    border), so a background region that is large in the full image is never
    mistaken for a small hole.

    Returns
    -------
    crop : np.ndarray
        The cleaned tight crop (bool).
    box : list of int
        Its inclusive XYXY box in image coordinates.
    changed : bool
    """
    h, w = shape
    x0, y0, x1, y1 = (int(v) for v in box)
    pad = -(-min_area // max(1, min(x1 - x0 + 1, y1 - y0 + 1))) + 1
    wx0, wy0 = max(0, x0 - pad), max(0, y0 - pad)
    wx1, wy1 = min(w - 1, x1 + pad), min(h - 1, y1 + pad)
    win = np.zeros((wy1 - wy0 + 1, wx1 - wx0 + 1), dtype=bool)
    win[y0 - wy0 : y1 - wy0 + 1, x0 - wx0 : x1 - wx0 + 1] = crop
    win, holes_changed = remove_small_regions(win, min_area, mode="holes")
    win, islands_changed = remove_small_regions(win, min_area, mode="islands")
    if not (holes_changed or islands_changed):
        return crop, [x0, y0, x1, y1], False
    found = tight_crop(win, wy0, wx0)
    if found is None:  # cannot happen: islands keep the largest region
        return crop, [x0, y0, x1, y1], True
    return found[0], found[1], True
