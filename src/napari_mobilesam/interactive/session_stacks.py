"""Propagation methods of :class:`~.session.PromptSession`: one object or every object of
a plane through neighbouring planes, and committing the planes found.

A mixin: it uses the session's planes, predictor, embeddings and label editor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from ..chunked_labels import ChunkedLabels, label_plane
from ..validation import check_bool_mask, check_int
from .prompts import Prediction, batches, to_sam
from .propagate import PropagationRule, check_axis, follow
from .propagate_many import Propagated, follow_many, paint_order

__all__ = ["StackPropagation"]

#: progress(index, {object id: predicted IoU of the objects accepted on that plane})
ManyProgress = Callable[[tuple[int, ...], dict[Hashable, float]], None]


class StackPropagation:
    """The propagation methods of :class:`~.session.PromptSession` (see there)."""

    def propagate(
        self,
        start,
        mask: np.ndarray,
        axis: int,
        *,
        direction: int = 0,
        min_score: float = 0.7,
        min_area_ratio: float = 0.3,
        max_planes: int | None = None,
        use_mask_input: bool = False,
        progress: Callable[[tuple[int, ...], float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        stability: dict[tuple[int, ...], float] | None = None,
    ) -> dict[tuple[int, ...], np.ndarray]:
        """Segment the object of ``mask`` in neighbouring planes along one plane axis.

        Plane by plane away from ``start``, the previous plane's mask becomes the prompt
        (:func:`~napari_mobilesam.interactive.mask_prompt`), single-mask output. A
        result is accepted when it is non-empty, its score is ``>= min_score`` and its
        area over the previous area lies in ``[min_area_ratio, 1 / min_area_ratio]``;
        the first rejected plane ends that direction. Planes are embedded (or taken from
        the cache) as needed; the current plane does not change.

        Parameters
        ----------
        start : tuple of int
            Plane index of ``mask``.
        mask : np.ndarray
            (H, W) bool, non-empty: the object on ``start``.
        axis : int
            Which plane axis to walk along (0-based index into :attr:`plane_shape`).
        direction, min_score, min_area_ratio, max_planes, use_mask_input
            The walk's rule; see :class:`~napari_mobilesam.interactive.PropagationRule`
            (both directions, higher first; predicted IoU >= 0.7; area within 0.3x to
            1 / 0.3x of the previous plane's; no plane limit; no mask input, which tiled
            planes never use).
        progress : callable(index, score), optional
            Called after each accepted plane.
        should_stop : callable() -> bool, optional
            Checked before each plane; True stops.
        stability : dict, optional
            Filled with ``{plane index: stability score}`` of the accepted planes (see
            :attr:`~napari_mobilesam.interactive.Prediction.stability`).

        Returns
        -------
        dict
            ``{plane index: (H, W) bool mask}`` for the accepted planes, ``start``
            excluded, in the order they were found.
        """
        start = self.check_index(start)
        mask = check_bool_mask(mask, self.shape_hw)
        axis = check_axis(axis, self.plane_shape)
        rule = PropagationRule(direction, min_score, min_area_ratio, max_planes, use_mask_input)

        tried: dict[tuple[int, ...], float] = {}  # every plane is segmented once

        def segment(idx, points_rc, box_rc, mask_input) -> Prediction:
            prompt = to_sam(points_rc, None, box_rc)
            if self.tiles is not None:  # tiles: no mask input (it may be another tile's)
                pred = self._predict_tiled(idx, prompt, False, None, 0)
            else:
                with self._predictor_lock:  # embedding and decoding together
                    embedding, _ = self._embedding_of(idx)
                    masks, scores, low_res = self._decode(embedding, prompt, False, mask_input)
                pred = Prediction(masks, scores, low_res, 0)
            if stability is not None:
                tried[idx] = pred.stability
            return pred

        found = follow(
            start, mask, axis, self.plane_shape, segment, rule,
            progress=progress, should_stop=should_stop,
        )  # fmt: skip
        if stability is not None:
            stability.update((idx, tried[idx]) for idx in found)
        return found

    def propagate_all(
        self,
        start,
        labels: np.ndarray,
        axis: int,
        *,
        ids: Sequence[int] | None = None,
        direction: int = 0,
        min_score: float = 0.7,
        min_area_ratio: float = 0.3,
        max_planes: int | None = None,
        use_mask_input: bool = False,
        progress: ManyProgress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Propagated:
        """Segment every object of a label plane in neighbouring planes, all at once.

        :meth:`propagate` for each object of ``labels``, walked together
        (:func:`~napari_mobilesam.interactive.propagate_many.follow_many`): one decoder
        call per plane for every object still going, each object stopping at its own
        first rejected plane. Commit the result with :meth:`commit_propagated`.

        Parameters
        ----------
        start : tuple of int
            Plane index of ``labels``.
        labels : np.ndarray
            (H, W) integer label plane (0 = background) on ``start``, e.g. the committed
            objects ``labels_stack[start]``; read only.
        axis : int
            Which plane axis to walk along.
        ids : sequence of int, optional
            The objects to propagate; default every id in ``labels``.
        direction, min_score, min_area_ratio, max_planes, use_mask_input
            The rule, the same for every object; see :meth:`propagate`.
        progress : callable(index, scores), optional
            Called after each plane with ``{id: predicted IoU}`` of the objects accepted
            there (the ones still going).
        should_stop : callable() -> bool, optional
            Checked before each plane; True stops every object (planes done are kept).

        Returns
        -------
        Propagated
            Masks and predicted IoU per object id and plane.

        Raises
        ------
        TypeError
            When ``labels`` is not an integer array.
        ValueError
            When its shape is not (H, W), it has no object, or an id of ``ids`` is not
            in it.
        """
        start = self.check_index(start)
        objects = self._objects(labels, ids)
        axis = check_axis(axis, self.plane_shape)
        rule = PropagationRule(direction, min_score, min_area_ratio, max_planes, use_mask_input)
        scores: dict[Hashable, dict[tuple[int, ...], float]] = {i: {} for i in objects}
        stability: dict[Hashable, dict[tuple[int, ...], float]] = {i: {} for i in objects}

        def segment_batch(idx, points_rc, boxes_rc, mask_inputs) -> list[Prediction]:
            prompts = [to_sam(p, None, b) for p, b in zip(points_rc, boxes_rc, strict=True)]
            if self.tiles is not None:  # tiles: no mask input (it may be another tile's)
                return [
                    dataclasses.replace(pred, choice=0)
                    for pred in self._predict_many_tiled(idx, prompts, False)
                ]
            ((_, (points_xy, point_labels, boxes_xyxy)),) = batches(prompts)  # one form
            with self._predictor_lock:  # embedding and decoding together
                embedding, _ = self._embedding_of(idx)
                self._activate(embedding)
                masks, iou, low_res = self.predictor.predict_batch(
                    points_xy, point_labels, boxes_xyxy, mask_input=mask_inputs,
                    multimask_output=False,
                )  # fmt: skip
            return [Prediction(masks[j], iou[j], low_res[j], 0) for j in range(len(prompts))]

        def step(idx, accepted) -> None:
            for obj, score in accepted.items():
                scores[obj][idx] = score
            if progress is not None:
                progress(idx, accepted)

        def stable(idx, predictions) -> None:
            for obj, pred in predictions.items():
                stability[obj][idx] = pred.stability

        masks = follow_many(
            start, objects, axis, self.plane_shape, segment_batch, rule,
            progress=step, should_stop=should_stop, accepted_predictions=stable,
        )  # fmt: skip
        return Propagated(masks, scores, stability)

    def _objects(self, labels, ids) -> dict[int, np.ndarray]:
        """``{id: (H, W) bool mask}`` of the objects of a label plane."""
        if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
            raise TypeError(
                f"labels must be an integer numpy array (a label plane), got "
                f"{getattr(labels, 'dtype', type(labels))}"
            )
        if labels.shape != self.shape_hw:
            raise ValueError(
                f"labels must be one label plane of shape {self.shape_hw}, got {labels.shape}"
            )
        present = [int(i) for i in np.unique(labels) if i > 0]
        if ids is None:
            if not present:
                raise ValueError("labels has no object (all 0): commit objects on the plane first")
            chosen = present
        else:
            chosen = [check_int(i, "ids") for i in ids]
            missing = sorted(set(chosen) - set(present))
            if missing or not chosen:
                raise ValueError(
                    f"ids must name objects of labels; not in it: {missing or 'none given'}"
                )
        return {i: labels == i for i in dict.fromkeys(chosen)}

    def commit_propagated(
        self, labels: np.ndarray, propagated: Propagated, *, overwrite: bool = False
    ) -> dict[tuple[int, ...], list[int]]:
        """Paint the planes of :meth:`propagate_all` into a label stack, with each object's
        own id; one undo step per plane.

        On each plane the masks are painted in the order of
        :func:`~napari_mobilesam.interactive.propagate_many.paint_order`: where two
        propagated objects overlap, the one with the higher predicted IoU keeps the
        pixels; ``overwrite`` decides about objects already there, as in :meth:`commit`.
        An object with no pixel left to paint on a plane is skipped there.

        Parameters
        ----------
        labels : np.ndarray or ChunkedLabels
            Integer label stack of shape ``plane_shape + (H, W)``, painted in place
            (chunked labels: each plane's painted region written back).
        propagated : Propagated
            What :meth:`propagate_all` returned; its objects are the label ids.
        overwrite : bool
            Paint over other objects too; by default only unlabelled pixels change.

        Returns
        -------
        dict
            ``{plane index: [ids painted]}`` in the order the planes were found (a plane
            where every object was skipped is absent).

        Raises
        ------
        TypeError
            When ``propagated`` is not a :class:`Propagated`.
        ValueError
            When ``labels`` does not have the stack's shape (nothing painted then), or
            an id does not fit its dtype (:meth:`commit`).
        """
        if not isinstance(propagated, Propagated):
            raise TypeError(
                f"propagated must be what propagate_all returned, got {type(propagated)}"
            )
        shape = (*self.plane_shape, *self.shape_hw)
        if not isinstance(labels, np.ndarray | ChunkedLabels) or labels.shape != shape:
            raise ValueError(
                f"labels must be the label stack, a numpy array (or chunked labels) of shape "
                f"{shape}, got {getattr(labels, 'shape', type(labels))}"
            )
        painted: dict[tuple[int, ...], list[int]] = {}
        for idx, objs in propagated.planes().items():
            masks = [propagated.masks[obj][idx] for obj in objs]
            order = paint_order(
                np.asarray(labels[idx]), masks, [propagated.scores[obj][idx] for obj in objs],
                overwrite=overwrite,
            )  # fmt: skip
            if order:
                ids = [int(objs[i]) for i in order]
                self.commit_many(
                    label_plane(labels, idx), [masks[i] for i in order], label_ids=ids,
                    overwrite=overwrite,
                )  # fmt: skip
                painted[idx] = ids
        return painted
