"""Link per-plane label images into 3D objects (through z) and tracks (through t).

Segment-everything labels each plane on its own, ids restarting at 1. This package
gives an object one id through a z-stack, and a cell one track id through a time
series (a TZYX series: both, ``axis="zt"``), with divisions recorded as parent links.

How: objects of neighbouring planes are matched on their overlap (IoU), solved
globally per plane pair with scipy's ``linear_sum_assignment`` (the Hungarian
method) among pairs with IoU >= ``min_iou``; not greedily, so one object's good
match never steals another's better one. Objects left unmatched are then matched on
containment (``min_cover_z``, ``min_cover_t``): that joins the small end sections of
round objects to them in z, and keeps fast or changing cells in t. Through t the
overlap is also taken where each cell's last displacement puts it. An object missed
in one plane keeps its id (gap closing, ``max_gap``); in time, a cell whose area is
taken over by two new cells divides (the rule: :class:`Linker`).

Why scipy: it is already a dependency (through scikit-image), installs cleanly
everywhere, and overlap matching between neighbouring planes needs nothing more;
tracking libraries add solvers, models and compiled dependencies that this problem
does not use.

Streaming: linking needs only the last ``max_gap + 1`` planes, so :class:`Linker`
takes planes one at a time (``push``) and returns them relabelled as soon as their
ids are final (through t at once, through z one plane later: ``flush`` gives the
last); memory does not grow with the number of planes (only the table does, by one row per
object per plane). :func:`link_stack` runs it over any array-like stack (numpy,
dask, zarr, memory-mapped TIFF), reading one plane at a time.

Judging tracks against true ones: :func:`track_accuracy` (the fraction of correct
links, division recall), which the quality benchmark reports for the stand-in model.

Output: planes with globally unique uint32 ids (1, 2, ... in order of first
appearance), and a :class:`LinkTable`: per object and plane its area, centroid and
predicted IoU (if given), first/last plane and parent; as napari Tracks layer data
(:meth:`LinkTable.tracks_data`, :meth:`LinkTable.graph`) and as CSV
(:meth:`LinkTable.write_csv`).

Example::

    linker = Linker("t", min_iou=0.5)
    for frame, scores in frames:            # (Y, X) labels, {id: predicted IoU}
        for plane in linker.push(frame, scores):
            write(plane)
    for plane in linker.flush():            # through z: the last plane
        write(plane)
    table = linker.finish()
    viewer.add_tracks(table.tracks_data(), graph=table.graph())
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .accuracy import track_accuracy
from .linker import AXES, Linker, check_labels, id_mapping
from .table import LinkTable

__all__ = [
    "AXES",
    "RULE_VERSION",
    "LinkTable",
    "Linker",
    "check_labels",
    "id_mapping",
    "link_stack",
    "min_planes_lut",
    "track_accuracy",
]

#: Version of the linking rules (matching, containment, divisions, gap closing, id
#: order). Raised whenever a change to this package can change which ids it gives;
#: ``mobilesam-everything --link`` records it and keys its outputs on it, so outputs
#: linked under older rules are redone.
RULE_VERSION = 3


def min_planes_lut(seen: np.ndarray, min_planes: int) -> np.ndarray:
    """The ids kept by a minimum number of planes (``--link-min-planes``).

    Parameters
    ----------
    seen : (n + 1,) array of int
        ``seen[i]``: the planes linked object ``i`` is in (``seen[0]``, background,
        is ignored).
    min_planes : int
        Objects in fewer planes are left out.

    Returns
    -------
    (n + 1,) ndarray of uint32
        ``lut[i]``: 0 for background and the objects left out, 1..K for the others
        in their order.
    """
    seen = np.asarray(seen)
    kept = np.flatnonzero(seen >= min_planes)
    kept = kept[kept > 0]
    lut = np.zeros(len(seen), dtype=np.uint32)
    lut[kept] = np.arange(1, len(kept) + 1, dtype=np.uint32)
    return lut


def link_stack(
    labels,
    axis: str = "z",
    *,
    scores: Sequence | None = None,
    out=None,
    min_iou: float = 0.5,
    min_cover_z: float | None = 0.8,
    min_cover_t: float | None = 0.5,
    max_gap: int = 1,
    divisions: bool | None = None,
    division_share: float = 0.2,
) -> tuple[np.ndarray, LinkTable]:
    """Link a whole stack of per-plane label images, reading and writing one plane at a time.

    Parameters
    ----------
    labels : array-like of integers, shape (P, Y, X), or (T, Z, Y, X) for ``"zt"``
        Per-plane label images (0 = background, ids per plane). Anything indexable
        by plane (numpy, dask, zarr, ``tifffile.memmap``); each plane is read once.
    axis : {"z", "t", "zt"}
        See :class:`Linker`.
    scores : sequence, optional
        Per plane a dict ``{id: predicted IoU}`` (or None); for ``"zt"`` per time
        point a sequence over z of such dicts.
    out : array-like, optional
        Where to write the relabelled planes (same shape as ``labels``, e.g. a zarr
        array or a memmap, to stay out of memory). Default: a new uint32 array.
    min_iou, min_cover_z, min_cover_t, max_gap, divisions, division_share
        See :class:`Linker`.

    Returns
    -------
    relabelled : ``out``, or ndarray of uint32 with the shape of ``labels``
    table : LinkTable
    """
    shape = tuple(getattr(labels, "shape", ()))
    want = 4 if axis == "zt" else 3
    if axis in AXES and len(shape) != want:
        what = "(T, Z, Y, X)" if axis == "zt" else "(planes, Y, X)"
        raise ValueError(f"labels must be a {what} stack for axis={axis!r}, got shape {shape}")
    linker = Linker(axis, min_iou=min_iou, min_cover_z=min_cover_z, min_cover_t=min_cover_t,
                    max_gap=max_gap, divisions=divisions, division_share=division_share,
                    n_z=shape[1] if axis == "zt" else None)  # fmt: skip
    if out is None:
        out = np.zeros(shape, dtype=np.uint32)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but labels has {shape}")
    if scores is not None and len(scores) != shape[0]:
        raise ValueError(f"scores has {len(scores)} entries but labels has {shape[0]} planes")
    if axis != "zt":
        done = 0
        for i in range(shape[0]):
            for plane in linker.push(labels[i], None if scores is None else scores[i]):
                out[done], done = plane, done + 1
        for plane in linker.flush():
            out[done], done = plane, done + 1
        return out, linker.finish()
    for t in range(shape[0]):
        zs = None if scores is None else scores[t]
        if zs is not None and len(zs) != shape[1]:
            raise ValueError(f"scores[{t}] has {len(zs)} entries but a time point has "
                             f"{shape[1]} planes")  # fmt: skip
        done: list[np.ndarray] = []
        for z in range(shape[1]):
            done = linker.push(labels[t, z], None if zs is None else zs[z])
        for z, plane in enumerate(done):
            out[t, z] = plane
    return out, linker.finish()
