"""Several boxes on the shown plane: several objects, predicted in one decoder call,
previewed together and committed together with consecutive fresh ids.

With two or more rectangles on the plane, each rectangle is an object, and each point
goes with the smallest rectangle that contains it; points outside every rectangle form
one more object when one of them is positive. With one rectangle or none, the prompt
widget's single-object path applies.
"""

from __future__ import annotations

import numpy as np
from napari.utils.notifications import show_info

from ..chunked_labels import label_plane
from ..interactive import ObjectPrompt
from . import _features
from ._chunked import unwritable, writable
from ._commit import MIN_FREE, overlap_message
from ._layers import ImageSession, on_plane
from ._tiles import mask_extent, refresh_region, union, update_preview


def plane_objects(state: ImageSession) -> list[ObjectPrompt]:
    """The objects of the shown plane when it holds two or more rectangles, else [].

    Returns
    -------
    list of ObjectPrompt
        One per rectangle (in drawing order), with the points inside it, (row, col)
        order; then one for the points outside every rectangle when any is positive.
    """
    plane = state.plane
    if plane is None:
        return []
    boxes = []
    for shape, kind in zip(state.box.data, state.box.shape_type, strict=True):
        shape = np.asarray(shape)
        if kind == "rectangle" and on_plane(shape, plane).all():
            rc = shape[:, -2:]
            boxes.append(np.array([*rc.min(axis=0), *rc.max(axis=0)]))
    if len(boxes) < 2:
        return []
    data = np.asarray(state.points.data)
    on = on_plane(data, plane) if len(data) else np.zeros(0, bool)
    points = data[on][:, -2:] if on.any() else np.zeros((0, 2))
    labels = np.asarray(state.points.features["positive"])[on].astype(int) if on.any() else []
    owner = np.full(len(points), -1)
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    for k in np.argsort(areas)[::-1]:  # the smallest containing box is assigned last
        b = boxes[k]
        inside = (points[:, 0] >= b[0]) & (points[:, 0] <= b[2])
        inside &= (points[:, 1] >= b[1]) & (points[:, 1] <= b[3])
        owner[inside] = k
    labels = np.asarray(labels, dtype=int)
    objects = []
    for k, box in enumerate(boxes):
        mine = owner == k
        pts = points[mine] if mine.any() else None
        objects.append(ObjectPrompt(pts, labels[mine] if mine.any() else None, box))
    rest = owner == -1
    if rest.any() and labels[rest].any():
        objects.append(ObjectPrompt(points[rest], labels[rest], None))
    return objects


class MultiObjects:
    """Mixin of :class:`~._prompt.PromptWidget`: several objects at once.

    Uses the widget's ``state``, ``runner``, ``status``, ``overlap``, ``viewer``,
    :meth:`clear` and ``negative_box``.
    """

    def _predict_many(self, state: ImageSession, objects: list[ObjectPrompt]) -> None:
        """Predict every object of the plane in the background (one decoder call for
        objects of the same form, e.g. all boxes without points)."""
        plane, session = state.plane, state.session

        def run():
            predictions = session.predict_many(objects)
            extent = None  # where any object's mask has pixels
            for p in predictions:
                extent = union(extent, mask_extent(p.masks))
            return predictions, extent

        def done(result) -> None:
            if state.plane == plane:
                self._show_many(state, *result)

        self._note_queued()
        self.runner.submit(run, done, key="predict")

    def _show_many(self, state: ImageSession, predictions: list, extent=None) -> None:
        """Preview object k as label k + 1 (where masks overlap, the earlier object);
        ``extent`` (r0, c0, r1, c1) holds every mask's pixels."""
        state.prediction, state.predictions, state.extent = None, predictions, extent

        def paint(view, rows, cols) -> None:
            for k in range(len(predictions))[::-1]:
                view[predictions[k].mask[rows, cols]] = min(k + 1, 255)

        update_preview(state, extent, paint)
        if state is self.state:
            scores = ", ".join(f"{p.score:.2f}" for p in predictions)
            self.status.setText(f"{len(predictions)} objects, predicted IoU {scores}")

    def _commit_many(self, state: ImageSession) -> int | None:
        """Commit every previewed object with consecutive fresh ids (one undo step).

        Returns
        -------
        int or None
            The first new id, or None when nothing was committed.
        """
        data = state.labels.data
        if not writable(data):  # numpy, or chunked labels on disk
            show_info(f"MobileSAM: {unwritable(state.labels.name)}")
            return None
        predictions = [p for p in state.predictions if p.mask.any()]
        if not predictions:
            show_info("MobileSAM: every mask is empty: move the boxes")
            return None
        overwrite = self.overlap.currentIndex() == 1
        plane = label_plane(data, state.plane)
        covered = 0
        if not overwrite:  # a box around an object committed before: skipped, not a fragment
            kept = [p for p in predictions if _free_fraction(plane, p.mask) >= MIN_FREE]
            covered, predictions = len(predictions) - len(kept), kept
            if not predictions:
                show_info(
                    "MobileSAM: every mask lies mostly inside existing objects; choose "
                    "'overlap: overwrite' in the widget to paint over them"
                )
                return None
        first = int(np.max(data)) + 1
        ids = list(range(first, first + len(predictions)))
        try:
            state.session.commit_many(
                plane, [p.mask for p in predictions], label_ids=ids, overwrite=overwrite
            )
        except ValueError as exc:
            show_info(f"MobileSAM: {overlap_message(exc)}")
            return None
        except OSError as exc:  # labels on a full disk: put back, or left to Undo
            show_info(f"MobileSAM: {exc}")
            state.labels.refresh()
            return None
        scores = [_features.prediction_scores(p) for p in predictions]  # for the object table
        _features.record(
            state.labels, state.plane, ids, [s[0] for s in scores], [s[1] for s in scores]
        )
        refresh_region(state.labels, state.plane, state.extent)  # only where the masks are
        state.committed.update({i: (state.plane, state.extent) for i in ids})
        self.clear()
        self.negative_box.setChecked(False)
        note = f" ({covered} mostly inside existing objects skipped)" if covered else ""
        which = f"object {ids[0]}" if len(ids) == 1 else f"objects {ids[0]}-{ids[-1]}"
        self.status.setText(f"committed {which} to {state.labels.name}{note}")
        return first


def _free_fraction(plane, mask: np.ndarray) -> float:
    """The fraction of ``mask``'s pixels that are unlabeled in ``plane`` (read only in
    the mask's bounding box; chunked planes too)."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    inside = mask[box]
    return np.count_nonzero(inside & (np.asarray(plane[box]) == 0)) / np.count_nonzero(inside)
