"""MobileSAM: segment everything on the shown plane or on every plane of a stack."""

from __future__ import annotations

import threading

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from ..chunked_labels import label_plane
from ..everything import MaskGenerator
from ..interactive import add_objects, drop_covered, predictor_lock
from ..normalize import to_rgb_uint8
from . import _features
from ._chunked import add_labels, unwritable, writable
from ._common import LayerCombo, Runner, current_plane, guarded, outside_message
from ._edits import keep_edits, watch
from ._everything_params import GeneratorParams
from ._extend import extend_work, paint_added
from ._layers import LayerConflict, image_shape, labels_layer
from ._link import LinkControls, StackLink, drop_short, show_tracks, tracks_layer_of
from ._model import ModelPicker
from ._reader_preference import prefer_plugin_reader
from ._scroll import scrolled

LINKED = "mobilesam_linked"  # result layer metadata: the link axis of the run that made it


class EverythingWidget(QWidget):
    """Dock widget: segment everything into the image's ``<image> everything`` Labels layer,
    in the background, and commit its objects to the image's ``<image>_labels``.

    With *link* (a stack), the planes are linked as they are segmented: one id per 3D
    object through z, one track per cell through t (and an ``<image> tracks`` layer),
    as ``mobilesam-everything --link`` does (see :mod:`._link`).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        prefer_plugin_reader()  # *_labels.tif opens without "Choose reader"
        self.result_layer = None
        self._cancelled = False
        self._done_planes = 0
        self._stop: threading.Event | None = None  # set by Cancel during a linked run
        self._added: list[tuple] | None = None  # sections added by *extend objects*

        layout = scrolled(self)  # a crowded dock scrolls instead of clipping
        form = QFormLayout()
        self.image_combo = LayerCombo(napari_viewer, Image)
        form.addRow("image", self.image_combo)
        self.scope = QComboBox()
        self.scope.addItems(["shown plane", "whole stack"])
        form.addRow("segment", self.scope)
        layout.addLayout(form)
        self.link = LinkControls()
        layout.addWidget(self.link)
        self.link.axis.currentIndexChanged.connect(self._link_changed)
        self.image_combo.currentIndexChanged.connect(self._image_changed)
        self._image_changed()
        self.model = ModelPicker(napari_viewer)
        layout.addWidget(self.model)

        self.params = GeneratorParams()
        for name in GeneratorParams.NAMES:  # (each spin box also as an attribute here)
            setattr(self, name, getattr(self.params, name))
        layout.addWidget(self.params)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.commit_button = QPushButton("Commit to labels")
        self.commit_button.setToolTip(
            "add the objects of the shown plane (whole stack: of every plane) to the "
            "image's <image>_labels layer with new ids, only into unlabeled pixels (a linked "
            "result: one new id per 3D object or track)"
        )
        for button, func in ((self.run_button, self.run), (self.cancel_button, self.cancel),
                             (self.commit_button, self.commit_to_labels)):  # fmt: skip
            handler = guarded(func)
            button.clicked.connect(lambda _checked=False, f=handler: f())
            buttons.addWidget(button)
        layout.addLayout(buttons)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        layout.addWidget(self.status)
        layout.addWidget(self.progress)
        layout.addStretch()
        self.runner = Runner(self._busy, self.status)

    def parameters(self) -> dict:
        """The MaskGenerator keyword arguments chosen in the widget."""
        return self.params.parameters()

    def _plane_or_message(self, layer) -> tuple[int, ...] | None:
        plane = current_plane(self.viewer, layer)
        if plane is None:
            message = outside_message(self.viewer, layer)
            show_info(f"MobileSAM: {message}")
            self.status.setText(message)
        return plane

    def result_layer_of(self, layer):
        """The image's ``<image> everything`` Labels layer, or None before the first run.

        Raises
        ------
        LayerConflict
            When a layer of that name is not a Labels layer of the image's shape.
        """
        name, shape = f"{layer.name} everything", image_shape(layer)
        if name not in self.viewer.layers:
            return None
        result = self.viewer.layers[name]
        if not isinstance(result, Labels) or tuple(result.data.shape) != shape:
            raise LayerConflict(
                f"the layer {name!r} does not fit image {layer.name!r} (shape {shape}); "
                "rename or move it, then run again"
            )
        return result

    def run(self) -> None:
        """Segment the shown plane or every plane into the image's ``<image> everything``
        layer: each plane's result replaces that plane only; other planes keep theirs."""
        layer = self.image_combo.layer()
        if layer is None:
            show_info("MobileSAM: add an image layer first")
            return
        self.result_layer_of(layer)  # a name conflict stops here, before any work
        data, rgb = layer.data, bool(layer.rgb)
        shape = image_shape(layer)
        lead = shape[:-2]
        axis = self.link.choice() if lead else ""
        if axis:
            if axis != "z":
                tracks_layer_of(self.viewer, layer)  # a conflict stops here too
            linker = StackLink(axis, lead, self.link.min_iou.value(), self.link.max_gap.value(),
                               self.link.min_planes.value() if axis == "z" else 1)  # fmt: skip
        if axis or (self.scope.currentIndex() == 1 and lead):
            planes = [tuple(int(i) for i in ix) for ix in np.ndindex(*lead)]
        else:
            plane = self._plane_or_message(layer)
            if plane is None:
                return
            planes = [plane]
        limits = tuple(float(v) for v in layer.contrast_limits)
        params = self.parameters()
        model = self.model
        kept = self._keep_edits(layer, None if axis else planes)

        ran_on: list[str] = []  # what ran, as chosen (shown when done)
        counts: list[int] = []  # objects per plane done
        done_planes: list[tuple[int, ...]] = []  # linked planes written to the layer
        infos: dict = {}  # each plane's scores, for the object table
        stop = self._stop = threading.Event() if axis else None

        def work():
            gen = MaskGenerator(model.predictor(), **params)
            ran_on.append(gen.describe())
            for i, index in enumerate(planes):
                plane = np.asarray(data[index])
                rgb_plane = to_rgb_uint8(
                    plane, contrast_limits=None if rgb else limits,
                    channel_axis=-1 if rgb else None,
                )  # fmt: skip
                # the predictor is shared with the prompt widget: hold its image for
                # the plane (a prompt gets its turn between planes)
                with predictor_lock(gen.predictor):
                    labels, infos[index] = gen.generate_labels(rgb_plane, return_info=True)
                if not axis:
                    yield i + 1, len(planes), index, labels
                    continue
                # linked in this worker, plane by plane; Cancel ends the run here (not
                # at the yield) so that the planes done are linked and the table made
                yield i + 1, len(planes), linker.push(index, labels, infos.pop(index))
                if stop.is_set():
                    break
            if axis:
                yield len(planes), len(planes), linker.finish()
                return linker.table

        def got(value) -> None:
            """One plane's result, written at once: Cancel keeps the planes done."""
            if axis:
                return got_linked(*value)
            n_done, total, index, labels = value
            self._progressed((n_done, total))
            if layer not in self.viewer.layers:
                return
            try:
                result = self.result_layer_of(layer)
            except LayerConflict as exc:
                show_info(f"MobileSAM: {exc}")
                return
            if result is None:  # chunked on disk for a large stack
                result = add_labels(self.viewer, shape, name=f"{layer.name} everything")
            watch(result)
            result.data[index] = labels
            result.metadata.pop(LINKED, None)  # per-plane ids again
            _features.record_plane(result, index, infos.pop(index))
            result.refresh()
            self.result_layer = result
            counts.append(int(labels.max()))
            self._done_planes = len(counts)

        def got_linked(n_done, total, linked) -> None:
            """Planes whose linked ids are final (a ``zt`` time point's after its last)."""
            self._progressed((n_done, total), f"; {counted(linker.max_id, what)} so far")
            if layer not in self.viewer.layers or not linked:
                return
            try:
                result = self._linked_result(layer, shape, not counts, axis)
            except LayerConflict as exc:
                show_info(f"MobileSAM: {exc}")
                return
            watch(result)
            for index, plane, ids, iou, stability in linked:
                done_planes.append(index)
                result.data[index] = plane
                _features.record(result, index, ids, iou, stability, replace_plane=True)
                counts.append(len(ids))
            result.refresh()
            self.result_layer = result
            self._done_planes = len(counts)

        def done(table) -> None:
            if axis:
                return done_linked(table)
            self.status.setText(
                f"{counted(sum(counts), 'objects')} in {counted(len(planes), 'planes')}; "
                f"{', '.join(ran_on)}{kept_note}"
            )

        def done_linked(table) -> None:
            n_short, lut = linker.short_objects()
            n_shown = linker.max_id - n_short
            if lut is not None and layer in self.viewer.layers and self.result_layer is not None:
                drop_short(self.result_layer, done_planes, lut)
            text = f"{counted(n_shown, what)} in {counted(len(counts), 'planes')}"
            if n_short:
                text += (f" ({n_short} seen in fewer than {linker.min_planes} planes "
                         "left out)")  # fmt: skip
            if axis != "z" and table is not None and layer in self.viewer.layers:
                text += f" ({len(set(table.parents.values()))} division(s))"
                try:
                    show_tracks(self.viewer, layer, table, like=self.result_layer)
                except LayerConflict as exc:
                    show_info(f"MobileSAM: {exc}")
                    text += f"; no tracks layer: {exc}"
            text = f"{text}; {', '.join(ran_on)}{kept_note}"
            self.status.setText(text)
            extend = axis in ("z", "zt") and self.link.extend.isChecked()
            if extend and not self._cancelled and layer in self.viewer.layers:
                self._extend(layer, self.result_layer, lead, limits, model, text)

        kept_note = f"; your edits are kept in layer {kept!r}" if kept else ""
        what = {"z": "3D objects", "t": "tracks", "zt": "tracks"}.get(axis, "")
        self.progress.setRange(0, len(planes))
        self.progress.setValue(0)
        self._cancelled, self._done_planes, self._added = False, 0, None
        self.runner.submit(work, done, f"segmenting {counted(len(planes), 'planes')}…",
                           yielded=got)  # fmt: skip

    def _extend(self, layer, result, lead, limits, model, text: str) -> None:
        """Prompt the linked 3D objects of ``result`` into the planes where they were
        missed (:mod:`._extend`), writing each plane that gains sections as it is done."""
        if result is None:
            return
        stop = self._stop = threading.Event()
        added: list[tuple] = []
        self._added = added
        data, rgb = layer.data, bool(layer.rgb)

        def work():
            yield from extend_work(model.predictor(), data, result.data, lead, rgb=rgb,
                                   contrast_limits=limits, stop=stop)  # fmt: skip

        def got(step) -> None:
            n_done, total, plane = step
            self.progress.setRange(0, total)
            self.progress.setValue(n_done)
            if plane is None or result not in self.viewer.layers:
                return
            index, labels, new = plane
            result.data[index] = paint_added(np.asarray(result.data[index]), labels, new)
            _features.record(result, index, [i for _, i, _, _ in new],
                             [s for *_, s in new], [np.nan] * len(new))  # fmt: skip
            result.refresh()
            added.extend(new)

        def done(_result) -> None:
            objects = len({i for _, i, _, _ in added})
            self.status.setText(f"{text}; {counted(len(added), 'sections')} added to "
                                f"{counted(objects, 'objects')} in planes where they were "
                                "missed")  # fmt: skip

        self.runner.submit(work, done,
                           "extending the 3D objects into planes where they were missed…",
                           yielded=got)  # fmt: skip

    def _keep_edits(self, layer, planes: list[tuple[int, ...]] | None) -> str | None:
        """Rename the image's result layer out of the run's way when the run would write
        over planes edited by hand (``planes``; None: every plane); returns its new name
        (see :mod:`._edits`)."""
        result = self.result_layer_of(layer)
        kept = keep_edits(self.viewer, result, planes) if result is not None else None
        if kept:
            self.result_layer = None
            new = f"{layer.name} everything"
            show_info(f"MobileSAM: your edits of {layer.name!r}'s results are kept in "
                      f"layer {kept!r}; this run writes a new {new!r}")  # fmt: skip
        return kept

    def _linked_result(self, layer, shape, fresh: bool, axis: str):
        """The result layer of a run linked along ``axis``; ``fresh``: its first planes, so
        the layer's earlier per-plane ids and scores are cleared (every plane is redone)."""
        result = self.result_layer_of(layer)
        if result is None:
            return add_labels(
                self.viewer, shape, name=f"{layer.name} everything", metadata={LINKED: axis}
            )
        if fresh:
            result.metadata[LINKED] = axis
            result.data[...] = 0
            result.features = {}
        return result

    def commit_to_labels(self) -> list[int]:
        """Merge the everything objects of the shown plane (or of every plane, with
        *whole stack*) into the image's ``<image>_labels`` layer, which the prompt widget
        commits to: each object gets a fresh id and fills only unlabeled pixels; an object
        less than half of whose pixels are unlabeled is skipped (per plane). A linked
        result committed whole keeps its linking: one new id per 3D object or track.

        Returns
        -------
        list of int
            The new ids (empty when nothing was merged).
        """
        layer = self.image_combo.layer()
        result = self.result_layer_of(layer) if layer is not None else None
        if result is None:
            show_info("MobileSAM: nothing to commit: press Run first")
            return []
        shape = image_shape(layer)
        if self.scope.currentIndex() == 0 and shape[:-2]:
            plane = self._plane_or_message(layer)
            if plane is None:
                return []
            planes = [plane]
        else:
            planes = [tuple(int(i) for i in ix) for ix in np.ndindex(*shape[:-2])]
        # (a whole stack: its largest id, which chunked labels keep a record of, not a read
        # of every plane before the loop below reads them)
        found = np.max(result.data) if len(planes) > 1 else np.max(result.data[planes[0]])
        if not found:
            where = f"plane {planes[0]}" if planes[0] else "the image"
            where = "any plane" if len(planes) > 1 else where
            show_info(f"MobileSAM: nothing to commit: no object was found on {where}")
            return []  # (no empty labels layer made either)
        target = labels_layer(self.viewer, layer)
        data = target.data
        if not writable(data):  # numpy, or chunked labels on disk
            show_info(f"MobileSAM: {unwritable(target.name)}")
            return []
        ids: list[int] = []
        skipped = 0  # objects mostly inside existing ones
        if result.metadata.get(LINKED) and len(planes) > 1:
            # linked objects: one new id per 3D object / track through all its planes
            start = int(data.max()) + 1
            ids = add_objects(data, result.data, start=start)  # chunked: plane by plane
            for index in planes:
                _features.carry(result, target, index, start)
        else:
            for index in planes:
                start = int(data.max()) + 1  # ids unique over the whole layer
                plane = label_plane(data, index)
                objects = np.asarray(result.data[index])
                # an object mostly inside one committed before (e.g. with a prompt) is skipped:
                # only its sliver would be added
                existing = np.asarray(data[index])
                objects, dropped = drop_covered(objects, existing, return_dropped=True)
                skipped += dropped
                ids += add_objects(plane, objects, start=start)
                _features.carry(result, target, index, start)  # the objects' scores
        target.refresh()
        note = f" ({skipped} mostly inside existing objects skipped)" if skipped else ""
        self.status.setText(f"{len(ids)} object(s) added to {target.name}{note}")
        return ids

    def cancel(self) -> None:
        """Stop after the plane being segmented; the planes done stay in the result."""
        self._cancelled = True
        if self._stop is not None and self.runner.busy:
            self._stop.set()  # a linked run: it links the planes done and ends
        else:
            self.runner.cancel()
        self.cancel_button.setEnabled(False)
        if self.runner.busy:
            self.status.setText("cancelling: finishing the plane being segmented…")

    def _progressed(self, value, more: str = "") -> None:
        if self._cancelled:
            return
        done, total = value
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.status.setText(f"plane {done} of {total}{more}")

    def _image_changed(self, *_args) -> None:
        layer = self.image_combo.layer()
        self.link.fit(len(image_shape(layer)) - 2 if layer is not None else 0)

    def _link_changed(self, *_args) -> None:
        """Linking works on the whole stack: the scope follows it."""
        linked = bool(self.link.choice())
        if linked:
            self.scope.setCurrentIndex(1)
        self.scope.setEnabled(not linked)
        self.scope.setToolTip("linking segments the whole stack" if linked else "")

    def _busy(self, busy: bool, message: str) -> None:
        self.run_button.setEnabled(not busy)
        self.commit_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy and not self._cancelled)
        if not busy and self._cancelled:  # only now has the work stopped
            linked = ", linked," if self._stop is not None else ""
            text = f"cancelled; {done_text(self._done_planes)} kept{linked}"
            if self._added is not None:
                text += f" and the {counted(len(self._added), 'sections')} added"
            self.status.setText(text)


def done_text(n: int) -> str:
    """ "the 2 planes done are" / "the 1 plane done is" (the cancelled status)."""
    return f"the {counted(n, 'planes')} done {'is' if n == 1 else 'are'}"


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun`` (given in the plural, ending in "s"): "1 track", "2 tracks"."""
    return f"{n} {noun[:-1] if n == 1 else noun}"
