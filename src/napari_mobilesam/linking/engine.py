"""The linking engine: one axis, planes in order, the rules of :class:`~.Linker` applied.

Kept apart from :mod:`.linker` (argument checks, the z-within-t composition) so that
each file holds one concept. Planes reach it checked (uint32, same shape).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .match import Coded, code_plane, iou, match_global, overlaps, shifted_overlaps
from .table import LinkTable

__all__ = ["AxisLinker"]

MAX_ID = int(np.iinfo(np.uint32).max)

#: Through z, an object's section smaller than its previous one and below this part
#: of its largest so far has clearly shrunk: the object is past its widest plane and
#: is tapering to its tip, so it does not go on into a larger section (that would
#: give it a waist). Sections of one ellipsoid near its widest plane differ by a few
#: percent at most, and from there on only shrink.
WAIST_SHRINK = 0.7


@dataclass
class _Past:
    """A plane already linked; per-object arrays are indexed by code (row 0: background)."""

    plane: Coded
    gid: np.ndarray  # uint32 (n + 1,): global id of each code
    divided: np.ndarray  # bool (n + 1,): the object divided after this plane
    centroid: np.ndarray  # float (n + 1, ndim)
    motion: np.ndarray  # float (n + 1, ndim): displacement since its previous plane (or 0)
    pred_area: np.ndarray  # int (n + 1,): its area in the previous plane (0: none)
    max_area: np.ndarray  # int (n + 1,): its largest section so far (this plane's included)
    first_id: int = 0  # the ids new in this plane are >= this


def _scores_array(scores: Mapping | None, ids: np.ndarray) -> np.ndarray:
    """``{plane id: predicted IoU}`` -> float64 per object (NaN where none), checked."""
    out = np.full(len(ids), np.nan)
    if scores is None:
        return out
    if not isinstance(scores, Mapping):
        raise TypeError(
            "scores must be a dict {label id: predicted IoU} for the plane, "
            f"got {type(scores).__name__}"
        )
    for key, value in scores.items():
        k = int(key)
        pos = int(np.searchsorted(ids, k))
        if pos >= len(ids) or ids[pos] != k:
            raise ValueError(f"scores names label {k}, which is not in the plane's labels")
        out[pos] = float(value)
    return out


class AxisLinker:
    """Links consecutive N-D planes along one axis.

    Parameters as in :class:`~.Linker`; ``min_cover`` None switches the containment
    pass off. ``kind`` ``"t"`` adds motion-predicted overlaps, ``"z"`` the waist rules
    and a one-plane look-ahead: a plane's ids are final when the next plane is pushed
    (:meth:`push` returns the previous plane, :meth:`flush` the last one).
    """

    def __init__(self, *, kind: str, min_iou: float, min_cover: float | None, max_gap: int,
                 divisions: bool, division_share: float, keep_rows: bool = True):  # fmt: skip
        self.keep_rows = bool(keep_rows)  # False: no per-plane rows, table() has none
        self.min_iou, self.min_cover, self.max_gap = float(min_iou), min_cover, int(max_gap)
        self.divisions, self.division_share = bool(divisions), float(division_share)
        self.motion, self.waist = kind == "t", kind == "z"
        self.history: deque[_Past] = deque(maxlen=self.max_gap + 1)
        self.held = False  # z: the last plane pushed is held back (its ids may change)
        self.next_id = 1
        self.index = 0
        self.parents: dict[int, int] = {}
        self.rows: list[tuple] = []  # per plane: index, ids, areas, scores, centroids

    # ------------------------------------------------------------------ one plane

    def push(self, labels: np.ndarray, scores: Mapping | None) -> list[np.ndarray]:
        """Link one checked plane; returns the planes whose global ids are now final
        (uint32, same shape): this one, or through z the previous one (if any)."""
        cur = code_plane(labels)
        cen = cur.centroids()
        score_arr = _scores_array(scores, cur.ids)
        gid = np.zeros(cur.n + 1, dtype=np.uint32)
        children: dict[int, int] = {}  # code of a division child -> its parent's code in prev
        if self.history:
            prev = self.history[-1]
            ov = overlaps(prev.plane, cur)
            pairs = self._iou_pairs(prev, cur, ov, steps=1)
            mr, mc = self._match_iou(pairs, None, None)
            gid[mc] = prev.gid[mr]
            if self.divisions:
                children = self._divide(prev, cur, ov, pairs, (mr, mc))
                gid[list(children)] = 0
            if self.min_cover is not None:
                left = ~np.isin(prev.gid, gid) & ~prev.divided
                left[0] = False
                mr, mc = self._match_cover(prev, cur, cen, ov, left, self._free(gid, children))
                gid[mc] = prev.gid[mr]
            self._close_gaps(cur, gid, children)
        new = np.flatnonzero(gid == 0)[1:]
        if self.next_id - 1 + len(new) > MAX_ID:
            raise OverflowError("more than 2**32 - 1 objects: ids no longer fit in uint32")
        gid[new] = np.arange(self.next_id, self.next_id + len(new), dtype=np.uint32)
        self.next_id += len(new)
        done = []
        if self.history and self.waist:  # before the parents: it can renumber new ids
            self._give_waist_sections(self.history[-1], cur, cen, ov, gid, new, children)
            done = self.flush()
        for code, parent in children.items():
            self.parents[int(gid[code])] = int(self.history[-1].gid[parent])
        if self.keep_rows:  # gid[1:] is a view: a section given away later shows here too
            self.rows.append((self.index, gid[1:], cur.areas[1:], score_arr, cen))
        self.history.append(self._remember(cur, gid, cen))
        self.history[-1].first_id = self.next_id - len(new)  # after any id freed in prev
        self.index += 1
        if not self.waist:
            return [gid[cur.codes]]
        self.held = True
        return done

    def flush(self) -> list[np.ndarray]:
        """The plane held back, if any, with its now final global ids (through z: the
        last plane pushed, once no plane follows it); afterwards nothing is held."""
        if not self.held:
            return []
        self.held = False
        last = self.history[-1]
        return [last.gid[last.plane.codes]]

    def _remember(self, cur: Coded, gid: np.ndarray, cen: np.ndarray) -> _Past:
        """The plane as history: with each object's motion and area since its previous
        plane, and its largest section so far."""
        ndim = cur.codes.ndim
        centroid = np.vstack([np.zeros((1, ndim)), cen])
        motion = np.zeros((cur.n + 1, ndim))
        pred_area = np.zeros(cur.n + 1, dtype=np.int64)
        max_area = cur.areas.copy()
        if self.history and self.history[-1].plane.n and cur.n:
            prev = self.history[-1]
            order = np.argsort(prev.gid[1:]) + 1  # codes of prev by global id
            pos = np.minimum(np.searchsorted(prev.gid[order], gid[1:]), len(order) - 1)
            pred = np.zeros(cur.n + 1, dtype=np.int64)  # the same object's code in prev
            hit = prev.gid[order[pos]] == gid[1:]
            pred[1:][hit] = order[pos[hit]]
            has = pred > 0
            motion[has] = centroid[has] - prev.centroid[pred[has]]
            pred_area[has] = prev.plane.areas[pred[has]]
            max_area[has] = np.maximum(max_area[has], prev.max_area[pred[has]])
        divided = np.zeros(cur.n + 1, dtype=bool)
        return _Past(cur, gid, divided, centroid, motion, pred_area, max_area)

    @staticmethod
    def _free(gid: np.ndarray, children) -> np.ndarray:
        """Objects of the new plane still without an id (division children excluded)."""
        free = gid == 0
        free[0] = False
        free[list(children)] = False
        return free

    # ------------------------------------------------------------------ the rules

    def _iou_pairs(self, old: _Past, cur: Coded, ov, steps: int):
        """IoU of every overlapping pair; with ``motion``, the larger of the IoU where the
        old object was and where its last displacement (times ``steps``) puts it. With
        ``waist``, pairs of a clearly shrunk old section (:data:`WAIST_SHRINK`) and a
        larger new one are left out."""
        ia, ib, cnt = ov
        w = iou(old.plane, cur, ia, ib, cnt)
        if self.waist:  # a clearly shrunk section does not go on into a larger one
            area_a, area_b = old.plane.areas[ia], cur.areas[ib]
            keep = ~(self._shrunk(old, ia) & (area_b > area_a))
            ia, ib, w = ia[keep], ib[keep], w[keep]
        shift = np.rint(old.motion * steps).astype(np.int64)
        if not self.motion or not shift.any():
            return ia, ib, w
        sa, sb, sc = shifted_overlaps(old.plane, cur, shift)
        width = cur.n + 1
        keys = np.concatenate([ia * width + ib, sa * width + sb])
        ws = np.concatenate([w, iou(old.plane, cur, sa, sb, sc)])
        order = np.lexsort((-ws, keys))  # by pair, the best IoU first
        keys, first = np.unique(keys[order], return_index=True)
        return keys // width, keys % width, ws[order][first]

    def _match_iou(self, pairs, a_free, b_free):
        """Global matching on IoU >= ``min_iou`` among the free objects (None: all)."""
        ia, ib, w = pairs
        if a_free is not None:
            sel = a_free[ia] & b_free[ib]
            ia, ib, w = ia[sel], ib[sel], w[sel]
        return match_global(ia, ib, w, self.min_iou)

    def _match_cover(self, old: _Past, cur: Coded, cen: np.ndarray, ov, a_free, b_free):
        """Global matching on cover (the part of the smaller object inside the other)
        >= ``min_cover`` among the free objects; ties go to the larger IoU, and through z
        first to the section nearer the old one's centroid.

        An old object never joins a larger one when it is already smaller than its own
        previous section: that would give it a waist, where two objects stacked in z
        (one ending, one starting) are the likelier reading. Through z, when two small
        sections lie wholly inside an object's last section (the tip of that object and
        the first section of another that starts below or above it), the one on the
        object's axis (nearest its centroid, relative to its radius) is its tip.
        """
        ia, ib, cnt = ov
        sel = a_free[ia] & b_free[ib]
        ia, ib, cnt = ia[sel], ib[sel], cnt[sel]
        area_a, area_b = old.plane.areas[ia], cur.areas[ib]
        cover = cnt / np.minimum(area_a, area_b)
        keep = cover >= self.min_cover
        w = cover + 1e-6 * iou(old.plane, cur, ia, ib, cnt)
        if self.waist:
            keep &= ~((area_a < area_b) & (old.pred_area[ia] > area_a))
            if keep.any():
                dist = np.linalg.norm(cen[ib - 1] - old.centroid[ia], axis=1)
                radius = np.sqrt(np.maximum(area_a, area_b) / np.pi)
                w += 1e-3 * (1.0 - np.minimum(dist / radius, 1.0))
        return match_global(ia[keep], ib[keep], w[keep], 0.0)

    def _give_waist_sections(self, prev: _Past, cur: Coded, cen: np.ndarray, ov,
                             gid: np.ndarray, new: np.ndarray, children) -> None:  # fmt: skip
        """Through z, look back one plane: the last section ``s`` of an object ``X`` that
        ends in ``prev``, clearly shrunk (:meth:`_shrunk`), goes to an object
        ``Y`` that starts in ``cur`` (``new``: its codes) when

        - ``Y``'s section is larger than ``s`` and matches it (IoU >= ``min_iou``, or
          ``s`` lies in it for >= ``min_cover``): ``X ... s`` then ``Y`` is a waist, so
          ``s`` is the tip of one of two objects stacked in z;
        - ``s`` lies nearer ``Y``'s axis than ``X``'s: its centroid is closer to ``Y``'s
          section's than to ``X``'s previous section's, each distance relative to that
          section's radius. The tip of an object lies on its axis (the generator's
          ellipsoids, and round cells); so ``s`` is ``Y``'s first section.

        One-to-one (the best cover + IoU first). Changes ``prev.gid`` in place. A parent
        that divided (``divisions``) and its children (``children``: codes) are left alone.
        """
        ended = ~np.isin(prev.gid, gid) & ~prev.divided
        ended[0] = False
        ended &= self._shrunk(prev, np.arange(prev.plane.n + 1))
        if not ended.any() or not len(new):
            return
        starts = np.zeros(cur.n + 1, dtype=bool)
        starts[new] = True
        starts[list(children)] = False
        ia, ib, cnt = ov
        sel = ended[ia] & starts[ib]
        ia, ib, cnt = ia[sel], ib[sel], cnt[sel]
        area_s = prev.plane.areas[ia]
        w_iou = iou(prev.plane, cur, ia, ib, cnt)
        cover = cnt / area_s
        matches = w_iou >= self.min_iou
        if self.min_cover is not None:
            matches |= cover >= self.min_cover
        ok = matches & (cur.areas[ib] > area_s)
        # distances from s's centroid: to X's previous section's, to Y's section's
        d_x = np.linalg.norm(prev.motion[ia], axis=1) / np.sqrt(prev.pred_area[ia] / np.pi)
        d_y = np.linalg.norm(cen[ib - 1] - prev.centroid[ia], axis=1)
        d_y /= np.sqrt(cur.areas[ib] / np.pi)
        ok &= d_y < d_x
        if ok.any():
            mr, mc = match_global(ia[ok], ib[ok], (cover + w_iou)[ok], 0.0)
            # the objects that now start in prev take the first of the new ids, so that
            # ids stay in order of first appearance
            took = np.isin(new, mc)
            gid[np.concatenate([new[took], new[~took]])] = np.sort(gid[new])
            gone = prev.gid[mr].copy()
            prev.gid[mr] = gid[mc]
            self._reattach_tips(prev, gid, gone)

    def _reattach_tips(self, prev: _Past, gid: np.ndarray, gone: np.ndarray) -> None:
        """The objects ``gone`` (ids) lost their last section in ``prev`` to a new object
        (:meth:`_give_waist_sections`). A section of ``prev`` that started and ended
        there, inside such an object's previous section, is its tip: pushed aside by
        the other cell's first section, it had lost the containment match to it. It
        takes the object's id; the ids after its own move down by one (no id unused)."""
        if len(self.history) < 2 or self.min_cover is None:
            return
        before = self.history[-2]  # the plane before prev
        lone = (prev.gid >= prev.first_id) & ~np.isin(prev.gid, gid)
        lone &= ~np.isin(prev.gid, list(self.parents))  # not a division child
        lone[0] = False
        if not lone.any():
            return
        ia, ib, cnt = overlaps(before.plane, prev.plane)
        sel = np.isin(before.gid[ia], gone) & lone[ib]
        sel &= prev.plane.areas[ib] < before.plane.areas[ia]
        ia, ib, cnt = ia[sel], ib[sel], cnt[sel]
        cover = cnt / prev.plane.areas[ib]
        ok = cover >= self.min_cover
        if not ok.any():
            return
        mr, mc = match_global(ia[ok], ib[ok], cover[ok], 0.0)
        dead = prev.gid[mc].copy()
        prev.gid[mc] = before.gid[mr]
        for d in np.sort(dead)[::-1].tolist():  # ids new in prev or cur, above d
            for arr in (prev.gid, gid):
                arr[arr > d] -= 1
            self.parents = {c - (c > d): p - (p > d) for c, p in self.parents.items()}
            self.next_id -= 1

    @staticmethod
    def _shrunk(old: _Past, codes: np.ndarray) -> np.ndarray:
        """Whether these sections have clearly shrunk (see :data:`WAIST_SHRINK`)."""
        area = old.plane.areas[codes]
        return (area < old.pred_area[codes]) & (area < WAIST_SHRINK * old.max_area[codes])

    def _divide(self, prev: _Past, cur: Coded, ov, pairs, matched) -> dict[int, int]:
        """Divisions ``prev -> cur`` (the rule: :class:`~.Linker`): ``{child code: parent code}``.

        Evaluated on the overlaps where the parent was and, with ``motion``, where its
        motion puts it. Marks the parents in ``prev.divided`` (never bridged later).
        """
        mr, mc = matched
        match_of = np.zeros(prev.plane.n + 1, dtype=np.int64)
        match_of[mr] = mc
        pa, pb, pw = pairs
        single = match_of[pa] == pb
        match_iou = np.zeros(prev.plane.n + 1)
        match_iou[pa[single]] = pw[single]  # the IoU of each parent's one-to-one match
        taken = np.zeros(cur.n + 1, dtype=bool)
        taken[mc] = True
        tables = [ov]
        shift = np.rint(prev.motion).astype(np.int64)
        if self.motion and shift.any():
            tables.append(shifted_overlaps(prev.plane, cur, shift))
        found = []
        for ia, ib, cnt in tables:
            found += self._division_candidates(prev, cur, (ia, ib, cnt), match_of, match_iou, taken)
        children: dict[int, int] = {}
        busy = set()
        for _, p, c1, c2 in sorted(found, key=lambda f: (-f[0], f[1], f[2], f[3])):
            if p in busy or c1 in children or c2 in children:
                continue
            busy.add(p)
            prev.divided[p] = True
            children[c1] = children[c2] = p
        return children

    def _division_candidates(self, prev: _Past, cur: Coded, ov, match_of, match_iou, taken):
        """``[(IoU(p, c1 ∪ c2), p, c1, c2), ...]`` for every pair of children that passes."""
        ia, ib, cnt = ov
        area_p, area_c = prev.plane.areas, cur.areas
        ok = (cnt >= self.division_share * area_p[ia]) & (2 * cnt >= area_c[ib])
        ok &= ~taken[ib] | (match_of[ia] == ib)
        by_parent: dict[int, list[tuple[int, int]]] = {}
        for p, c, n in zip(ia[ok].tolist(), ib[ok].tolist(), cnt[ok].tolist(), strict=True):
            by_parent.setdefault(p, []).append((c, n))
        found = []
        for p, cands in by_parent.items():
            for (c1, n1), (c2, n2) in itertools.combinations(cands, 2):
                if match_of[p] and match_of[p] not in (c1, c2):
                    continue  # the parent cannot both continue and divide
                pair_iou = (n1 + n2) / (area_p[p] + area_c[c1] + area_c[c2] - n1 - n2)
                if 2 * (n1 + n2) >= area_p[p] and pair_iou > match_iou[p]:
                    found.append((pair_iou, p, c1, c2))
        return found

    def _close_gaps(self, cur: Coded, gid: np.ndarray, children) -> None:
        """Give objects new in ``cur`` the id of an object last seen 2 .. ``max_gap + 1``
        planes back (and not since), matched on IoU as neighbouring planes are."""
        for back in range(2, len(self.history) + 1):
            old = self.history[-back]
            free = self._free(gid, children)
            if not free.any():
                return
            seen_later = np.concatenate([p.gid for p in list(self.history)[-back + 1 :]] + [gid])
            ended = ~np.isin(old.gid, seen_later) & ~old.divided
            ended[0] = False
            if not ended.any():
                continue
            pairs = self._iou_pairs(old, cur, overlaps(old.plane, cur), steps=back)
            mr, mc = self._match_iou(pairs, ended, free)
            gid[mc] = old.gid[mr]

    # ------------------------------------------------------------------ result

    def table(self, axis: str, ndim: int, *, release: bool = False) -> LinkTable:
        """Everything pushed so far as a :class:`LinkTable` (``release``: drop the
        per-plane rows as they are gathered, for a last call)."""
        if self.rows:
            idx = np.concatenate([np.full(len(r[1]), r[0], dtype=np.int64) for r in self.rows])
            ids, area, score, cen = (np.concatenate([r[k] for r in self.rows]) for k in range(1, 5))
            if release:
                self.rows = []
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
