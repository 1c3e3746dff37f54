"""Streaming linker: planes in, planes with global ids out, a table at the end."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np

from .engine import MAX_ID, AxisLinker
from .table import LinkTable

__all__ = ["AXES", "Linker", "check_labels", "id_mapping"]

AXES = ("z", "t", "zt")


def check_labels(labels, name: str = "labels", ndims: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """``labels`` as a uint32 array, or a TypeError/ValueError naming ``name``.

    Integer dtypes only (not bool, not float), values in ``0 .. 2**32 - 1``,
    ``ndim`` in ``ndims``.
    """
    arr = np.asarray(labels)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"{name} must be an integer label image (0 = background), got dtype {arr.dtype}; "
            "convert masks with skimage.measure.label or np.asarray(..., dtype=np.uint32)"
        )
    if arr.ndim not in ndims:
        want = " or ".join(f"{d}D" for d in ndims)
        raise ValueError(f"{name} must be a {want} label image, got shape {arr.shape}")
    info = np.iinfo(arr.dtype)
    if arr.size and (info.min < 0 or info.max > MAX_ID):  # else every value fits
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_ID:
            raise ValueError(f"{name} ids must lie in 0..{MAX_ID} (uint32), got values {lo}..{hi}")
    return arr.astype(np.uint32, copy=False)


def _check_fraction(value, name: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        none = " or None" if optional else ""
        raise TypeError(f"{name} must be a number in (0, 1]{none}, got {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")


def _check_params(min_iou, min_cover_z, min_cover_t, max_gap, division_share) -> None:
    _check_fraction(min_iou, "min_iou")
    _check_fraction(min_cover_z, "min_cover_z", optional=True)
    _check_fraction(min_cover_t, "min_cover_t", optional=True)
    if not isinstance(max_gap, numbers.Integral) or isinstance(max_gap, bool) or max_gap < 0:
        raise ValueError(f"max_gap must be a whole number >= 0, got {max_gap!r}")
    if not isinstance(division_share, numbers.Real) or not 0 < division_share <= 0.5:
        raise ValueError(f"division_share must lie in (0, 0.5], got {division_share!r}")


def _volume_scores(table: LinkTable) -> dict[int, float]:
    """Area-weighted mean of the per-plane scores of each 3D object (objects without any
    score are left out)."""
    has = ~np.isnan(table.predicted_iou)
    if not has.any():
        return {}
    ids, inv = np.unique(table.id[has], return_inverse=True)
    area = table.area[has].astype(np.float64)
    num = np.bincount(inv, weights=area * table.predicted_iou[has])
    den = np.bincount(inv, weights=area)
    return {int(i): float(v) for i, v in zip(ids, num / den, strict=True)}


class Linker:
    """Link label planes pushed one at a time into 3D objects (z) or tracks (t, zt).

    Parameters
    ----------
    axis : {"z", "t", "zt"}
        ``"z"``: 2D planes of a z-stack become 3D objects. ``"t"``: 2D frames become
        tracks, with divisions. ``"zt"``: the planes of a TZYX series, pushed in
        (t, z) order; each time point's z-planes are linked into 3D objects, and
        those into tracks across time points (overlap of whole volumes).
    min_iou : float in (0, 1]
        Two objects of neighbouring planes are the same object only if their
        IoU is at least this.
    min_cover_z, min_cover_t : float in (0, 1], or None
        Through z and through t: two objects of neighbouring planes that IoU left
        unmatched are still the same object if the smaller lies inside the other for
        at least this part of its area (defaults 0.8 and 0.5; None: IoU only).
        Through z this joins the end planes of a round object to it: a cap is a
        small section nested in the next plane's, with an IoU far below any useful
        threshold (on ``synthetic.cells_3d``: IoU 0.03-0.5, cover 1.0). Through t it
        keeps a cell that moved or changed shape more than IoU allows (IoU 0.4-0.5,
        cover 0.6-0.75 on ``synthetic.cell_time_series``).
    max_gap : int >= 0
        Planes an object may be missing from and keep its id (default 1: an
        object absent in plane k but matched between k-1 and k+1 is bridged).
    divisions : bool, optional
        Look for divisions (default: True for ``"t"`` and ``"zt"``, False for ``"z"``).
    division_share : float in (0, 0.5]
        Smallest part of the parent's area each child must overlap (default 0.2).
    n_z : int, optional
        Planes per time point; required for ``"zt"``, only for it.
    keep_table : bool
        Record each object's row in every plane for :meth:`finish`'s table (default).
        False, for callers that need only the relabelled planes and
        :attr:`n_objects`: memory then does not grow with the number of planes, and
        :meth:`finish` returns a table without rows (its ``parents`` still complete).

    Notes
    -----
    For each pair of neighbouring planes:

    1. **Matching.** IoU of every overlapping pair of objects; the one-to-one
       matching of largest total IoU among pairs with IoU >= ``min_iou`` (the
       Hungarian method, per cluster of touching objects). A matched object takes
       the id of its partner in the previous plane. Through t, an object's IoU is
       also taken where its last displacement would put it (constant velocity),
       and the larger of the two counts. Through z, a section that has clearly
       shrunk (smaller than the object's previous section, and below 0.7 of its
       largest) is not matched to a larger one: a round object tapers to its tip,
       and shrinking then growing again (a waist) is two objects stacked in z.
    2. **Divisions** (t only). An object ``p`` of frame t divides into two objects
       ``c1, c2`` of frame t+1 (new ids, parent ``p``; ``p`` ends) when
       (a) each child lies mostly in the parent: |c ∩ p| >= |c| / 2;
       (b) each child takes a real part of the parent: |c ∩ p| >= ``division_share`` |p|
       (not a fragment, nor debris in the space a moving cell left);
       (c) together they cover most of the parent: |c1 ∩ p| + |c2 ∩ p| >= |p| / 2;
       (d) as one object they match ``p`` better than its one-to-one match from 1
       (if any, which must be one of them): IoU(p, c1 ∪ c2) > IoU(p, match).
       Overlaps are taken where ``p`` was and where its motion puts it. Where
       candidate divisions compete for a child, the larger IoU(p, c1 ∪ c2) wins.
    3. **Containment** (``min_cover_z`` / ``min_cover_t``). Objects of both planes
       still unmatched are matched globally on cover: the part of the smaller
       object that lies in the other. Through z, a section smaller than both the
       object's previous section and its candidate is not joined to it (that would
       make a waist: an object ending below one that starts is the likelier reading).
    4. **Gap closing.** Objects still without an id are matched on IoU (as in 1)
       with objects last seen 2, then 3, ... ``max_gap + 1`` planes back and not since.
    5. Whatever is left starts a new object, ids ascending in the plane's own order
       (those that take a section by rule 6 first: they start a plane earlier).
    6. **Look-back** (z only). An object that ended in the previous plane with a
       clearly shrunk section ``s`` (as in 1), where a larger object starting in this
       plane would have matched ``s`` (IoU or cover): ``s`` is the tip of one of two
       stacked objects. It goes to the new object when its centroid lies nearer the
       new object's axis than the old one's (each distance relative to that
       section's radius), since a tip lies on its object's axis. A section that
       started and ended in the previous plane inside the old object's section
       before ``s`` then takes the old object's id: its tip, pushed aside by ``s``.

    Limits: two objects that touch along the linked axis at the same place, one
    ending where the other starts, can look like one object to overlap-based
    linking (through z: cells stacked on top of each other). Rules 1, 3 and 6 keep
    them apart where the areas shrink and grow again. They err where the upper
    object's tip and the lower one's first section lie side by side in one plane,
    both inside the upper one's previous section, and the larger is taken as its
    continuation (on ``synthetic.cells_3d``'s default stacks: 4 of seeds 0-99, 7 of
    100-199).

    Rule 6 changes the ids of the previous plane, so through z a plane is given out
    when the next one is pushed, and the last one by :meth:`flush`. Through t each
    frame's ids are final as soon as it is pushed (gap closing only gives the newer
    frame an older id). For ``"zt"`` a time point's planes come out together once
    its last plane is pushed.
    Memory: ``max_gap + 1`` earlier planes (for ``"zt"``: volumes), independent of
    the number of planes, plus the table's rows (about 40 bytes per object per plane;
    none with ``keep_table=False``).
    """

    def __init__(self, axis: str = "z", *, min_iou: float = 0.5,
                 min_cover_z: float | None = 0.8, min_cover_t: float | None = 0.5,
                 max_gap: int = 1, divisions: bool | None = None, division_share: float = 0.2,
                 n_z: int | None = None, keep_table: bool = True):  # fmt: skip
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        _check_params(min_iou, min_cover_z, min_cover_t, max_gap, division_share)
        if axis == "zt":
            if not isinstance(n_z, numbers.Integral) or isinstance(n_z, bool) or n_z < 1:
                raise ValueError(f"n_z (planes per time point) must be an int >= 1, got {n_z!r}")
        elif n_z is not None:
            raise ValueError(f"n_z is only for axis='zt', got n_z={n_z!r} with axis={axis!r}")
        if divisions is None:
            divisions = axis != "z"
        self.axis, self.n_z = axis, n_z
        common = {"min_iou": min_iou, "max_gap": max_gap, "division_share": division_share}
        kind, cover = ("z", min_cover_z) if axis == "z" else ("t", min_cover_t)
        self._main = AxisLinker(kind=kind, min_cover=cover, divisions=bool(divisions),
                                keep_rows=bool(keep_table), **common)  # fmt: skip
        self._z_params = {"kind": "z", "min_cover": min_cover_z, "divisions": False, **common}
        self._z: AxisLinker | None = None
        self._volume: list[np.ndarray] = []  # "zt": the current time point's planes done
        self._shape: tuple[int, ...] | None = None
        self._finished = False
        self.planes_pushed = 0

    @property
    def n_objects(self) -> int:
        """Global ids given so far (3D objects or tracks): they are ``1 .. n_objects``."""
        return self._main.next_id - 1

    def push(self, labels, scores: Mapping | None = None) -> list[np.ndarray]:
        """Link the next plane.

        Parameters
        ----------
        labels : array-like of integers, shape (Y, X)
            One plane's label image (0 = background, ids unique in the plane, any
            order; uint32 range). For ``"t"`` a (Z, Y, X) volume is accepted too.
            Every plane must have the shape of the first.
        scores : dict of int to float, optional
            Predicted IoU (or any per-object score) of this plane's objects, by
            their ids in ``labels``; recorded in the table.

        Returns
        -------
        list of ndarray of uint32
            The planes whose global ids are now final, in order: for ``"z"`` the
            previous plane (nothing for the first; :meth:`flush` gives the last); for
            ``"t"`` this plane; for ``"zt"`` nothing until the last plane of a time
            point, then all its ``n_z`` planes.
        """
        if self._finished:
            raise RuntimeError("this Linker is finished; create a new one for another stack")
        arr = check_labels(labels, "labels", (2,) if self.axis != "t" else (2, 3))
        if self._shape is None:
            self._shape = arr.shape
        elif arr.shape != self._shape:
            raise ValueError(
                f"labels of plane {self.planes_pushed} has shape {arr.shape}, but the "
                f"first plane had {self._shape}: all planes must have the same shape"
            )
        self.planes_pushed += 1
        if self.axis != "zt":
            return self._main.push(arr, scores)
        if self._z is None:
            self._z = AxisLinker(**self._z_params)
        self._volume += self._z.push(arr, scores)
        if self._z.index < self.n_z:  # its planes pushed so far
            return []
        self._volume += self._z.flush()
        z_table = self._z.table("z", 2, release=True)
        volume = np.stack(self._volume)
        self._z, self._volume = None, []
        (out,) = self._main.push(volume, _volume_scores(z_table))
        return list(out)

    def flush(self) -> list[np.ndarray]:
        """The planes still held back, with their final ids: call it after the last
        :meth:`push` of a stack, before :meth:`finish`.

        Through z a plane's ids are final only when the next plane is linked (see
        Notes), so for ``"z"`` this is the last plane pushed. Nothing for ``"t"``, and
        for ``"zt"`` (a time point comes out with its last plane).
        """
        if self._finished:
            raise RuntimeError("this Linker is finished; create a new one for another stack")
        return self._main.flush()  # only a "z" linker holds a plane back

    def finish(self) -> LinkTable:
        """End the stack and return the table of objects / tracks.

        Raises
        ------
        RuntimeError
            For ``"z"``, if the last plane is still held back (:meth:`flush` not called).
        ValueError
            For ``"zt"``, if the last time point is incomplete (fewer than ``n_z`` planes).
        """
        if self._z is not None:  # a time point begun, not complete
            raise ValueError(
                f"the stack ended after {self._z.index} of the n_z={self.n_z} planes "
                "of its last time point"
            )
        if self._main.held:
            raise RuntimeError(
                f"plane {self.planes_pushed - 1} is still held back: call flush() after "
                "the last push to get it, then finish()"
            )
        self._finished = True
        ndim = 3 if self.axis == "zt" else len(self._shape or (0, 0))
        return self._main.table(self.axis, ndim, release=True)


def id_mapping(before, after) -> dict[int, int]:
    """``{id in before: id in after}`` for a plane and its relabelled version.

    Parameters
    ----------
    before, after : array-like of integers, same shape
        A plane's own labels and what :meth:`Linker.push` returned for it.

    Raises
    ------
    ValueError
        If the shapes differ, or ``after`` is not a relabelling of ``before``
        (an object split into two ids, or foreground that changed).
    """
    b = check_labels(before, "before", (2, 3))
    a = check_labels(after, "after", (2, 3))
    if a.shape != b.shape:
        raise ValueError(f"before has shape {b.shape} but after has {a.shape}")
    if not np.array_equal(a > 0, b > 0):
        raise ValueError("after does not have the same foreground as before")
    fg = b > 0
    keys = np.unique((b[fg].astype(np.uint64) << np.uint64(32)) | a[fg])
    src = (keys >> np.uint64(32)).astype(np.int64)
    dst = (keys & np.uint64(MAX_ID)).astype(np.int64)
    if len(np.unique(src)) != len(src):
        raise ValueError("after is not a relabelling of before: an object has two ids")
    return dict(zip(src.tolist(), dst.tolist(), strict=True))
