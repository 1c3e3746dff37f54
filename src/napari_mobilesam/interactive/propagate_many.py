"""Following several objects through neighbouring planes at once.

The walk of :func:`~.propagate.follow` for many objects together. On each plane, one
batched decoder call takes the prompts of every object still going (per object: its
previous plane's mask as a widened box and an interior point, :func:`~.propagate.
mask_prompt`, and optionally its low-res logits), and each object stops at its own first
rejected plane (:meth:`~.propagate.PropagationRule.accepts` with its own previous area).
The objects share each plane's embedding, which on a CPU costs far more than decoding.

Each object's walk is :func:`follow`'s for that object alone, except that the decoder
sees its prompt in a batch: batched float arithmetic can differ from one-prompt calls
in the last bits (mask logits within about 1e-5 on a CPU), so a pixel whose logit is
that close to the threshold can flip, and the walks then continue from masks that
differ by that pixel.

Where committed objects overlap on a plane (:func:`paint_order`), the mask with the
higher predicted IoU keeps the contested pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .prompts import Prediction
from .propagate import PropagationRule, mask_prompt

__all__ = ["Propagated", "follow_many", "paint_order"]

#: segment_batch(index, points_rc (B, 1, 2), boxes_rc (B, 4), mask_inputs (B, 1, h, w)
#: or None) -> B Predictions
SegmentBatch = Callable[
    [tuple[int, ...], np.ndarray, np.ndarray, np.ndarray | None], list[Prediction]
]


@dataclass
class Propagated:
    """What a multi-object propagation found.

    Attributes
    ----------
    masks : dict
        ``{object: {plane index: (H, W) bool mask}}``, every object of the start plane
        (``{}`` for one that stopped at once); planes in the order they were found.
    scores : dict
        ``{object: {plane index: predicted IoU}}`` for the same planes.
    stability : dict
        ``{object: {plane index: stability score}}`` for the same planes (see
        :attr:`~napari_mobilesam.interactive.Prediction.stability`).
    """

    masks: dict[Hashable, dict[tuple[int, ...], np.ndarray]] = field(default_factory=dict)
    scores: dict[Hashable, dict[tuple[int, ...], float]] = field(default_factory=dict)
    stability: dict[Hashable, dict[tuple[int, ...], float]] = field(default_factory=dict)

    def planes(self) -> dict[tuple[int, ...], list[Hashable]]:
        """``{plane index: [objects found there]}``, planes in the order first found."""
        out: dict[tuple[int, ...], list[Hashable]] = {}
        for obj, found in self.masks.items():
            for idx in found:
                out.setdefault(idx, []).append(obj)
        return out


def follow_many(
    start: tuple[int, ...],
    masks: Mapping[Hashable, np.ndarray],
    axis: int,
    plane_shape: tuple[int, ...],
    segment_batch: SegmentBatch,
    rule: PropagationRule,
    *,
    progress: Callable[[tuple[int, ...], dict[Hashable, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    accepted_predictions: Callable[[tuple[int, ...], dict[Hashable, Prediction]], None]
    | None = None,
) -> dict[Hashable, dict[tuple[int, ...], np.ndarray]]:
    """Walk from ``start`` along ``axis`` with every object at once, one decoder call
    per plane.

    Parameters
    ----------
    start : tuple of int
        Plane index of ``masks`` (checked by the caller).
    masks : mapping
        ``{object: (H, W) bool mask}``, each non-empty (checked by the caller): the
        objects on ``start``. Objects are any hashable names, e.g. label ids.
    axis : int
        Which plane axis to walk along, ``0 <= axis < len(plane_shape)``.
    plane_shape : tuple of int
        Sizes of the plane axes.
    segment_batch : callable
        ``segment_batch(index, points_rc, boxes_rc, mask_inputs) -> list of
        Prediction``: single-mask predictions on plane ``index`` for B prompts in one
        decoder call; ``points_rc`` is (B, 1, 2) (row, col), ``boxes_rc`` (B, 4)
        ``(r0, c0, r1, c1)``, ``mask_inputs`` (B, 1, h, w) float32 logits or None (the
        first plane of a direction, or ``rule.use_mask_input`` off).
    rule : PropagationRule
        The same rule for every object, applied to each object's own score and area
        change; both directions (higher first) when ``rule.direction == 0``.
    progress : callable(index, scores), optional
        Called after each decoded plane with ``{object: predicted IoU}`` of the objects
        accepted there (those still going; empty when the last ones stopped).
    should_stop : callable() -> bool, optional
        Checked before each plane; True stops every object (the planes done are kept).
    accepted_predictions : callable(index, predictions), optional
        Called before ``progress`` with ``{object: Prediction}`` of the objects accepted
        on that plane (their scores beyond the predicted IoU, e.g. stability).

    Returns
    -------
    dict
        ``{object: {plane index: (H, W) bool mask}}`` for every object of ``masks``, its
        accepted planes (``start`` excluded) in the order they were found: for each
        object, what :func:`~.propagate.follow` returns for it alone (see the module
        notes on batching).
    """
    found: dict[Hashable, dict[tuple[int, ...], np.ndarray]] = {obj: {} for obj in masks}
    steps = (1, -1) if rule.direction == 0 else (rule.direction,)
    size = plane_shape[axis]
    limit = size if rule.max_planes is None else rule.max_planes
    for step in steps:
        # object -> (its previous plane's mask, that plane's logits or None)
        going: dict[Hashable, tuple[np.ndarray, np.ndarray | None]] = {
            obj: (mask, None) for obj, mask in masks.items()
        }
        pos = start[axis]
        for _ in range(limit):
            pos += step
            if not going or not 0 <= pos < size or (should_stop is not None and should_stop()):
                break
            idx = (*start[:axis], pos, *start[axis + 1 :])
            objs = list(going)
            prompts = [mask_prompt(going[obj][0]) for obj in objs]
            boxes_rc = np.stack([box for box, _ in prompts])
            points_rc = np.stack([point for _, point in prompts])[:, None]
            # every object of a direction is at the same step: all have logits or none
            logits = [going[obj][1] for obj in objs]
            use = rule.use_mask_input and logits[0] is not None
            mask_inputs = np.stack(logits) if use else None
            preds = segment_batch(idx, points_rc, boxes_rc, mask_inputs)
            assert len(preds) == len(objs), "segment_batch must give one Prediction per prompt"
            accepted: dict[Hashable, float] = {}
            kept: dict[Hashable, Prediction] = {}
            for obj, pred in zip(objs, preds, strict=True):
                previous_area = int(going[obj][0].sum())
                if rule.accepts(pred.mask, pred.score, previous_area):
                    found[obj][idx] = pred.mask
                    going[obj] = (pred.mask, pred.mask_input)
                    accepted[obj] = pred.score
                    kept[obj] = pred
                else:
                    del going[obj]
            if accepted_predictions is not None:
                accepted_predictions(idx, kept)
            if progress is not None:
                progress(idx, accepted)
    return found


def paint_order(
    labels: np.ndarray, masks: list[np.ndarray], scores: list[float], *, overwrite: bool
) -> list[int]:
    """Which masks to paint into a label plane, in which order.

    Masks are taken by descending predicted IoU (ties: their order in ``masks``), so
    where propagated objects overlap the more confident one keeps the pixels (a commit
    paints earlier masks first, later ones only where still free). A mask left with no
    pixel to paint, because it lies only over labelled pixels (without ``overwrite``)
    or over masks taken before it, is dropped.

    Parameters
    ----------
    labels : np.ndarray
        (H, W) integer label plane (0 = background), read only.
    masks : list of np.ndarray
        (H, W) bool masks.
    scores : list of float
        Their predicted IoU.
    overwrite : bool
        Whether labelled pixels may be painted over.

    Returns
    -------
    list of int
        Indices into ``masks`` to paint, in painting order.
    """
    free = np.ones(labels.shape, dtype=bool) if overwrite else labels == 0
    order = sorted(range(len(masks)), key=lambda i: -scores[i])
    out = []
    for i in order:
        region = masks[i] & free
        if region.any():
            free &= ~region
            out.append(i)
    return out
