"""Segment-everything over a stack, linked: 3D objects through z, tracks through t.

The everything widget's *link* option gives an object one id through the planes of
a stack instead of ids restarting at 1 in every plane. The widget's worker pushes
each plane it segments, in order, into a :class:`StackLink` (a
:class:`napari_mobilesam.linking.Linker` per stack), and writes the planes it gives
back into the image's ``<image> everything`` layer; for ``t`` and ``zt`` the
:class:`~napari_mobilesam.linking.LinkTable` becomes the ``<image> tracks`` layer
(napari Tracks, with the division graph). The options and their names are those of
``mobilesam-everything --link z|t|zt --link-iou X --link-gap N`` (``docs/batch.md``),
with the same linker settings, so the widget and the batch tool give the same ids.

Which axes are linked: the last plane axis (``z``, ``t``) or the last two (``zt``:
T then Z) of the image's plane axes (the axes before Y, X). Any axis before them
indexes independent stacks (``z`` on a TZYX image: each time point's z-stack), each
linked on its own with ids that continue from one stack to the next, as the batch
tool does.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Tracks
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QSpinBox,
    QWidget,
)

from ..linking import Linker, LinkTable, id_mapping, min_planes_lut
from ._layers import LayerConflict

#: (axis, text in the menu); the axis names are ``--link``'s
CHOICES = {
    "": "none: ids per plane",
    "z": "z: 3D objects",
    "t": "t: tracks (divisions)",
    "zt": "zt: 3D objects tracked through t",
}
TRACKS_OF = "mobilesam_tracks_of"  # tracks layer metadata key: the image's unique_id


def link_choices(n_plane_axes: int) -> list[str]:
    """The link axes that fit an image with ``n_plane_axes`` axes before (Y, X).

    2D: none. 3D: ``z`` or ``t`` (the user says what the plane axis is). 4D (T, Z):
    ``z`` (each time point's z-stack on its own) or ``zt``. More axes: ``z``, the
    leading ones indexing independent stacks.
    """
    if n_plane_axes == 0:
        return [""]
    if n_plane_axes == 1:
        return ["", "z", "t"]
    if n_plane_axes == 2:
        return ["", "z", "zt"]
    return ["", "z"]


class LinkControls(QWidget):
    """The link axis, ``--link-iou``, ``--link-gap``, ``--link-min-planes`` and
    ``--link-extend`` of the everything widget."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        self.axis = QComboBox()
        self.min_iou = QDoubleSpinBox()
        self.min_iou.setRange(0.01, 1.0)
        self.min_iou.setSingleStep(0.05)
        self.min_iou.setValue(0.5)
        self.min_iou.setToolTip("objects of neighbouring planes are one object when their "
                                "IoU is at least this (--link-iou)")  # fmt: skip
        self.max_gap = QSpinBox()
        self.max_gap.setRange(0, 100)
        self.max_gap.setValue(1)
        self.max_gap.setToolTip("an object missed in up to this many planes keeps its id "
                                "(--link-gap)")  # fmt: skip
        self.min_planes = QSpinBox()
        self.min_planes.setRange(1, 10_000)
        self.min_planes.setValue(1)
        self.min_planes.setToolTip("z: when the run ends, leave out 3D objects seen in fewer "
                                   "planes than this (fragments, out-of-focus light); 1 keeps "
                                   "all (--link-min-planes)")  # fmt: skip
        self.extend = QCheckBox("into planes where missed")
        self.extend.setToolTip("z, zt: when linking ends, prompt each 3D object, with its "
                               "box, into the planes next to it where segment-everything "
                               "missed it (its faint end sections, a missed middle plane); "
                               "runs the model again on up to twice the planes "
                               "(--link-extend)")  # fmt: skip
        form.addRow("link", self.axis)
        form.addRow("link IoU ≥", self.min_iou)
        form.addRow("link gap (planes)", self.max_gap)
        form.addRow("link min planes", self.min_planes)
        form.addRow("extend objects", self.extend)
        self.axis.currentIndexChanged.connect(self._enable)
        self.fit(0)

    def fit(self, n_plane_axes: int) -> None:
        """Offer the link axes that fit an image with this many plane axes; keep the
        current choice where it still fits."""
        keep = self.choice()
        axes = link_choices(n_plane_axes)
        self.axis.blockSignals(True)
        self.axis.clear()
        for axis in axes:
            self.axis.addItem(CHOICES[axis], axis)
        self.axis.setCurrentIndex(axes.index(keep) if keep in axes else 0)
        self.axis.blockSignals(False)
        self.axis.setEnabled(len(axes) > 1)
        if n_plane_axes == 0:
            tip = "linking needs a stack: this image is 2D (one plane)"
        elif n_plane_axes == 1:
            tip = ("link the stack's objects through its first axis: z if it is Z (one id "
                   "per 3D object), t if it is T (one track per cell, divisions recorded, "
                   "and a '<image> tracks' layer)")  # fmt: skip
        else:
            tip = ("axes (..., T, Z, Y, X): z links each z-stack on its own (one id per 3D "
                   "object); zt tracks the 3D objects through T (and a '<image> tracks' "
                   "layer)")  # fmt: skip
        self.axis.setToolTip(tip)
        self._enable()
        self.axis.currentIndexChanged.emit(self.axis.currentIndex())

    def choice(self) -> str:
        """The chosen link axis: ``"z"``, ``"t"``, ``"zt"``, or ``""`` (no linking)."""
        return self.axis.currentData() or ""

    def _enable(self, *_args) -> None:
        on = bool(self.choice())
        self.min_iou.setEnabled(on)
        self.max_gap.setEnabled(on)
        self.min_planes.setEnabled(self.choice() == "z")
        self.extend.setEnabled(self.choice() in ("z", "zt"))


class StackLink:
    """Link the planes of a stack as they are segmented (in C order of the plane axes).

    Parameters
    ----------
    axis : {"z", "t", "zt"}
        What to link: the last plane axis, or for ``"zt"`` the last two (T, Z).
    plane_shape : tuple of int
        The image's plane axes (the shape without Y, X).
    min_iou, max_gap
        As ``--link-iou``, ``--link-gap`` (:class:`~napari_mobilesam.linking.Linker`).
    min_planes : int
        ``"z"`` only, as ``--link-min-planes``: :meth:`short_objects` says which 3D
        objects were seen in fewer planes and how the others are renumbered.

    Attributes
    ----------
    table : LinkTable or None
        After :meth:`finish`: the last stack's table (the only one for ``t``, ``zt``).
    max_id : int
        Largest linked id given so far.
    """

    def __init__(self, axis: str, plane_shape: tuple[int, ...], min_iou: float,
                 max_gap: int, min_planes: int = 1) -> None:  # fmt: skip
        assert axis in link_choices(len(plane_shape)) and axis, (axis, plane_shape)
        if min_planes > 1 and axis != "z":
            raise ValueError(f"min_planes applies to 3D objects (z), not to {axis!r}")
        self.min_planes = int(min_planes)
        self._seen: dict[int, int] = {}  # linked id -> planes it is in
        self.axis, self.plane_shape = axis, tuple(plane_shape)
        self.n_linked = 2 if axis == "zt" else 1
        self.n_z = self.plane_shape[-1] if axis == "zt" else None
        self.min_iou, self.max_gap = float(min_iou), int(max_gap)
        self.table: LinkTable | None = None
        self.max_id = 0
        self._group: tuple[int, ...] | None = None
        self._linker: Linker | None = None
        self._offset = 0
        self._pending: list = []  # (index, labels, info) pushed, not yet given back

    def push(self, index: tuple[int, ...], labels: np.ndarray, info: dict) -> list[tuple]:
        """Link plane ``index``'s labels (ids 1..N; ``info``: generate_labels' scores).

        Returns
        -------
        list of (index, linked, ids, predicted_iou, stability_score)
            The planes whose linked ids are now final, in order (through z the
            previous plane, and the previous stack's last plane when a stack starts;
            for ``"zt"`` a time point's planes after its last one): the (Y, X) uint32
            plane with linked ids, and the linked ids of its objects with their scores.
        """
        group = tuple(index[: -self.n_linked])
        done: list[tuple] = []
        if group != self._group:
            done = self._close()  # through z: the previous stack's last plane
            self._group = group
            self._linker = Linker(self.axis, min_iou=self.min_iou, max_gap=self.max_gap,
                                  n_z=self.n_z)  # fmt: skip
        iou = np.asarray(info["predicted_iou"], dtype=np.float64)
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(iou) + 1)[1:]) + 1
        scores = {int(k): float(iou[k - 1]) for k in present if k <= len(iou)}
        self._pending.append((index, labels, info))
        return done + self._given(self._linker.push(labels, scores))

    def finish(self) -> list[tuple]:
        """End the run (all planes, or fewer at Cancel). A ``zt`` time point cut short
        is linked with empty planes in place of those not segmented, as
        :func:`~napari_mobilesam.linking.link_stack` links a stack whose planes after
        the last one done are empty. Returns the planes this gives back (see :meth:`push`)."""
        return self._close()

    def _close(self) -> list[tuple]:
        if self._linker is None:
            return []
        out = self._given(self._linker.flush())  # through z: the last plane
        while self._pending:  # only for "zt": complete the time point with empty planes
            self._pending.append((None, None, None))
            shape = self._pending[0][1].shape
            out += self._given(self._linker.push(np.zeros(shape, np.uint32)))
        self.table = self._linker.finish()
        self._linker = None
        self._offset = self.max_id
        return out

    def _given(self, planes: list[np.ndarray]) -> list[tuple]:
        done, self._pending = self._pending[: len(planes)], self._pending[len(planes) :]
        out = []
        for (index, before, info), after in zip(done, planes, strict=True):
            if index is None:
                continue  # an empty stand-in plane
            after = np.where(after > 0, after + np.uint32(self._offset), 0).astype(np.uint32)
            mapping = id_mapping(before, after)
            own = np.array(sorted(mapping), dtype=np.int64)
            ids = [mapping[k] for k in own.tolist()]
            iou = np.asarray(info["predicted_iou"], dtype=np.float64)[own - 1]
            stab = np.asarray(info["stability_score"], dtype=np.float64)[own - 1]
            self.max_id = max(self.max_id, int(after.max()))
            for i in ids:
                self._seen[i] = self._seen.get(i, 0) + 1
            out.append((index, after, ids, iou, stab))
        return out

    def short_objects(self) -> tuple[int, np.ndarray | None]:
        """After :meth:`finish`: how many 3D objects were seen in fewer than
        ``min_planes`` planes, and the table ``lut[linked id] = id to show`` that
        removes them (0) and numbers the others 1..N in order, as
        ``mobilesam-everything --link-min-planes`` does; None when none is short."""
        if self.min_planes <= 1 or not self._seen:
            return 0, None
        seen = np.zeros(self.max_id + 1, dtype=np.int64)
        seen[list(self._seen)] = list(self._seen.values())
        lut = min_planes_lut(seen, self.min_planes)
        n_short = len(self._seen) - int(np.count_nonzero(lut))
        return (n_short, lut) if n_short else (0, None)


def drop_short(layer, planes: list[tuple[int, ...]], lut: np.ndarray) -> None:
    """Relabel a linked result layer's ``planes`` through :meth:`StackLink.short_objects`'
    ``lut`` (short 3D objects become background, the others 1..N) and its recorded
    scores with them; rows of other planes stay as they are."""
    from ..interactive.objects import record_scores, scores_from

    n = layer.ndim - 2
    done = set(planes)
    for index in planes:
        layer.data[index] = lut[np.asarray(layer.data[index])]
    kept: dict[tuple[int, ...], list[tuple[int, float, float]]] = {}
    for (plane, i), (iou, stab) in scores_from(layer.features, n).items():
        if plane not in done:
            new = i
        else:
            new = int(lut[i]) if i < len(lut) else 0
        if new:
            kept.setdefault(plane, []).append((new, iou, stab))
    features: dict = {}
    for plane, rows in kept.items():
        ids, iou, stab = zip(*rows, strict=True)
        features = record_scores(features, list(ids), list(iou), list(stab), plane=plane)
    layer.features = features
    layer.refresh()


def tracks_name(image_name: str) -> str:
    """The image's tracks layer: ``<image> tracks``."""
    return f"{image_name} tracks"


def tracks_layer_of(viewer, image):
    """The image's tracks layer from an earlier linked run, or None.

    Raises
    ------
    LayerConflict
        When a layer named ``<image> tracks`` exists but is not a Tracks layer this
        plugin made for this image (another layer, or another image's tracks).
    """
    name = tracks_name(image.name)
    if name not in viewer.layers:
        return None
    layer = viewer.layers[name]
    if not isinstance(layer, Tracks) or layer.metadata.get(TRACKS_OF) != image.unique_id:
        raise LayerConflict(
            f"the layer {name!r} is not the tracks of image {image.name!r} from an earlier "
            "run; rename or remove it, then run again"
        )
    return layer


def show_tracks(viewer, image, table: LinkTable, like=None):
    """Put ``table`` into the image's ``<image> tracks`` layer (replacing an earlier
    run's tracks of this image; added when there is none). ``like``: a layer whose
    scale and translate the tracks take (the labels they were linked from).

    Returns the layer, or None when the table has no rows (an earlier layer is kept).
    """
    layer = tracks_layer_of(viewer, image)
    data, graph = table.tracks_data(), table.graph()
    if len(data) == 0:
        return layer
    if layer is not None:
        layer.graph = {}  # the old graph may name tracks the new data lacks
        layer.data = data
        layer.graph = graph
        return layer
    kwargs = {} if like is None else {"scale": like.scale, "translate": like.translate}
    return viewer.add_tracks(data, graph=graph, name=tracks_name(image.name),
                             metadata={TRACKS_OF: image.unique_id}, **kwargs)  # fmt: skip
