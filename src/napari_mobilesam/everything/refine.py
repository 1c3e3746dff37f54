"""Box refinement: each grid mask of a crop prompted again with its own bounding box.

A point prompt tells the decoder little about an object's extent, and a grid point
often falls near an object's edge, where the answer is part of the object or the
object with its neighbour. A box prompt says where the object ends: with a trained
model a box gives better masks than a point (the quality benchmark's box mIoU is above
its point mIoU). With ``refine_rounds=R`` the generator therefore decodes the grid
with loose filters (predicted IoU above ``refine_min_iou``, no stability filter),
removes duplicates (the generator's NMS), and prompts each surviving mask's box,
alone, for one mask; the new masks' boxes are prompted again for ``R - 1`` more rounds,
and the last round's masks go through the generator's own filters, as the grid's
masks do without refinement. Each mask keeps the grid point it came from
(``point_coords``). SAM 2's automatic mask generator has a similar step
(``use_m2m``: the point prompted again with the mask's logits).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..engine.workers import map_in_order
from .mask_data import MaskData
from .pipeline import CropImage, Pipeline

__all__ = ["decode_prompts", "refine_crop"]


def decode_prompts(
    pipeline: Pipeline,
    image: CropImage,
    points: np.ndarray,
    crop_box,
    orig_size: tuple[int, int],
    state,
    bar=None,
    boxes: np.ndarray | None = None,
) -> MaskData:
    """The kept masks of a crop's prompts, decoded in batches (on worker threads where
    the pipeline allows it).

    Parameters
    ----------
    pipeline : Pipeline
        The mode's steps and filters.
    image : CropImage
        The crop's embedding and decoder state.
    points : (N, 2) float array
        (x, y) grid points in the crop's pixels.
    crop_box : list of int
        XYXY of the crop in the image.
    orig_size : (int, int)
        (H, W) of the image.
    state : object
        ``pipeline.crop_state(image)``.
    bar : tqdm, optional
        Advanced by the prompts decoded.
    boxes : (N, 4) float array, optional
        XYXY box prompts in the crop's pixels, one per point; None: the points are
        the prompts.

    Returns
    -------
    MaskData
        As :meth:`Pipeline.batch` gives it, the batches concatenated in order.
    """
    per_pass = pipeline.prompts_per_pass(len(points))
    workers = pipeline.batch_workers(len(points))
    if workers > 1:  # two batches per worker at least (a batch's masks do not depend
        per_pass = min(per_pass, -(-len(points) // (2 * workers)))  # on its partners)
    starts = range(0, len(points), per_pass)

    def one(start):
        part = None if boxes is None else boxes[start : start + per_pass]
        return pipeline.batch(
            image, points[start : start + per_pass], crop_box, orig_size, state, part
        )

    data = MaskData()
    for start, found in zip(starts, map_in_order(one, list(starts), workers), strict=True):
        data.cat(found)
        if bar is not None:
            bar.update(len(points[start : start + per_pass]))
    return data


def refine_crop(
    seed_pipeline: Pipeline,
    pipeline: Pipeline,
    rounds: int,
    image: CropImage,
    points: np.ndarray,
    crop_box,
    orig_size: tuple[int, int],
    state,
    bar,
    dedup: Callable[[MaskData], torch.Tensor],
) -> MaskData:
    """A crop's grid decoded and its masks refined ``rounds`` (>= 1) times.

    Parameters
    ----------
    seed_pipeline : Pipeline
        The mode's steps with the loose filters (``refine_min_iou``, no stability):
        the grid and every round but the last.
    pipeline : Pipeline
        The same mode with the generator's filters: the last round.
    rounds : int
    image, points, crop_box, orig_size, state, bar
        As for :func:`decode_prompts` (``points``: the crop's grid).
    dedup : callable
        ``MaskData -> keep`` (bool mask or indices): the generator's NMS, applied to
        the grid's masks before the first round. Later rounds keep every chain: several
        near-copies of one object each get a chance to pass the last filters, which
        one of them alone often misses (docs/quality.md).

    Returns
    -------
    MaskData
        The last round's masks, as :meth:`Pipeline.batch` gives them (not yet merged),
        each with the grid point it came from.
    """
    data = decode_prompts(seed_pipeline, image, points, crop_box, orig_size, state, bar)
    for r in range(rounds):
        if len(data) == 0:
            break
        if r == 0:
            data.filter(dedup(data))
        seeds = np.asarray(data["points"], dtype=np.float64).reshape(-1, 2)
        boxes = seed_pipeline.crop_frame_boxes(data, crop_box)
        step = pipeline if r == rounds - 1 else seed_pipeline
        if bar is not None:
            bar.total += len(seeds)
            bar.refresh()
        data = decode_prompts(step, image, seeds, crop_box, orig_size, state, bar, boxes)
    return data
