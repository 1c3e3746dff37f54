"""Streaming linker: planes in, planes with global ids out, a table at the end."""

from __future__ import annotations

import itertools
import numbers
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .match import Coded, code_plane, iou, match_global, overlaps
from .table import LinkTable

__all__ = ["AXES", "Linker", "check_labels", "id_mapping"]

AXES = ("z", "t", "zt")
_MAX_ID = int(np.iinfo(np.uint32).max)


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
    if arr.size and (info.min < 0 or info.max > _MAX_ID):  # else every value fits
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > _MAX_ID:
            raise ValueError(f"{name} ids must lie in 0..{_MAX_ID} (uint32), got values {lo}..{hi}")
    return arr.astype(np.uint32, copy=False)


def _check_params(min_iou, max_gap, division_share) -> None:
    if not isinstance(min_iou, numbers.Real) or isinstance(min_iou, bool):
        raise TypeError(f"min_iou must be a number in (0, 1], got {min_iou!r}")
    if not 0 < min_iou <= 1:
        raise ValueError(f"min_iou must lie in (0, 1], got {min_iou!r}")
    if not isinstance(max_gap, numbers.Integral) or isinstance(max_gap, bool) or max_gap < 0:
        raise ValueError(f"max_gap must be a whole number >= 0, got {max_gap!r}")
    if not isinstance(division_share, numbers.Real) or not 0 < division_share <= 0.5:
        raise ValueError(f"division_share must lie in (0, 0.5], got {division_share!r}")


@dataclass
class _Past:
    """A plane already linked: its codes, the global id of each code, divided parents."""

    index: int
    plane: Coded
    gid: np.ndarray  # uint32, shape (n + 1,); gid[0] = 0
    divided: np.ndarray  # bool, shape (n + 1,)


class _AxisLinker:
    """Links consecutive N-D planes along one axis (the engine behind :class:`Linker`)."""

    def __init__(self, min_iou: float, max_gap: int, divisions: bool, division_share: float):
        self.min_iou, self.max_gap = float(min_iou), int(max_gap)
        self.divisions, self.division_share = bool(divisions), float(division_share)
        self.history: deque[_Past] = deque(maxlen=self.max_gap + 1)
        self.next_id = 1
        self.index = 0
        self.parents: dict[int, int] = {}
        self.rows: list[tuple] = []  # per plane: index, ids, areas, scores, centroids

    def push(self, labels: np.ndarray, scores: Mapping | None) -> np.ndarray:
        """Link one checked plane; returns it with global ids (uint32, same shape)."""
        cur = code_plane(labels)
        score_arr = _scores_array(scores, cur.ids)
        gid = np.zeros(cur.n + 1, dtype=np.uint32)
        parent_of: dict[int, int] = {}  # code of a child -> its parent's global id
        if self.history:
            prev = self.history[-1]
            ia, ib, cnt = overlaps(prev.plane, cur)
            w = iou(prev.plane, cur, ia, ib, cnt)
            mr, mc = match_global(ia, ib, w, self.min_iou)
            gid[mc] = prev.gid[mr]
            if self.divisions:
                parent_of = self._divide(prev, cur, (ia, ib, cnt, w), (mr, mc))
                gid[list(parent_of)] = 0
            self._close_gaps(cur, gid, frozenset(parent_of))
        new = np.flatnonzero(gid == 0)[1:]
        if self.next_id - 1 + len(new) > _MAX_ID:
            raise OverflowError("more than 2**32 - 1 objects: ids no longer fit in uint32")
        gid[new] = np.arange(self.next_id, self.next_id + len(new), dtype=np.uint32)
        self.next_id += len(new)
        for code, parent in parent_of.items():
            self.parents[int(gid[code])] = parent
        self.rows.append((self.index, gid[1:], cur.areas[1:], score_arr, cur.centroids()))
        self.history.append(_Past(self.index, cur, gid, np.zeros(cur.n + 1, dtype=bool)))
        self.index += 1
        return gid[cur.codes]

    def _divide(self, prev: _Past, cur: Coded, pairs, matched) -> dict[int, int]:
        """Divisions ``prev -> cur`` (rule in :class:`Linker`): ``{child code: parent id}``.

        Marks the parents in ``prev.divided`` (a divided object is never bridged).
        """
        ia, ib, cnt, w = pairs
        mr, mc = matched
        match_of = np.zeros(prev.plane.n + 1, dtype=np.int64)
        match_of[mr] = mc
        single = match_of[ia] == ib  # the pair is the parent's one-to-one match
        match_iou = np.zeros(prev.plane.n + 1)
        match_iou[ia[single]] = w[single]
        taken = np.zeros(cur.n + 1, dtype=bool)
        taken[mc] = True
        area_p, area_c = prev.plane.areas, cur.areas
        ok = (cnt >= self.division_share * area_p[ia]) & (~taken[ib] | single)
        by_parent: dict[int, list[tuple[int, int]]] = {}
        for p, c, n in zip(ia[ok].tolist(), ib[ok].tolist(), cnt[ok].tolist(), strict=True):
            by_parent.setdefault(p, []).append((c, n))
        found = []
        for p, cands in by_parent.items():
            for (c1, n1), (c2, n2) in itertools.combinations(cands, 2):
                if match_of[p] and match_of[p] not in (c1, c2):
                    continue  # the parent cannot both continue and divide
                pair_iou = (n1 + n2) / (area_p[p] + area_c[c1] + area_c[c2] - n1 - n2)
                if pair_iou >= self.min_iou and pair_iou > match_iou[p]:
                    found.append((pair_iou, p, c1, c2))
        parent_of: dict[int, int] = {}
        busy = set()
        for _, p, c1, c2 in sorted(found, key=lambda f: (-f[0], f[1], f[2], f[3])):
            if p in busy or c1 in parent_of or c2 in parent_of:
                continue
            busy.add(p)
            prev.divided[p] = True
            parent_of[c1] = parent_of[c2] = int(prev.gid[p])
        return parent_of

    def _close_gaps(self, cur: Coded, gid: np.ndarray, children: frozenset) -> None:
        """Give objects new in ``cur`` the id of an object last seen 2 .. ``max_gap + 1``
        planes back (and not since), matched on IoU as neighbouring planes are."""
        for back in range(2, len(self.history) + 1):
            old = self.history[-back]
            free = gid == 0
            free[0] = False
            free[list(children)] = False
            if not free.any():
                return
            seen_later = np.concatenate([p.gid for p in list(self.history)[-back + 1 :]] + [gid])
            ended = ~np.isin(old.gid, seen_later) & ~old.divided
            ended[0] = False
            if not ended.any():
                continue
            ia, ib, cnt = overlaps(old.plane, cur)
            sel = ended[ia] & free[ib]
            ia, ib, cnt = ia[sel], ib[sel], cnt[sel]
            mr, mc = match_global(ia, ib, iou(old.plane, cur, ia, ib, cnt), self.min_iou)
            gid[mc] = old.gid[mr]

    def table(self, axis: str, ndim: int) -> LinkTable:
        """Everything pushed so far as a :class:`LinkTable`."""
        if self.rows:
            idx = np.concatenate([np.full(len(r[1]), r[0], dtype=np.int64) for r in self.rows])
            ids, area, score, cen = (np.concatenate([r[k] for r in self.rows]) for k in range(1, 5))
        else:
            idx, ids, area = (np.zeros(0, dtype=np.int64),) * 3
            score, cen = np.zeros(0), np.zeros((0, ndim))
        order = np.lexsort((idx, ids))
        return LinkTable(
            axis=axis,
            id=ids[order].astype(np.uint32),
            index=idx[order],
            area=area[order].astype(np.int64),
            predicted_iou=score[order].astype(np.float64),
            centroid=cen[order],
            parents=dict(sorted(self.parents.items())),
        )


def _scores_array(scores, cur_ids: np.ndarray) -> np.ndarray:
    """``{plane id: predicted IoU}`` -> float64 per object (NaN where none), checked."""
    out = np.full(len(cur_ids), np.nan)
    if scores is None:
        return out
    if not isinstance(scores, Mapping):
        raise TypeError(
            "scores must be a dict {label id: predicted IoU} for the plane, "
            f"got {type(scores).__name__}"
        )
    for key, value in scores.items():
        k = int(key)
        pos = int(np.searchsorted(cur_ids, k))
        if pos >= len(cur_ids) or cur_ids[pos] != k:
            raise ValueError(f"scores names label {k}, which is not in the plane's labels")
        out[pos] = float(value)
    return out


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
    max_gap : int >= 0
        Planes an object may be missing from and keep its id (default 1: an
        object absent in plane k but matched between k-1 and k+1 is bridged).
    divisions : bool, optional
        Look for divisions (default: True for ``"t"`` and ``"zt"``, False for ``"z"``).
    division_share : float in (0, 0.5]
        Smallest part of the parent each child must cover (default 0.25).
    n_z : int, optional
        Planes per time point; required for ``"zt"``, only for it.

    Notes
    -----
    For each pair of neighbouring planes:

    1. **Matching.** IoU of every overlapping pair of objects; the one-to-one
       matching of largest total IoU among pairs with IoU >= ``min_iou`` (the
       Hungarian method, per cluster of touching objects). A matched object takes
       the id of its partner in the previous plane.
    2. **Divisions** (t only). An object ``p`` of plane t divides into two objects
       ``c1, c2`` of plane t+1 (new ids, parent ``p``; ``p`` ends) when
       (a) each child covers at least ``division_share`` of ``p``'s area;
       (b) the two children taken as one object match ``p``:
       IoU(p, c1 ∪ c2) >= ``min_iou``; (c) they match it better than ``p``'s
       one-to-one match (if any, which must be one of them).
       Rule (b) asks that the children together cover most of the parent and lie
       mostly inside it; (a) that neither is a small fragment or a neighbour
       that moved into the space the parent left. Where two candidate divisions
       compete for a child, the one with the larger IoU(p, c1 ∪ c2) is kept.
    3. **Gap closing.** Objects still without an id are matched (as in 1) with
       objects last seen 2, then 3, ... ``max_gap + 1`` planes back and not since.
    4. Whatever is left starts a new object, ids ascending in the plane's own order.

    Each plane's ids are final as soon as it is pushed (gap closing only gives the
    newer plane an older id), so nothing is held back for ``"z"`` and ``"t"``. For
    ``"zt"`` a time point's planes come out together once its last plane is pushed.
    Memory: ``max_gap + 1`` earlier planes (for ``"zt"``: volumes) plus the table,
    independent of the number of planes.
    """

    def __init__(self, axis: str = "z", *, min_iou: float = 0.5, max_gap: int = 1,
                 divisions: bool | None = None, division_share: float = 0.25,
                 n_z: int | None = None):  # fmt: skip
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        _check_params(min_iou, max_gap, division_share)
        if axis == "zt":
            if not isinstance(n_z, numbers.Integral) or isinstance(n_z, bool) or n_z < 1:
                raise ValueError(f"n_z (planes per time point) must be an int >= 1, got {n_z!r}")
        elif n_z is not None:
            raise ValueError(f"n_z is only for axis='zt', got n_z={n_z!r} with axis={axis!r}")
        if divisions is None:
            divisions = axis != "z"
        self.axis, self.n_z = axis, n_z
        params = (min_iou, max_gap, bool(divisions), division_share)
        self._main = _AxisLinker(*params)
        self._z_params = (min_iou, max_gap, False, division_share)
        self._z: _AxisLinker | None = None
        self._volume: list[np.ndarray] = []
        self._shape: tuple[int, ...] | None = None
        self._finished = False
        self.planes_pushed = 0

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
            The planes whose global ids are now final, in order: this plane for
            ``"z"`` and ``"t"``; for ``"zt"`` nothing until the last plane of a time
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
            return [self._main.push(arr, scores)]
        if self._z is None:
            self._z = _AxisLinker(*self._z_params)
        self._volume.append(self._z.push(arr, scores))
        if len(self._volume) < self.n_z:
            return []
        z_table = self._z.table("z", 2)
        volume = np.stack(self._volume)
        self._z, self._volume = None, []
        out = self._main.push(volume, _volume_scores(z_table))
        return list(out)

    def finish(self) -> LinkTable:
        """End the stack and return the table of objects / tracks.

        Raises
        ------
        ValueError
            For ``"zt"``, if the last time point is incomplete (fewer than ``n_z`` planes).
        """
        if self._volume:
            raise ValueError(
                f"the stack ended after {len(self._volume)} of the n_z={self.n_z} planes "
                "of its last time point"
            )
        self._finished = True
        return self._main.table(self.axis, 3 if self.axis == "zt" else len(self._shape or (0, 0)))


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
    dst = (keys & np.uint64(_MAX_ID)).astype(np.int64)
    if len(np.unique(src)) != len(src):
        raise ValueError("after is not a relabelling of before: an object has two ids")
    return dict(zip(src.tolist(), dst.tolist(), strict=True))
