"""Hand edits of a result layer, kept when the widget would write over them.

The everything widget writes its results into the image's ``<image> everything`` Labels
layer, and a new run writes over the planes it redoes. Users also paint, fill and erase
in that layer with napari's tools. Those edits are work: a rerun with other settings
must not wipe them. So:

- :func:`watch` records which planes of a result layer the user edits (napari's
  ``paint`` event, which painting, filling, erasing and polygons emit; the widget's own
  writes assign ``layer.data`` directly and emit none);
- :func:`keep_edits`, before a run, renames a layer whose edited planes the run would
  write over (``<image> everything (edited)``), so that the run starts a new result
  layer and the edited one stays in the viewer untouched.

Edited planes are kept in ``layer.metadata[EDITED]``: a set of plane indices (tuples of
the leading axes, ``()`` for a 2D image), or :data:`ALL` when an edit's planes could not
be told.
"""

from __future__ import annotations

import itertools
import weakref

import numpy as np

__all__ = ["ALL", "EDITED", "edited_planes", "keep_edits", "watch"]

#: layer metadata: the planes the user edited by hand
EDITED = "mobilesam_edited"
#: :data:`EDITED` when an edit's planes could not be told apart (every plane counts)
ALL = "all"

_watched: weakref.WeakSet = weakref.WeakSet()


def watch(layer) -> None:
    """Record the planes of Labels ``layer`` that the user edits (idempotent)."""
    if layer in _watched:
        return
    _watched.add(layer)
    ref = weakref.ref(layer)  # the connection must not keep a deleted layer alive
    layer.events.paint.connect(lambda event: _painted(ref(), event))


def _painted(layer, event) -> None:
    if layer is None:
        return
    shape = tuple(layer.data.shape)
    n_lead = max(len(shape) - 2, 0)
    planes = edit_planes(getattr(event, "value", None), shape[:n_lead])
    known = layer.metadata.get(EDITED, set())
    layer.metadata[EDITED] = ALL if planes is None or known == ALL else set(known) | planes


def edit_planes(atoms, lead: tuple[int, ...]) -> set[tuple[int, ...]] | None:
    """The planes that a ``paint`` event's atoms touch.

    Parameters
    ----------
    atoms : list
        The event's value: one entry per edit, whose first item is the index tuple
        (one entry per axis: an int, a slice or an array of indices).
    lead : tuple of int
        Sizes of the axes before the plane's (Y, X).

    Returns
    -------
    set of tuple of int, or None
        Plane indices (a superset: each leading axis' values combined), or None when
        the atoms cannot be read.
    """
    if not lead:
        return {()}
    try:
        planes: set[tuple[int, ...]] = set()
        for atom in atoms:
            index = atom[0][: len(lead)]
            per_axis = [_values(ix, size) for ix, size in zip(index, lead, strict=True)]
            planes.update(itertools.product(*per_axis))
        return planes if atoms else None
    except (TypeError, ValueError, IndexError):
        return None


def _values(ix, size: int) -> list[int]:
    if isinstance(ix, slice):
        return list(range(*ix.indices(size)))
    arr = np.asarray(ix)
    if arr.dtype == object:  # slices wrapped in an array
        return sorted({v for item in arr.ravel() for v in _values(item, size)})
    return [int(v) for v in np.unique(arr)]


def edited_planes(layer) -> set[tuple[int, ...]] | str:
    """The planes of ``layer`` edited by hand: a set of indices, or :data:`ALL`."""
    return layer.metadata.get(EDITED, set())


def keep_edits(viewer, layer, planes: list[tuple[int, ...]] | None) -> str | None:
    """Keep ``layer``'s hand edits out of a run's way.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    layer : napari.layers.Labels
        The result layer the run would write into.
    planes : list of tuple of int, or None
        The planes the run writes over (None: every plane, as a linked run clears the
        layer).

    Returns
    -------
    str or None
        The layer's new name when it held edits the run would write over (the layer is
        renamed to it, and the run starts a layer of its own), else None.
    """
    edited = edited_planes(layer)
    if not edited:
        return None
    if edited != ALL and planes is not None and not edited & set(planes):
        return None
    base = f"{layer.name} (edited)"
    name, n = base, 1
    while name in viewer.layers:
        n += 1
        name = f"{layer.name} (edited {n})"
    layer.name = name
    return name
