"""The prompt widget on large images: tiles in the status line, precompute over tiles,
multiscale layers, and display updates of only the part of a plane that changed.

On a plane that the session tiles (:attr:`PromptSession.tiles`), the status line says
how many tiles there are, a click whose tile is not embedded yet says so while it runs
("embedding tile k of N…"), and *precompute* counts tiles. A multiscale image layer (a
pyramid, e.g. from OME-Zarr) is segmented on its full-resolution level, read a window at
a time; the prompt, preview and labels layers get the image's transform, so their data
coordinates are that level's pixels. A preview or a commit rewrites only its region of
the (H, W) plane and uploads only that region to the screen (a full refresh of an
8192 x 8192 labels layer takes about 0.3 s).
"""

from __future__ import annotations

import threading

import numpy as np
from qtpy.QtCore import QObject, Signal

from ..chunked_labels import ChunkedLabels, LabelPlane
from ..interactive.candidates import CandidateMasks

Region = tuple[int, int, int, int]  # (r0, c0, r1, c1) plane pixels, exclusive ends

__all__ = [
    "TileActions",
    "image_data",
    "layer_transform",
    "mask_extent",
    "missing_tiles",
    "prompt_tiles",
    "refresh_region",
    "step_region",
    "tiles_note",
    "undo_region",
    "update_preview",
]


# -- multiscale layers and transforms ----------------------------------------------------


def image_data(layer):
    """The array a session segments: the layer's data, or level 0 (full resolution) of a
    multiscale layer (a lazy array stays lazy)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def layer_transform(image, ndim: int) -> dict:
    """Keyword arguments that give a new ``ndim``-D layer the transform of the last
    ``ndim`` axes of ``image`` (scale, translate, rotation, shear, affine), so that the
    new layer's data coordinates are the image's pixels (level 0 of a multiscale image).

    Parameters
    ----------
    image : napari.layers.Image
    ndim : int
        2 for a plane layer (the preview), ``image.ndim`` for the others.
    """
    n = image.ndim
    out = {
        "scale": tuple(float(v) for v in image.scale[n - ndim :]),
        "translate": tuple(float(v) for v in image.translate[n - ndim :]),
        "rotate": np.asarray(image.rotate)[n - ndim :, n - ndim :],
        "affine": np.asarray(image.affine.affine_matrix)[n - ndim :, n - ndim :],
    }
    shear = np.asarray(image.shear)
    if ndim == n:
        out["shear"] = shear
    elif ndim == 2 and n >= 2:
        out["shear"] = shear[-1:]  # the (row, col) entry comes last
    return out


# -- tiles --------------------------------------------------------------------------------


def tiles_note(session) -> str:
    """The status line for a tiled session ("" when it is not tiled)."""
    grid = getattr(session, "tiles", None)
    if grid is None:
        return ""
    return (
        f"tiled: {len(grid)} tiles of {grid.tile_size} px; a tile is embedded at your "
        "first click in it"
    )


def prompt_tiles(session, points, box) -> tuple[list[int], bool]:
    """The tiles that answer a prompt on a tiled session.

    Parameters
    ----------
    session : PromptSession
    points : (N, 2) array or None
        (row, col).
    box : (4,) array or None
        (r0, c0, r1, c1).

    Returns
    -------
    tiles : list of int
        The one tile that holds the prompt, or every tile the prompt crosses (its mask is
        stitched); [] when the session is not tiled.
    single : bool
        Whether one tile answers (the masks are zero outside its window).
    """
    grid = getattr(session, "tiles", None)
    if grid is None:
        return [], False
    try:
        tile = session.tile_for(points, box)
    except (TypeError, ValueError):  # the prediction says what is wrong, in the worker
        return [], False
    if tile is not None:
        return [tile], True
    pts = np.asarray(points, float).reshape(-1, 2) if points is not None else np.zeros((0, 2))
    corners = [np.asarray(box, float).reshape(2, 2)] if box is not None else []
    lo, hi = np.concatenate([pts, *corners]).min(axis=0), np.concatenate([pts, *corners]).max(0)
    needed = []
    for t in grid.crossing((lo[0], lo[1], hi[0], hi[1])):
        r0, c0, r1, c1 = grid.window(t)  # a tile answers for what lies inside it
        inside = ((pts[:, 0] >= r0) & (pts[:, 0] < r1) & (pts[:, 1] >= c0) & (pts[:, 1] < c1)).any()
        if box is not None:
            (br0, bc0), (br1, bc1) = np.sort(corners[0], axis=0)
            inside = inside or (br0 < r1 and br1 >= r0 and bc0 < c1 and bc1 >= c0)
        if inside:
            needed.append(t)
    return needed, False


def missing_tiles(session, plane, tiles: list[int], known: set) -> list[int]:
    """Of ``tiles`` of ``plane``, those not embedded yet (reads the tiles' pixels when the
    session keys its cache by content: call it in a worker). ``known`` holds
    (plane, tile) pairs known to be embedded; the ones found are added."""
    out = []
    for t in tiles:
        if (plane, t) in known:
            continue
        if session.is_tile_cached(plane, t):
            known.add((plane, t))
        else:
            out.append(t)
    return out


def embedding_message(missing: list[int], n_tiles: int) -> str:
    """The status while a click waits for its tiles' embeddings."""
    if len(missing) == 1:
        return f"embedding tile {missing[0] + 1} of {n_tiles}…"
    names = ", ".join(str(t + 1) for t in missing)
    return f"embedding tiles {names} of {n_tiles} (the prompt crosses them)…"


# -- regions of a plane -------------------------------------------------------------------


def mask_extent(masks, window: Region | None = None) -> Region | None:
    """The smallest region holding every set pixel of ``masks``.

    Parameters
    ----------
    masks : (K, H, W) or (H, W) bool array
    window : (r0, c0, r1, c1), optional
        Where the masks can be set (a tile's window): only that part is read.

    Returns
    -------
    (r0, c0, r1, c1) or None
        None when no pixel is set. For :class:`CandidateMasks` a region that holds
        them, found without upsampling any (:meth:`CandidateMasks.bounds`).
    """
    if isinstance(masks, CandidateMasks):
        bounds = masks.bounds()
        if bounds is None or window is None:
            return bounds
        region = (max(bounds[0], window[0]), max(bounds[1], window[1]),
                  min(bounds[2], window[2]), min(bounds[3], window[3]))  # fmt: skip
        return region if region[0] < region[2] and region[1] < region[3] else None
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    r0, c0 = 0, 0
    if window is not None:
        r0, c0, r1, c1 = window
        masks = masks[:, r0:r1, c0:c1]
    rows = np.flatnonzero(masks.any(axis=(0, 2)))
    if not len(rows):
        return None
    cols = np.flatnonzero(masks.any(axis=(0, 1)))
    return r0 + int(rows[0]), c0 + int(cols[0]), r0 + int(rows[-1]) + 1, c0 + int(cols[-1]) + 1


def union(a: Region | None, b: Region | None) -> Region | None:
    """The smallest region holding both (None for none)."""
    if a is None or b is None:
        return a if b is None else b
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _slices(region: Region) -> tuple[slice, slice]:
    return slice(region[0], region[2]), slice(region[1], region[3])


def refresh_region(layer, plane: tuple[int, ...], region: Region | None) -> None:
    """Show what changed in ``region`` of ``plane`` of a Labels layer, whose data (numpy,
    or chunked labels) was written there.

    When the layer shows that plane in 2D, only the region is converted and uploaded
    (napari's partial labels update, as its paint brush does); otherwise, or when this
    napari lacks it, the whole layer is refreshed.
    """
    if region is None:
        return
    try:
        if _partial(layer, tuple(plane), region):
            return
    except (AttributeError, TypeError, ValueError, IndexError):  # another napari
        pass
    layer.refresh()


def _partial(layer, plane: tuple[int, ...], region: Region) -> bool:
    """napari's partial update of a Labels layer for ``region`` of ``plane``; True also
    when nothing shown changed (another plane is shown, or the layer is hidden); False
    when it does not apply (then nothing was done)."""
    data = layer.data
    dense = isinstance(data, np.ndarray)
    if not (dense or isinstance(data, ChunkedLabels)) or layer.multiscale or not layer.visible:
        return not layer.visible  # an invisible layer is sliced again when shown
    ndim = data.ndim
    slice_input = layer._slice_input
    if slice_input.ndisplay != 2 or list(slice_input.displayed) != [ndim - 2, ndim - 1]:
        return False
    if not layer._slicing_state.loaded:
        return False
    shown = layer._get_pt_not_disp()
    if tuple(int(shown[d]) for d in range(ndim - 2)) != plane:
        return True  # the layer shows another plane: nothing on screen changed
    raw = layer._slice.image.raw
    if raw.shape != data.shape[-2:]:
        return False
    rows, cols = _slices(region)
    if not dense or not np.shares_memory(raw, data):  # napari's copy of the plane
        raw[rows, cols] = data[(*plane, rows, cols)]
    layer._slice.image.view[rows, cols] = layer._raw_to_displayed(raw, (rows, cols))
    full = (*(slice(i, i + 1) for i in plane), rows, cols)
    layer._accumulate_updated_slice(full)
    layer._partial_labels_refresh()
    return True


def undo_region(state, removed: list[int]):
    """The (plane, region) an undo that removed the ids ``removed`` changed, when they
    were committed together by the dock on one plane (``state.committed``); else None
    (the whole layer is redrawn). The ids are forgotten."""
    where = [state.committed.pop(i, None) for i in removed]
    if not where or any(w is None for w in where) or len({w[0] for w in where}) != 1:
        return None
    region = None
    for _plane, r in where:
        region = union(region, r)
    return None if region is None else (where[0][0], region)


def step_region(data, step) -> tuple[tuple[int, ...], Region] | None:
    """The (plane, region) of ``data`` (a Labels layer's array) that an undo step
    changes, from ``PromptSession.next_undo()`` (taken before the undo): ``(plane
    array, (rows, cols))``. None when the plane is not one of ``data``'s."""
    if step is None:
        return None
    target, (rows, cols) = step
    region = (rows.start, cols.start, rows.stop, cols.stop)
    if isinstance(target, LabelPlane):
        return (target.index, region) if target.labels is data else None
    if isinstance(target, np.ndarray) and isinstance(data, np.ndarray):
        plane = _plane_of_view(target, data)
        return None if plane is None else (plane, region)
    return None


def _plane_of_view(view: np.ndarray, data: np.ndarray) -> tuple[int, ...] | None:
    """The index of the plane of the C-contiguous stack ``data`` that ``view`` is (a
    numpy view ``data[index]``), found from their memory addresses; None otherwise."""
    if (
        view.shape != data.shape[-2:]
        or view.dtype != data.dtype
        or view.strides != data.strides[-2:]
        or not data.flags.c_contiguous
    ):
        return None
    offset = view.ctypes.data - data.ctypes.data
    size = view.size * view.itemsize
    n = int(np.prod(data.shape[:-2]))
    if offset < 0 or offset % size or offset // size >= n:
        return None
    return tuple(int(i) for i in np.unravel_index(offset // size, data.shape[:-2]))


def update_preview(state, extent: Region | None, paint) -> None:
    """Replace the preview of ``state`` (an :class:`~._layers.ImageSession`) by new
    values in ``extent``, clearing what the last preview showed (``state.shown``).

    Parameters
    ----------
    state : ImageSession
    extent : (r0, c0, r1, c1) or None
        Where the new preview has values (None: an empty preview).
    paint : callable(view, rows, cols)
        Writes the new values into ``view``, the uint8 preview at ``[rows, cols]``
        (zeros on entry).
    """
    preview = state.preview
    data = preview.data
    old = state.shown
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        fresh = np.zeros(data.shape, np.uint8)
        if extent is not None:
            rows, cols = _slices(extent)
            paint(fresh[rows, cols], rows, cols)
        preview.data = fresh
        state.shown = extent
        return
    if old is not None:
        data[_slices(old)] = 0
    if extent is not None:
        rows, cols = _slices(extent)
        paint(data[rows, cols], rows, cols)
    state.shown = extent
    refresh_region(preview, (), union(old, extent))


# -- precompute over tiles ----------------------------------------------------------------


class _Relay(QObject):
    """A worker's tile progress, delivered on the GUI thread."""

    step = Signal(object)


class TileActions:
    """Mixin of :class:`~._prompt.PromptWidget`: precompute over tiles.

    One background job per plane embeds its tiles; it stops after the tile that runs
    when a click's job waits (and is queued again after it), or when Cancel is pressed.
    The progress bar counts tiles. Uses the widget's ``runner``, ``progress``,
    ``status`` and :class:`~._stacks.StackActions`' precompute state.
    """

    #: set by Cancel: the tile precompute under way stops after its tile
    _tile_stop: threading.Event | None = None

    def _precompute_tiles(self, state) -> None:
        session = state.session
        n = len(session.tiles)
        planes = [tuple(int(v) for v in i) for i in np.ndindex(*session.plane_shape)]
        seen = {p: 0 for p in planes}  # tiles gone through per plane
        self._precompute = [0, n * len(planes)]
        self._precompute_unit = "tiles"
        self._cancel_note = ""
        stop = self._tile_stop = threading.Event()
        relay = _Relay(self)

        def stepped(step) -> None:
            plane, k = step
            seen[plane] = max(seen[plane], k)
            if self._precompute is not None and self._tile_stop is stop:
                self._precompute[0] = sum(seen.values())
                self._show_progress()

        relay.step.connect(stepped)
        runner = self.runner

        def submit(plane) -> None:
            where = f" of plane {plane}" if plane else ""
            runner.submit(
                lambda: session.precompute(
                    [plane], progress=lambda k, _n: relay.step.emit((plane, k)),
                    should_stop=lambda: stop.is_set() or runner.interactive_waiting,
                ),
                lambda _computed: finished(plane),
                f"precomputing the embeddings of {n} tiles{where}…",
                background=True,
            )  # fmt: skip

        def finished(plane) -> None:
            if seen[plane] >= n:
                state.ready.add(plane)
                state.tiles_known.update((plane, t) for t in range(n))
            elif not stop.is_set():
                submit(plane)  # a click went first: the rest after it

        for plane in planes:
            submit(plane)
        self._show_progress()
        self.cancel_button.setEnabled(True)
