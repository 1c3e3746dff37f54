"""``--link z|t|zt``: the per-plane labels of a stack linked into 3D objects or tracks.

Segment-everything labels every plane on its own (ids 1..N per plane). With
``--link``, when an input's planes are all done, :func:`link_planes` pushes its saved
planes through a :class:`napari_mobilesam.linking.Linker` in linking order, one at a
time (the linker keeps ``max_gap + 1`` planes, for ``zt`` volumes), and keeps per
plane only a lookup table *per-plane id -> linked id*. The outputs are then written
plane by plane as usual, each plane relabelled through its table, so the writing
order (C order of the input's plane axes) need not be the linking order and memory
does not grow with the stack (only the lookup tables do, by 4 bytes per object per
plane; for ``z`` the linker keeps no table of its own, :meth:`LinkOptions.linker`).

The linked axes (``Z``, ``T``, or ``T`` then ``Z``) are taken from the input's plane
axes; any other plane axis (e.g. ``T`` for ``--link z``) indexes independent stacks,
each linked on its own, with ids that continue from one to the next, so every id is
unique in the output.

Linking is a pure function of the saved per-plane labels, run in the process that
writes the outputs: a resumed run and a dask run give the same ids as a local,
uninterrupted one.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_mobilesam.atomic import atomic_path
from napari_mobilesam.linking import RULE_VERSION, Linker, LinkTable, id_mapping, min_planes_lut
from napari_mobilesam.linking.extend import THRESHOLDS as EXTEND_THRESHOLDS  # --link-extend's

__all__ = [
    "EXTEND_THRESHOLDS",
    "LINK_AXES",
    "LinkLayout",
    "LinkOptions",
    "Linked",
    "link_layout",
    "link_planes",
    "write_tracks_csv",
]

LINK_AXES = ("z", "t", "zt")
#: linker settings the command line does not expose (the library's defaults), recorded
MIN_COVER_Z, MIN_COVER_T, DIVISION_SHARE = 0.8, 0.5, 0.2
_LETTERS = {"z": "Z", "t": "T", "zt": "TZ"}
_EXAMPLE = {"z": "ZYX", "t": "TYX", "zt": "TZYX"}


@dataclass(frozen=True)
class LinkOptions:
    """What ``--link``, ``--link-iou`` and ``--link-gap`` ask for.

    Parameters
    ----------
    axis : {"z", "t", "zt"}
        ``"z"``: one id per 3D object through Z; ``"t"``: one track id per cell
        through T (2D frames), divisions recorded; ``"zt"``: 3D objects of a TZYX
        series tracked through T.
    min_iou : float in (0, 1]
        Objects of neighbouring planes are one object when their IoU is at least this.
    max_gap : int >= 0
        Planes an object may be missing from and keep its id.
    min_planes : int >= 1
        ``"z"`` only: a linked 3D object seen in fewer planes than this is left out of
        every output (its pixels become background, its rows go), and the ids of the
        others stay 1..N in order of first appearance. 1 (the default) keeps all.
        Sections the segmentation kept in one or two planes only (out-of-focus light,
        a fragment) are the commonest false 3D objects in stacks whose cells span
        many planes.
    extend : bool
        ``"z"`` and ``"zt"``: prompt each linked 3D object into the planes next to it
        where it has no section (``--link-extend``, :mod:`.extend`).

    Raises
    ------
    ValueError
        For an unknown axis, ``min_iou`` outside (0, 1], a negative or fractional
        ``max_gap``, ``min_planes`` below 1 or fractional, or above 1 for ``"t"`` or
        ``"zt"`` (the message names the flag).
    """

    axis: str
    min_iou: float = 0.5
    max_gap: int = 1
    min_planes: int = 1
    extend: bool = False

    def __post_init__(self) -> None:
        if self.axis not in LINK_AXES:
            raise ValueError(f"--link {self.axis!r}: choose z, t or zt")
        iou = self.min_iou
        if isinstance(iou, bool) or not isinstance(iou, numbers.Real) or not 0 < iou <= 1:
            raise ValueError(f"--link-iou {iou!r}: must lie in (0, 1]")
        gap = self.max_gap
        if isinstance(gap, bool) or not isinstance(gap, numbers.Integral) or gap < 0:
            raise ValueError(f"--link-gap {gap!r}: must be a whole number >= 0")
        n = self.min_planes
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"--link-min-planes {n!r}: must be a whole number >= 1")
        if n > 1 and self.axis != "z":
            raise ValueError(f"--link-min-planes {n}: applies to 3D objects (--link z), "
                             f"not to --link {self.axis}")  # fmt: skip
        if self.extend and self.axis == "t":
            raise ValueError("--link-extend: extends 3D objects through Z (--link z or zt), "
                             "not tracks of 2D frames (--link t)")  # fmt: skip

    @property
    def id_name(self) -> str:
        """Column of the linked id: ``"object_id"`` (z) or ``"track_id"`` (t, zt)."""
        return "object_id" if self.axis == "z" else "track_id"

    @property
    def writes_tracks(self) -> bool:
        """Whether ``<stem>_tracks.csv`` is written (t and zt)."""
        return self.axis != "z"

    def record(self) -> dict[str, Any]:
        """Every linking parameter with its value, and the linking rules' version."""
        return {
            "axis": self.axis,
            "min_iou": float(self.min_iou),
            "max_gap": int(self.max_gap),
            "min_planes": int(self.min_planes),
            "min_cover_z": MIN_COVER_Z,
            "min_cover_t": MIN_COVER_T,
            "divisions": self.axis != "z",
            "division_share": DIVISION_SHARE,
            "rules": f"napari_mobilesam.linking rules v{RULE_VERSION}",
            # (absent when off, so the keys of runs without it stay as they were)
            **({"extend": dict(EXTEND_THRESHOLDS)} if self.extend else {}),
        }

    def linker(self, n_z: int | None) -> Linker:
        """A new :class:`~napari_mobilesam.linking.Linker` with these settings (keeping
        its table only where the tracks CSV needs it: t and zt)."""
        return Linker(
            self.axis, min_iou=float(self.min_iou), max_gap=int(self.max_gap),
            min_cover_z=MIN_COVER_Z, min_cover_t=MIN_COVER_T, division_share=DIVISION_SHARE,
            n_z=n_z, keep_table=self.writes_tracks,
        )  # fmt: skip


@dataclass(frozen=True)
class LinkLayout:
    """Where the linked axes are among an input's plane axes.

    Attributes
    ----------
    plane_axes : str
        The input's plane axes, e.g. ``"TZ"``.
    plane_shape : tuple of int
        Their sizes.
    linked : tuple of int
        Positions in ``plane_axes`` of the linked axes, outer first (``T`` before ``Z``).
    groups : tuple of int
        Positions of the other plane axes: each combination is its own stack.
    """

    plane_axes: str
    plane_shape: tuple[int, ...]
    linked: tuple[int, ...]
    groups: tuple[int, ...]

    @property
    def group_axes(self) -> str:
        return "".join(self.plane_axes[i] for i in self.groups)

    def stacks(self) -> Iterator[tuple[tuple[int, ...], list[tuple[int, ...]]]]:
        """Per stack: its index along the group axes, and its plane indices (into
        ``plane_shape``) in linking order (``T`` outer, ``Z`` inner)."""
        shape = self.plane_shape
        for group in np.ndindex(*[shape[i] for i in self.groups]):
            order = []
            for pos in np.ndindex(*[shape[i] for i in self.linked]):
                index = [0] * len(shape)
                for dim, i in zip(self.groups, group, strict=True):
                    index[dim] = int(i)
                for dim, i in zip(self.linked, pos, strict=True):
                    index[dim] = int(i)
                order.append(tuple(index))
            yield tuple(int(g) for g in group), order


def link_layout(plane_axes: str, plane_shape: tuple[int, ...], link: LinkOptions) -> LinkLayout:
    """Check that an input can be linked as asked and say how.

    Parameters
    ----------
    plane_axes : str
        The input's plane axes (``""`` for a 2D image), e.g. ``"Z"``, ``"TZ"``.
    plane_shape : tuple of int
        Their sizes.
    link : LinkOptions

    Raises
    ------
    ValueError
        The input is a single 2D image, lacks an axis the linking needs, or (``t``)
        has a Z axis too. The message says what is wrong (the caller names the file).
    """
    want = _LETTERS[link.axis]
    if not plane_axes:
        raise ValueError(
            f"--link {link.axis}: is a single 2D image; linking needs a stack with "
            f"{' and '.join(want)} axes (e.g. {_EXAMPLE[link.axis]})"
        )
    missing = [a for a in want if a not in plane_axes]
    if missing:
        raise ValueError(
            f"--link {link.axis}: has no {' or '.join(missing)} axis (its plane axes are "
            f"{plane_axes!r}); name the axes with --axes if they are read wrongly "
            f"(e.g. --axes {_EXAMPLE[link.axis]})"
        )
    if link.axis == "t" and "Z" in plane_axes:
        raise ValueError(
            f"--link t: has a Z axis too (plane axes {plane_axes!r}); --link t tracks 2D "
            "frames: use --link zt to track 3D objects through time, or --link z"
        )
    linked = tuple(plane_axes.index(a) for a in want)
    groups = tuple(i for i in range(len(plane_axes)) if i not in linked)
    return LinkLayout(plane_axes, tuple(int(n) for n in plane_shape), linked, groups)


@dataclass
class Linked:
    """The result of linking one input.

    Attributes
    ----------
    luts : dict of plane index to ndarray of uint32
        Per plane (index into the plane axes) the table ``lut[per-plane id] = linked
        id`` (``lut[0] = 0``); relabel with :meth:`relabel`.
    n_objects : int
        Linked objects (z) or tracks (t, zt); ids are ``1 .. n_objects``.
    tables : list of (group index, LinkTable)
        For t and zt, each stack's table with output ids (empty for z).
    n_dropped : int
        Linked objects left out for being seen in fewer than ``min_planes`` planes
        (their per-plane ids map to 0).
    """

    luts: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)
    n_objects: int = 0
    tables: list[tuple[tuple[int, ...], LinkTable]] = field(default_factory=list)
    n_dropped: int = 0

    def relabel(self, index: tuple[int, ...], labels: np.ndarray) -> np.ndarray:
        """Plane ``index``'s (H, W) per-plane labels with linked ids (uint32, (H, W))."""
        return self.luts[index][labels]

    @property
    def n_divisions(self) -> int:
        return sum(len(t.parents) // 2 for _, t in self.tables)


def _scores(labels: np.ndarray, predicted_iou: np.ndarray) -> dict[int, float]:
    """``{id: predicted IoU}`` of the ids present in a plane (row ``k``: id ``k + 1``)."""
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(predicted_iou) + 1))
    return {int(i): float(predicted_iou[i - 1]) for i in present if 0 < i <= len(predicted_iou)}


def _lut(before: np.ndarray, after: np.ndarray, offset: int) -> np.ndarray:
    mapping = id_mapping(before, after)
    lut = np.zeros(int(before.max(initial=0)) + 1, dtype=np.uint32)
    if mapping:
        src = np.fromiter(mapping.keys(), dtype=np.int64, count=len(mapping))
        dst = np.fromiter(mapping.values(), dtype=np.int64, count=len(mapping))
        lut[src] = dst + offset
    return lut


def link_planes(
    layout: LinkLayout, link: LinkOptions, load: Callable[[tuple[int, ...]], dict]
) -> Linked:
    """Link an input's saved planes, one at a time.

    Parameters
    ----------
    layout : LinkLayout
        From :func:`link_layout`.
    link : LinkOptions
    load : callable
        ``load(index)`` -> the saved plane: ``labels`` (H, W) integer per-plane ids
        1..N, ``predicted_iou`` (N,) (row ``k``: id ``k + 1``). Called once per plane.

    Returns
    -------
    Linked
    """
    out = Linked()
    n_z = layout.plane_shape[layout.linked[1]] if link.axis == "zt" else None
    for group, order in layout.stacks():
        linker = link.linker(n_z)
        held: list[tuple[tuple[int, ...], np.ndarray]] = []
        for index in order:
            plane = load(index)
            labels = np.asarray(plane["labels"])
            held.append((index, labels))
            done = linker.push(labels, _scores(labels, plane["predicted_iou"]))
            held = _final(out, held, done)  # the planes whose ids are final: the oldest
        held = _final(out, held, linker.flush())
        table = linker.finish()
        n = linker.n_objects
        if link.min_planes > 1:
            kept = _drop_short(out.luts, order, out.n_objects, n, link.min_planes)
            out.n_dropped += n - kept
            n = kept
        if link.writes_tracks:
            out.tables.append((group, _shifted(table, out.n_objects)))
        out.n_objects += n
    return out


def _final(out: Linked, held: list, done: list[np.ndarray]) -> list:
    """Record the id lookup of the oldest ``len(done)`` held planes; the rest stay held."""
    for (ix, before), after in zip(held, done, strict=False):
        out.luts[ix] = _lut(before, after, out.n_objects)
    return held[len(done) :]


def _drop_short(
    luts: dict[tuple[int, ...], np.ndarray],
    order: list[tuple[int, ...]],
    offset: int,
    n: int,
    min_planes: int,
) -> int:
    """Map the objects of one stack (planes ``order``, linked ids ``offset + 1 ..
    offset + n``) seen in fewer than ``min_planes`` of its planes to 0 in ``luts``, in
    place, and renumber the others ``offset + 1 ..`` in their order; returns how many
    are kept."""
    seen = np.zeros(n + 1, dtype=np.int64)
    for index in order:
        ids = np.unique(luts[index])
        seen[ids[ids > 0] - offset] += 1
    lut = min_planes_lut(seen, min_planes)
    remap = np.zeros(offset + n + 1, dtype=np.uint32)
    remap[offset:] = np.where(lut > 0, lut + np.uint32(offset), 0)
    for index in order:
        luts[index] = remap[luts[index]]
    return int(np.count_nonzero(lut))


def _shifted(table: LinkTable, offset: int) -> LinkTable:
    """``table`` with every id (and parent) raised by ``offset``."""
    if not offset:
        return table
    parents = {c + offset: p + offset for c, p in table.parents.items()}
    return replace(table, id=(table.id + np.uint32(offset)).astype(np.uint32), parents=parents)


def write_tracks_csv(
    dest: Path, linked: Linked, layout: LinkLayout, tmp_dir: Path | None = None
) -> None:
    """Write the tracks of a t / zt linking as one CSV, atomically.

    Columns: one per other plane axis (lower-case letter, e.g. ``q``) when the input
    has any, then :meth:`LinkTable.to_csv`'s: ``track_id, t, [z,] y, x, area,
    predicted_iou, parent_track_id, first, last`` (napari Tracks layer data in the
    first columns; ``parent_track_id`` 0: no parent). One row per track per time point.
    """
    groups = [a.lower() for a in layout.group_axes]
    with atomic_path(Path(dest), tmp_dir) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for k, (group, table) in enumerate(linked.tables):
            head, _, body = table.to_csv().partition("\n")
            if k == 0:
                f.write(",".join([*groups, head]) + "\n")
            prefix = "".join(f"{g}," for g in group)
            for line in body.splitlines():
                f.write(prefix + line + "\n")
