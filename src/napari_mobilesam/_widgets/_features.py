"""The model's scores of committed objects, kept in a Labels layer's ``features``.

The prompt widget records a mask's predicted IoU and stability when it commits it, the
everything widget records every object's when it segments a plane and carries them over
when it commits objects to the labels; the object table (:mod:`._objects`) shows them.
Rows are keyed by plane and id (see :mod:`napari_mobilesam.interactive.objects`).
"""

from __future__ import annotations

import numpy as np

from ..interactive import Prediction
from ..interactive.objects import record_scores, scores_from


def prediction_scores(prediction: Prediction) -> tuple[float, float]:
    """(predicted IoU, stability score) of the chosen mask of a prediction (see
    :attr:`~napari_mobilesam.interactive.Prediction.stability`)."""
    return prediction.score, prediction.stability


def record(layer, plane, ids, predicted_iou, stability_score, *, replace_plane=False) -> None:
    """Add the scores of objects on ``plane`` (a tuple of leading indices) to a Labels
    layer's features (see :func:`~napari_mobilesam.interactive.objects.record_scores`)."""
    layer.features = record_scores(
        layer.features, ids, predicted_iou, stability_score,
        plane=plane, replace_plane=replace_plane,
    )  # fmt: skip


def carry(source, target, plane, start: int) -> None:
    """Copy the scores of ``source``'s objects on ``plane`` to the objects they became in
    ``target`` after :func:`~napari_mobilesam.interactive.add_objects` gave them the ids
    ``start, start + 1, ...`` (the new objects are ``target``'s pixels >= ``start``)."""
    n = target.ndim - 2
    scores = scores_from(source.features, n)
    new = np.asarray(target.data[plane])
    where = new >= start
    if not scores or not where.any():
        return
    pairs = np.unique(np.stack([new[where], np.asarray(source.data[plane])[where]]), axis=1)
    ids, iou, stab = [], [], []
    for new_id, old_id in pairs.T.tolist():
        if (plane, old_id) in scores:
            ids.append(new_id)
            iou.append(scores[(plane, old_id)][0])
            stab.append(scores[(plane, old_id)][1])
    if ids:
        record(target, plane, ids, iou, stab)


def record_plane(layer, plane, info: dict) -> None:
    """Replace the scores of a plane of a segment-everything result layer with those of
    :meth:`~napari_mobilesam.everything.MaskGenerator.generate_labels`'s ``info`` (row
    ``k`` is label ``k + 1``)."""
    iou = np.asarray(info["predicted_iou"])
    ids = np.arange(1, len(iou) + 1)
    record(layer, plane, ids, iou, info["stability_score"], replace_plane=True)
