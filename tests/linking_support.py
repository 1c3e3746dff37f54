"""Label stacks with a known answer for the linking tests, and how to compare them."""

from __future__ import annotations

import itertools

import numpy as np
from skimage.draw import disk


def paint(shape, objects):
    """A label plane from ``[(id, (row, col), radius), ...]`` (later objects on top)."""
    plane = np.zeros(shape, dtype=np.uint32)
    for oid, center, radius in objects:
        if radius > 0:
            plane[disk(center, radius, shape=shape)] = oid
    return plane


def per_plane_ids(truth, seed=0):
    """Each plane relabelled with ids restarting at 1, in a random order per plane."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(truth)
    for p in np.ndindex(truth.shape[:-2]):
        ids = np.unique(truth[p])
        ids = ids[ids > 0]
        lut = np.zeros(int(truth.max()) + 1, dtype=np.uint32)
        lut[ids] = rng.permutation(len(ids)) + 1
        out[p] = lut[truth[p]]
    return out


def bijection(truth, linked):
    """``{truth id: linked id}``, asserting the two label stacks are the same partition."""
    assert linked.dtype == np.uint32 and linked.shape == truth.shape
    assert np.array_equal(truth > 0, linked > 0)
    fg = truth > 0
    pairs = np.unique(np.stack([truth[fg], linked[fg]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1], "a true object got two ids"
    assert len(np.unique(pairs[1])) == pairs.shape[1], "two true objects share an id"
    return dict(zip(pairs[0].tolist(), pairs[1].tolist(), strict=True))


def iou_of(a, b):
    """IoU of the foregrounds of two label planes."""
    return ((a > 0) & (b > 0)).sum() / ((a > 0) | (b > 0)).sum()


def concentric(radii, shape=(48, 48)):
    """One disk per plane, all centred on the same point: sections of a round object."""
    return np.stack([paint(shape, [(1, (24, 24), r)]) for r in radii])


def not_recovered(truth, linked):
    """True ids not recovered exactly: split over several ids, or sharing one with another."""
    fg = truth > 0
    pairs = np.unique(np.stack([truth[fg], linked[fg]]), axis=1)
    t_ids, t_n = np.unique(pairs[0], return_counts=True)
    l_ids, l_n = np.unique(pairs[1], return_counts=True)
    split = set(t_ids[t_n > 1].tolist())
    merged = set(pairs[0][np.isin(pairs[1], l_ids[l_n > 1])].tolist())
    return split | merged


def stacked_in_z(labels, max_gap=1):
    """Ids of objects that start where another ends, at the same place: a section of B in
    its first two planes overlaps one of A in its last two, 1 .. ``max_gap + 1`` planes
    later. Overlap-based linking cannot tell such a pair from one object (or from one
    object missed in ``max_gap`` planes)."""
    ids = [int(i) for i in np.unique(labels) if i]
    planes = {i: np.flatnonzero((labels == i).any(axis=(1, 2))) for i in ids}
    out = set()
    for a in ids:
        for b in ids:
            la, fb = planes[a][-1], planes[b][0]
            if a == b or not la - 1 <= fb <= la + max_gap + 1:
                continue
            for pa, pb in itertools.product((la - 1, la), (fb, fb + 1)):
                if 1 <= pb - pa <= max_gap + 1 and pb < len(labels) and pa >= 0:
                    if ((labels[pa] == a) & (labels[pb] == b)).any():
                        out |= {a, b}
    return out


def random_stack(seed, planes=15, shape=(80, 80)):
    """Random walkers that are born, die and get missed, painted with per-plane ids."""
    rng = np.random.default_rng(seed)
    walkers = [[rng.uniform(8, 72, 2), rng.uniform(3, 9)] for _ in range(8)]
    out = []
    for _ in range(planes):
        objs = []
        for w in walkers:
            w[0] = np.clip(w[0] + rng.normal(0, 2, 2), 5, 75)
            if rng.random() > 0.1:
                objs.append((len(objs) + 1, tuple(w[0]), w[1]))
        if rng.random() < 0.3:
            walkers.append([rng.uniform(8, 72, 2), rng.uniform(3, 9)])
        if rng.random() < 0.2 and walkers:
            walkers.pop(int(rng.integers(len(walkers))))
        out.append(per_plane_ids(paint(shape, objs)[None], seed)[0])
    return np.stack(out)
