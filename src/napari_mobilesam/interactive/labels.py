"""Committing masks into a label image, with undo.

A commit paints one or more bool masks into a label plane in place, each with its own
new id, either over background pixels only (the default: existing objects are never
changed) or over everything (``overwrite=True``). Every commit is one undo step, so
objects committed together are undone together.

A label plane is a numpy array (painted in place), or a plane of labels that live
elsewhere and are written through indexing (a
:class:`~napari_mobilesam.chunked_labels.LabelPlane` of chunked labels on disk): then the
masks' bounding box is read, painted and written back, and only its chunks change.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..validation import check_bool_mask, check_int

__all__ = ["LabelEditor"]


@dataclass
class _Step:
    target: object  # the (H, W) plane painted
    box: tuple[slice, slice]  # the masks' bounding box
    where: tuple[np.ndarray, ...]  # the pixels painted, within the box
    previous: np.ndarray  # their values before
    label_ids: list[int]


class LabelEditor:
    """Paints masks into label planes and reverts them, newest first.

    Parameters
    ----------
    shape_hw : (int, int)
        (H, W) of every label plane this editor paints.
    max_undo : int
        How many commits :meth:`undo` can revert (>= 0).

    Notes
    -----
    All methods are thread-safe (one lock per editor). A commit reads and writes only the
    masks' bounding box of the label plane, so committing a cell into an 8192 x 8192
    plane costs about as much as into a small one.
    """

    def __init__(self, shape_hw: tuple[int, int], max_undo: int = 64):
        self.shape_hw = (int(shape_hw[0]), int(shape_hw[1]))
        self.max_undo = check_int(max_undo, "max_undo", minimum=0)
        self._steps: list[_Step] = []
        self._lock = threading.RLock()

    def _check_labels(self, labels) -> None:
        dense = isinstance(labels, np.ndarray)
        if not dense and not all(
            hasattr(labels, a) for a in ("shape", "dtype", "__getitem__", "__setitem__", "max")
        ):
            raise TypeError(
                "labels must be a numpy array (modified in place) or a plane written through "
                f"indexing (ChunkedLabels.plane), got {type(labels)}"
            )
        if np.dtype(labels.dtype).kind not in "iu":
            raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
        if tuple(labels.shape) != self.shape_hw:
            raise ValueError(
                f"labels must have shape {self.shape_hw} (one plane), got {labels.shape}"
            )
        if dense and not labels.flags.writeable:
            raise ValueError("labels is read-only; commit paints it in place")

    def commit(
        self,
        labels: np.ndarray,
        masks,
        *,
        label_ids=None,
        overwrite: bool = False,
        min_free: float = 0.0,
    ) -> list[int]:
        """Paint masks into ``labels`` in place, each with its own id; one undo step.

        Parameters
        ----------
        labels : np.ndarray or LabelPlane
            (H, W) integer label image (0 = background), modified in place; a view into
            a stack (``labels3d[z]``) works, and so does a plane of chunked labels
            (:func:`~napari_mobilesam.chunked_labels.label_plane`).
        masks : sequence of np.ndarray, or (K, H, W) np.ndarray
            K >= 1 bool masks of shape (H, W). Where they overlap, the earlier one keeps
            the pixel: new objects never paint over each other.
        label_ids : sequence of int, optional
            K ids (>= 1, distinct); default ``labels.max() + 1``, ``+ 2``, ... For one plane
            of a stack, start at ``stack.max() + 1`` to keep ids unique across planes.
        overwrite : bool
            Also paint over pixels that already have a label; by default only background
            pixels change.
        min_free : float
            Without ``overwrite``: the least fraction of each mask's pixels that must be
            unlabeled (0: any pixel). A mask mostly inside existing objects would only
            add their fringes as a fragmented object of its own.

        Returns
        -------
        list of int
            The ids painted, in the order of ``masks``.

        Raises
        ------
        ValueError
            When a mask would paint no pixel (empty, or only over labelled pixels without
            ``overwrite``), fewer than ``min_free`` of its pixels are unlabeled, ``min_free``
            is outside [0, 1], or no new id fits the dtype. Nothing is painted then.
        OSError
            When writing labels on disk fails (a full disk). The region is put back as
            it was; if even that fails, the commit stays an undo step ("may be partly
            written": Undo reverts it once the disk has room).
        """
        with self._lock:
            self._check_labels(labels)
            if isinstance(masks, np.ndarray) and masks.ndim == 2:
                raise ValueError(
                    f"masks must be a sequence of (H, W) masks, got one array of shape "
                    f"{masks.shape}; use commit(labels, [mask])"
                )
            masks = list(masks)
            masks = [
                check_bool_mask(m, self.shape_hw, "mask" if len(masks) == 1 else f"masks[{i}]")
                for i, m in enumerate(masks)
            ]
            if not masks:
                raise ValueError("masks is empty: give at least one mask to commit")
            if not 0.0 <= min_free <= 1.0:
                raise ValueError(f"min_free must be in [0, 1], got {min_free}")
            ids = self._ids(labels, label_ids, len(masks))
            # only the masks' bounding box is read and written (a mask of a large plane
            # usually covers a small part of it)
            box = _bounding_box(masks)
            target = labels[box]  # a view of a numpy plane, else a copy written back
            free = np.ones(target.shape, dtype=bool) if overwrite else target == 0
            regions = []
            for i, mask in enumerate(masks):
                region = mask[box] & free
                name = "mask" if len(masks) == 1 else f"masks[{i}]"
                if not region.any():
                    raise ValueError(
                        f"{name} covers only pixels that already have a label; pass "
                        "overwrite=True to paint over them"
                    )
                painted, area = np.count_nonzero(region), np.count_nonzero(mask[box])
                if not overwrite and painted < min_free * area:
                    raise ValueError(
                        f"{name} lies mostly inside existing objects: {painted} of its {area} "
                        f"pixels are unlabeled (under {min_free:.0%}); pass overwrite=True "
                        "to paint over them"
                    )
                free &= ~region
                regions.append(region)
            local = np.nonzero(np.logical_or.reduce(regions))
            previous = target[local].copy()
            for region, label_id in zip(regions, ids, strict=True):
                target[region] = label_id
            step = _Step(labels, box, local, previous, ids)
            if not isinstance(labels, np.ndarray):  # labels on disk: a write can fail
                try:
                    labels[box] = target
                except OSError as err:
                    self._failed_write(step, target, err)
            self._add(step)
            return ids

    def _add(self, step: _Step) -> None:
        self._steps.append(step)
        del self._steps[: len(self._steps) - self.max_undo]

    def _failed_write(self, step: _Step, target: np.ndarray, err: OSError) -> None:
        """A commit's write into labels on disk failed (a full disk): put back what was
        there, or, when that fails too, keep the step so that Undo reverts the part
        written once there is room. Always raises."""
        target[step.where] = step.previous  # the region as it was before the commit
        why = f"writing the labels failed ({err.strerror or err})"
        try:
            step.target[step.box] = target
        except OSError:
            self._add(step)
            raise OSError(
                err.errno, f"{why}; the commit may be partly written: Undo reverts it once "
                "the disk has room",
            ) from err  # fmt: skip
        raise OSError(err.errno, f"{why}; nothing was painted") from err

    def _ids(self, labels, label_ids, n: int) -> list[int]:
        top = int(np.iinfo(labels.dtype).max)
        if label_ids is None:
            start = max(int(labels.max()), 0) + 1
            if start + n - 1 > top:
                raise ValueError(
                    f"labels already holds ids up to {start - 1}: {n} new id(s) do not fit "
                    f"the largest {labels.dtype} id ({top}); use a wider dtype or pass "
                    "label_id"
                )
            return list(range(start, start + n))
        ids = [check_int(i, "label_id") for i in label_ids]
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError(f"label_ids must hold {n} distinct ids, one per mask, got {ids}")
        for i in ids:
            if not 1 <= i <= top:
                raise ValueError(f"label_id must be in [1, {top}] for {labels.dtype}, got {i}")
        return ids

    @property
    def can_undo(self) -> bool:
        """Whether :meth:`undo` has a commit to revert."""
        with self._lock:
            return bool(self._steps)

    def next_undo(self) -> tuple[object, tuple[slice, slice]] | None:
        """What :meth:`undo` would revert now: ``(plane, box)``, the (H, W) plane the
        commit painted (as given to :meth:`commit`) and the (rows, cols) slices of its
        masks' bounding box; None when there is nothing to undo."""
        with self._lock:
            return (self._steps[-1].target, self._steps[-1].box) if self._steps else None

    def undo(self, labels: np.ndarray | None = None) -> list[int] | None:
        """Revert the last commit, restoring the pixels' previous values.

        Parameters
        ----------
        labels : np.ndarray or LabelPlane, optional
            Revert in this plane instead of the one the commit painted (when the label
            data was replaced by a copy); same shape.

        Returns
        -------
        list of int or None
            The ids that were removed, or None when there is nothing to undo.

        Raises
        ------
        ValueError
            When ``labels`` has another shape (the step stays).
        """
        with self._lock:
            if not self._steps:
                return None
            step = self._steps[-1]
            target = step.target if labels is None else labels
            if labels is not None:
                try:
                    self._check_labels(labels)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"labels must be an array of shape {self.shape_hw} to undo into, got "
                        f"{getattr(labels, 'shape', type(labels))}"
                    ) from None
            region = target[step.box]  # read, restored, written back unless a view
            region[step.where] = step.previous
            if not isinstance(target, np.ndarray):
                target[step.box] = region
            self._steps.pop()
            return step.label_ids


def _bounding_box(masks: list[np.ndarray]) -> tuple[slice, slice]:
    """(rows, cols) slices of the smallest window holding every set pixel of ``masks``
    ((H, W) bool, at least one pixel set in all of them together)."""
    rows = np.logical_or.reduce([m.any(axis=1) for m in masks])
    cols = np.logical_or.reduce([m.any(axis=0) for m in masks])
    r = np.flatnonzero(rows)
    c = np.flatnonzero(cols)
    return slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1)


def add_objects(labels, objects, start: int | None = None) -> list[int]:
    """Paint the objects of a label image into ``labels`` in place, with fresh ids, only
    into unlabeled pixels (existing objects are never changed).

    Parameters
    ----------
    labels : np.ndarray or ChunkedLabels or LabelPlane
        (..., H, W) integer labels (0 = background), modified in place. Chunked labels
        (:mod:`napari_mobilesam.chunked_labels`) are read a plane at a time, and only the
        region of each plane that gets objects is written.
    objects : array_like
        Integer labels of the same shape (0 = background), e.g. a segment-everything
        result; read a plane at a time when ``labels`` are chunked. An object none of
        whose pixels is unlabeled in ``labels`` is skipped.
    start : int, optional
        The first new id; default ``labels.max() + 1``. Ids follow the objects' order.

    Returns
    -------
    list of int
        The new ids painted.

    Raises
    ------
    ValueError
        When the shapes differ, or the new ids do not fit ``labels``' dtype (nothing is
        painted then).
    """
    if not hasattr(objects, "shape"):
        objects = np.asarray(objects)
    if tuple(objects.shape) != tuple(labels.shape):
        raise ValueError(f"objects must have the labels' shape {labels.shape}, got {objects.shape}")
    dense = isinstance(labels, np.ndarray)
    if dense:
        objects = np.asarray(objects)
        region = (labels == 0) & (objects > 0)
        ids = np.unique(objects[region])
    else:  # first pass: which objects get pixels, a plane at a time
        found = [np.zeros(0, dtype=np.int64)]
        for index in np.ndindex(*labels.shape[:-2]):
            here, obj = np.asarray(labels[index]), np.asarray(objects[index])
            found.append(np.unique(obj[(here == 0) & (obj > 0)]).astype(np.int64))
        ids = np.unique(np.concatenate(found))
    first = int(labels.max()) + 1 if start is None else int(start)
    top = int(np.iinfo(labels.dtype).max)
    if first + len(ids) - 1 > top:
        raise ValueError(
            f"{len(ids)} new ids from {first} do not fit the labels' {labels.dtype} "
            f"(largest id {top}); convert the labels to uint32"
        )
    lut = np.zeros(int(ids.max()) + 1 if len(ids) else 1, dtype=labels.dtype)
    new = np.arange(first, first + len(ids))
    lut[ids] = new
    if dense:
        labels[region] = lut[objects[region]]
        return new.tolist()
    for index in np.ndindex(*labels.shape[:-2]):  # second pass: paint, region by region
        here, obj = np.asarray(labels[index]), np.asarray(objects[index])
        region = (here == 0) & (obj > 0)
        if not region.any():
            continue
        box = _bounding_box([region])
        here[region] = lut[obj[region]]
        labels[(*index, *box)] = here[box]
    return new.tolist()


def drop_covered(
    objects: np.ndarray, labels: np.ndarray, min_free: float = 0.5, return_dropped: bool = False
) -> np.ndarray | tuple[np.ndarray, int]:
    """The objects of a label image without those mostly inside existing objects.

    Merging segment-everything objects into labels that already hold committed objects
    would otherwise add the slivers of duplicates (a few pixels around an object already
    there) as objects of their own.

    Parameters
    ----------
    objects : np.ndarray
        (H, W) integer labels (0 = background), e.g. a segment-everything plane.
    labels : np.ndarray
        (H, W) the labels they are to be merged into (0 = unlabeled).
    min_free : float
        The least fraction of an object's pixels that must be unlabeled for it to be kept.
    return_dropped : bool
        Also return how many objects were dropped.

    Returns
    -------
    np.ndarray or (np.ndarray, int)
        A copy of ``objects`` with the other objects set to 0 (and the number of objects
        dropped, with ``return_dropped``).

    Raises
    ------
    ValueError
        When the shapes differ or ``min_free`` is outside [0, 1].
    """
    objects, labels = np.asarray(objects), np.asarray(labels)
    if objects.shape != labels.shape:
        raise ValueError(f"objects must have the labels' shape {labels.shape}, got {objects.shape}")
    if not 0.0 <= min_free <= 1.0:
        raise ValueError(f"min_free must be in [0, 1], got {min_free}")
    flat = objects.ravel().astype(np.int64)
    area = np.bincount(flat, minlength=1)
    free = np.bincount(flat, weights=labels.ravel() == 0, minlength=1)
    keep = free >= min_free * area
    keep[0] = False
    kept = np.where(keep[flat], flat, 0).reshape(objects.shape).astype(objects.dtype)
    if return_dropped:
        return kept, int(np.count_nonzero((area[1:] > 0) & ~keep[1:]))
    return kept
