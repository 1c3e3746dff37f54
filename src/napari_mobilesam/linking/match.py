"""Per-plane object statistics, overlaps between two planes, and the global matching.

Everything here works on *coded* planes: a label image whose objects are renumbered
``1..n`` in order of their original ids (0 stays background), so that per-object
statistics are plain arrays indexed by code and ``np.bincount`` does the counting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["Coded", "code_plane", "iou", "match_global", "overlaps", "shifted_overlaps"]

_MAX_LABEL = np.iinfo(np.uint32).max


@dataclass(frozen=True)
class Coded:
    """One plane with its objects renumbered ``1..n``.

    Attributes
    ----------
    codes : ndarray of uint32, shape (*plane)
        0 for background, ``i`` for the object ``ids[i - 1]``.
    ids : ndarray of uint32, shape (n,)
        The ids the objects had in the plane, ascending.
    areas : ndarray of int64, shape (n + 1,)
        Pixels per code (``areas[0]``: background).
    """

    codes: np.ndarray
    ids: np.ndarray
    areas: np.ndarray

    @property
    def n(self) -> int:
        return len(self.ids)

    def centroids(self) -> np.ndarray:
        """Mean pixel coordinate of each object, float64 of shape (n, ndim), in axis order."""
        out = np.empty((self.n, self.codes.ndim))
        if self.n == 0:
            return out
        flat = self.codes.ravel()
        fg = np.flatnonzero(flat)  # foreground only: a fraction of the plane
        codes = flat[fg]
        for ax, coord in enumerate(np.unravel_index(fg, self.codes.shape)):
            sums = np.bincount(codes, weights=coord, minlength=self.n + 1)
            out[:, ax] = sums[1:] / self.areas[1:]
        return out


def code_plane(labels: np.ndarray) -> Coded:
    """Renumber the objects of a label image ``1..n`` (ascending original id).

    Parameters
    ----------
    labels : ndarray of unsigned or non-negative integers, any shape
        0 is background. Checked by the caller (integer, ``0 <= id < 2**32``).

    Returns
    -------
    Coded
    """
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= max(4 * flat.size, 1 << 16):  # ids are dense enough for a lookup table
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present).astype(np.uint32)
        lut = np.zeros(top + 1, dtype=np.uint32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
        codes = lut[labels]
    else:  # sparse, large ids: sort instead
        values, inverse = np.unique(flat, return_inverse=True)
        has_bg = values[0] == 0
        ids = values[1:] if has_bg else values
        codes = (inverse + (0 if has_bg else 1)).astype(np.uint32).reshape(labels.shape)
        ids = ids.astype(np.uint32)
    areas = np.bincount(codes.ravel(), minlength=len(ids) + 1).astype(np.int64)
    return Coded(codes=codes, ids=ids, areas=areas)


def overlaps(a: Coded, b: Coded) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels shared by every pair of objects of two planes of the same shape.

    Returns
    -------
    ia, ib : ndarray of int64, shape (m,)
        Codes (1-based) of the overlapping pairs in ``a`` and ``b``.
    counts : ndarray of int64, shape (m,)
        Shared pixels of each pair (> 0).
    """
    fa, fb = a.codes.ravel(), b.codes.ravel()
    both = (fa > 0) & (fb > 0)
    return _count_pairs(fa[both], fb[both], a.n, b.n)


def iou(a: Coded, b: Coded, ia: np.ndarray, ib: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Intersection over union of the pairs ``(ia, ib)`` given their shared pixels."""
    return counts / (a.areas[ia] + b.areas[ib] - counts)


def match_global(
    rows: np.ndarray, cols: np.ndarray, weight: np.ndarray, min_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of maximum total weight among pairs with ``weight >= min_weight``.

    The candidate pairs form a bipartite graph; each connected component is solved
    on its own with ``scipy.optimize.linear_sum_assignment`` (the Hungarian method),
    so the cost matrices stay as small as the clusters of touching objects, and a
    component of a single pair (the usual case) is accepted without solving.

    Parameters
    ----------
    rows, cols : ndarray of int, shape (m,)
        The candidate pairs (any non-negative ids; a pair appears at most once).
    weight : ndarray of float, shape (m,)
        Their weights (here IoU, > 0).
    min_weight : float
        Pairs below it are never matched.

    Returns
    -------
    rows, cols : ndarray of int64, shape (k,)
        The matched pairs, sorted by row.
    """
    keep = weight >= min_weight
    rows, cols, weight = rows[keep], cols[keep], weight[keep]
    if rows.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    ur, r = np.unique(rows, return_inverse=True)
    uc, c = np.unique(cols, return_inverse=True)
    nr = len(ur)
    graph = coo_matrix((np.ones(len(r)), (r, nr + c)), shape=(nr + len(uc),) * 2)
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[r]
    sizes = np.bincount(edge_comp)
    single = sizes[edge_comp] == 1
    out_r, out_c = [r[single]], [c[single]]
    for k in np.flatnonzero(sizes > 1):
        sel = np.flatnonzero(edge_comp == k)
        lr, rr = np.unique(r[sel], return_inverse=True)
        lc, cc = np.unique(c[sel], return_inverse=True)
        dense = np.zeros((len(lr), len(lc)))
        dense[rr, cc] = weight[sel]  # absent pairs weigh 0: never better than a real one
        ar, ac = linear_sum_assignment(dense, maximize=True)
        real = dense[ar, ac] > 0
        out_r.append(lr[ar[real]])
        out_c.append(lc[ac[real]])
    mr, mc = ur[np.concatenate(out_r)], uc[np.concatenate(out_c)]
    order = np.argsort(mr, kind="stable")
    return mr[order].astype(np.int64), mc[order].astype(np.int64)


def _count_pairs(ka: np.ndarray, kb: np.ndarray, na: int, nb: int):
    """Counts of the code pairs ``(ka[i], kb[i])`` (all > 0) -> (ia, ib, counts)."""
    width = nb + 1
    keys = ka.astype(np.int64) * width + kb
    if (na + 1) * width <= max(4 * keys.size, 1 << 20):
        counts = np.bincount(keys, minlength=(na + 1) * width)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(keys, return_counts=True)
    return keys // width, keys % width, counts.astype(np.int64)


def shifted_overlaps(a: Coded, b: Coded, shift: np.ndarray):
    """Like :func:`overlaps`, with each object of ``a`` moved by its own shift first.

    Parameters
    ----------
    shift : ndarray of int, shape (a.n + 1, a.codes.ndim)
        Displacement of each code of ``a`` in pixels, in axis order (row 0 unused).
        Pixels moved out of the plane overlap nothing.
    """
    flat = a.codes.ravel()
    fg = np.flatnonzero(flat)
    codes = flat[fg]
    moved = [c + shift[codes, ax] for ax, c in enumerate(np.unravel_index(fg, a.codes.shape))]
    inside = np.ones(len(fg), dtype=bool)
    for ax, c in enumerate(moved):
        inside &= (c >= 0) & (c < a.codes.shape[ax])
    where = np.ravel_multi_index([c[inside] for c in moved], a.codes.shape)
    kb = b.codes.ravel()[where]
    ka = codes[inside]
    hit = kb > 0
    return _count_pairs(ka[hit], kb[hit], a.n, b.n)
