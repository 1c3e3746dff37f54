"""Extend linked 3D objects into the planes where segment-everything missed them.

Segment-everything finds a cell in the planes where its section is large and clear, and
often misses its small, faint end sections (and a middle plane now and then). Linking
then gives an object that spans fewer planes than the cell, whose 3D IoU with the cell
may fall below 0.5. :func:`extend_objects` prompts the missing planes with what the
object is in its neighbouring plane, the way interactive propagation follows a cell:

- a **forward sweep** (z = 1 .. Z-1): each object that has a section in plane z - 1 and
  none in plane z is prompted in plane z with the bounding box of its section in z - 1;
- a **backward sweep** (z = Z-2 .. 0): the same from plane z + 1.

A prompted mask is kept when its predicted IoU is at least ``min_score``, its IoU with
the section it came from is at least ``min_iou`` (the same cell, not a neighbour or a
fragment), and at least ``min_free`` of its pixels are unlabelled; it paints only
unlabelled pixels. Kept sections are prompts for the next plane of the sweep, so an
object grows plane by plane until the model no longer finds it. One sweep fills gaps
and lower ends, the other the upper ends. Each plane is prompted at most once per
sweep, with all its objects in one call, so a stack costs at most two encoder runs per
plane and the sweeps need only the current and the neighbouring plane.

The model is reached through ``predict(z, boxes)``, so this module stays free of torch;
:class:`BoxPrompter` answers it with a :class:`~napari_mobilesam.predictor.Predictor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..training.metrics import mask_iou

__all__ = [
    "THRESHOLDS",
    "BoxPrompter",
    "Extension",
    "box_masks",
    "extend_objects",
    "extend_stack",
    "sweep_stack",
]

#: what a prompted section needs to be kept, the defaults of every function here (and what
#: ``mobilesam-everything --link-extend`` and the everything widget use): predicted IoU,
#: IoU with the section it came from, share of its pixels unlabelled
THRESHOLDS = {"min_score": 0.6, "min_iou": 0.3, "min_free": 0.5}

#: ``predict(z, boxes)`` -> (masks (K, H, W) bool, scores (K,)): plane ``z`` prompted
#: with K boxes, XYXY pixels (x0, y0, x1, y1), one mask per box.
Predict = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Extension:
    """What :func:`extend_objects` added.

    Attributes
    ----------
    labels : (Z, H, W) np.ndarray
        The labels with the added sections (a copy; same dtype as the input).
    added : list of (z, object id, area in pixels, predicted IoU)
        One row per section added, in the order they were added.
    planes_prompted : int
        Plane prompts made (each one a ``predict`` call; two sweeps: at most 2 (Z - 1)).
    """

    labels: np.ndarray
    added: list[tuple[int, int, int, float]] = field(default_factory=list)
    planes_prompted: int = 0


def extend_objects(
    labels: np.ndarray,
    predict: Predict,
    *,
    min_score: float = THRESHOLDS["min_score"],
    min_iou: float = THRESHOLDS["min_iou"],
    min_free: float = THRESHOLDS["min_free"],
    progress: Callable[[int], None] | None = None,
) -> Extension:
    """Add sections to linked 3D objects in the planes next to them where they have none.

    Parameters
    ----------
    labels : (Z, H, W) integer array
        Linked labels, one id per 3D object through z (0: background), as
        :func:`~napari_mobilesam.linking.link_stack` gives them.
    predict : callable
        ``predict(z, boxes)`` -> ``(masks, scores)``: plane ``z`` prompted with the
        (K, 4) XYXY boxes, one (H, W) bool mask and one predicted IoU per box.
    min_score : float
        Least predicted IoU of a kept mask (0-1).
    min_iou : float
        Least IoU between a kept mask and the section it was prompted from (0-1).
    min_free : float
        Least fraction of a kept mask's pixels that are unlabelled (0-1).
    progress : callable, optional
        Called with 1 after each plane of each sweep (2 (Z - 1) calls in all).

    Returns
    -------
    Extension

    Raises
    ------
    ValueError
        ``labels`` is not a (Z, H, W) integer array, or a threshold is outside [0, 1].
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a (Z, H, W) integer array, got {labels.dtype} {labels.shape}"
        )
    out = Extension(labels.copy())
    out.added, out.planes_prompted = extend_stack(
        len(labels), lambda z: out.labels[z], None, predict,
        min_score=min_score, min_iou=min_iou, min_free=min_free, progress=progress,
    )  # fmt: skip
    return out


def extend_stack(
    n_planes: int,
    read: Callable[[int], np.ndarray],
    write: Callable[[int, np.ndarray, list], None] | None,
    predict: Predict,
    *,
    min_score: float = THRESHOLDS["min_score"],
    min_iou: float = THRESHOLDS["min_iou"],
    min_free: float = THRESHOLDS["min_free"],
    progress: Callable[[int], None] | None = None,
) -> tuple[list[tuple[int, int, int, float]], int]:
    """:func:`extend_objects` on a stack read and written one plane at a time.

    Two planes are held at once, so stacks larger than memory work (e.g. planes on disk).

    Parameters
    ----------
    n_planes : int
        Planes in the stack (Z).
    read : callable
        ``read(z)`` -> plane ``z``'s (H, W) linked labels, with the sections added to it
        so far (after a ``write`` of it, what was written). Painted in place.
    write : callable or None
        ``write(z, labels, added)`` with the (H, W) labels of a plane that gained
        sections and those sections' rows (as in ``added`` below), after each sweep
        that changed it (None: ``read`` gives views that keep the painting).
    predict, min_score, min_iou, min_free, progress
        As for :func:`extend_objects`.

    Returns
    -------
    added : list of (z, object id, area in pixels, predicted IoU)
    planes_prompted : int

    Raises
    ------
    ValueError
        A threshold outside [0, 1], or ``predict`` gave masks of another shape.
    """
    added: list[tuple[int, int, int, float]] = []
    prompted = 0
    for _, new in sweep_stack(n_planes, read, write, predict, min_score=min_score,
                              min_iou=min_iou, min_free=min_free):  # fmt: skip
        if new is not None:
            prompted += 1
            added.extend(new)
        if progress is not None:
            progress(1)
    return added, prompted


def sweep_stack(
    n_planes: int,
    read: Callable[[int], np.ndarray],
    write: Callable[[int, np.ndarray, list], None] | None,
    predict: Predict,
    *,
    min_score: float = THRESHOLDS["min_score"],
    min_iou: float = THRESHOLDS["min_iou"],
    min_free: float = THRESHOLDS["min_free"],
) -> Iterator[tuple[int, list[tuple[int, int, int, float]] | None]]:
    """:func:`extend_stack` one plane at a time, for callers that show progress or stop.

    Yields
    ------
    z : int
        The plane just done (2 (Z - 1) in all: the forward sweep, then the backward one).
    added : list of (z, object id, area, predicted IoU), or None
        The sections added to it (after ``write``); None when it was not prompted.

    Raises
    ------
    ValueError
        A threshold outside [0, 1] (at the first ``next``), or ``predict`` gave masks
        of another shape.
    """
    for name, value in (("min_score", min_score), ("min_iou", min_iou), ("min_free", min_free)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    for order, step in ((range(1, n_planes), -1), (range(n_planes - 2, -1, -1), 1)):
        source = read(order[0] + step) if len(order) else None
        for z in order:
            plane = read(z)
            new = _extend_plane(plane, source, z, predict, min_score, min_iou, min_free)
            if new and write is not None:
                write(z, plane, new)
            source = plane
            yield z, new


def _extend_plane(
    plane: np.ndarray,
    source: np.ndarray,
    z: int,
    predict: Predict,
    min_score: float,
    min_iou: float,
    min_free: float,
) -> list[tuple[int, int, int, float]] | None:
    """Prompt plane ``z`` (``plane``, painted in place) with the objects of ``source``
    that it lacks; returns the sections added, or None when nothing was prompted."""
    here = set(np.unique(plane).tolist())
    ids = [int(i) for i in np.unique(source) if i != 0 and int(i) not in here]
    if not ids:
        return None
    sections = [source == i for i in ids]
    boxes = np.array([_box(s) for s in sections], dtype=np.float64)
    masks, scores = predict(z, boxes)
    masks, scores = np.asarray(masks, bool), np.asarray(scores, np.float64).reshape(-1)
    if masks.shape != (len(ids), *plane.shape):
        raise ValueError(
            f"predict({z}, boxes) gave masks of shape {masks.shape}; expected "
            f"{(len(ids), *plane.shape)}"
        )
    added = []
    for k in np.argsort(-scores, kind="stable"):  # the surest first
        mask, score = masks[k], float(scores[k])
        area = int(mask.sum())
        if score < min_score or area == 0 or mask_iou(mask, sections[k]) < min_iou:
            continue
        free = mask & (plane == 0)
        n_free = int(free.sum())
        if n_free == 0 or n_free < min_free * area:
            continue
        plane[free] = ids[k]
        added.append((z, ids[k], n_free, score))
    return added


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Inclusive XYXY box of a non-empty (H, W) mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])


class BoxPrompter:
    """``predict(z, boxes)`` for :func:`extend_objects`, answered by a Predictor.

    Parameters
    ----------
    predictor : napari_mobilesam.predictor.Predictor
    planes : sequence of (H, W, 3) uint8 arrays, or callable
        The stack's planes as the model sees them (e.g. ``to_rgb_uint8`` of each), or
        ``planes(z)`` returning plane ``z`` (read only when prompted).

    Each plane is embedded when it is first prompted; the embedding of the last plane
    is kept, so a sweep embeds each plane once.
    """

    def __init__(self, predictor, planes: Sequence[np.ndarray] | Callable[[int], np.ndarray]):
        self.predictor = predictor
        self._planes = planes
        self._current: int | None = None
        self.embedded = 0  # encoder runs

    def __call__(self, z: int, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._current != z:
            plane = self._planes(z) if callable(self._planes) else self._planes[z]
            self.predictor.set_image(plane)
            self._current, self.embedded = z, self.embedded + 1
        return box_masks(self.predictor, boxes)


def box_masks(predictor, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One mask and its predicted IoU per box, from the image set on ``predictor``.

    Parameters
    ----------
    predictor : napari_mobilesam.predictor.Predictor
        With an image (or embedding) set.
    boxes : (K, 4) array
        XYXY pixels of that image.

    Returns
    -------
    masks : (K, H, W) bool
    scores : (K,) float
    """
    masks, scores, _ = predictor.predict_batch(boxes=boxes, multimask_output=False)
    return masks[:, 0], scores[:, 0]
