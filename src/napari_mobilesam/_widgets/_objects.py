"""MobileSAM: objects, a table of a Labels layer's objects to review, fix and export.

The table (:func:`~napari_mobilesam.interactive.objects.object_table`) is computed in a
thread worker after the layer changes (throttled), and written to the layer's
``features`` so napari's tooltips show it too. A click on a row shows its object; the
selected rows' objects can be deleted or merged (napari's undo of the Labels layer
reverts it), and the table exported as CSV.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from ..atomic import write_text_atomic
from ..interactive.objects import (
    apply_scores,
    edit_indices,
    empty_table,
    features_from,
    object_table,
    scores_from,
    table_csv,
)
from ..napari_io import write_labels
from . import _features
from ._chunked import release, snapshot, unwritable, writable
from ._common import LayerCombo, Runner, guarded
from ._layers import image_shape
from ._reader_preference import prefer_plugin_reader
from ._table_model import ObjectModel, same_table

THROTTLE_MS = 300  # a burst of edits (painting) gives one new table this long after it
MEASURING = "measuring the objects…"  # the status line while the table is computed


class ObjectsWidget(QWidget):
    """Dock widget: the objects of a Labels layer as a table (see the module docstring).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        prefer_plugin_reader()  # *_labels.tif opens without "Choose reader"
        self.layer: Labels | None = None
        self._fingerprint: tuple | None = None
        self._shown = None  # the layer whose table the dock shows
        self._generation = 0  # counts the layer's changes (a table of an older one is stale)
        # (plane, id) -> (predicted IoU, stability, area) of objects deleted or merged here:
        # napari's undo brings their pixels back, and these their scores
        self._edited: dict[tuple[tuple[int, ...], int], tuple[float, float, int]] = {}
        self._merged: dict[tuple[tuple[int, ...], int], int] = {}  # (plane, id) -> its area
        self._writing = False

        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.labels_combo = LayerCombo(napari_viewer, Labels)
        self.labels_combo.currentTextChanged.connect(self._layer_changed)
        form.addRow("labels", self.labels_combo)
        self.image_label = QLabel("")
        form.addRow("intensities", self.image_label)
        self.filter_box = QCheckBox("only predicted IoU below")
        self.filter_box.setToolTip("the doubtful predictions; hand-painted objects have none")
        self.iou_below = QDoubleSpinBox()
        self.iou_below.setRange(0.0, 1.0)
        self.iou_below.setSingleStep(0.05)
        self.iou_below.setValue(0.8)
        self.filter_box.toggled.connect(self._filter_changed)
        self.iou_below.valueChanged.connect(self._filter_changed)
        row = QHBoxLayout()
        row.addWidget(self.filter_box)
        row.addWidget(self.iou_below)
        form.addRow(row)
        layout.addLayout(form)

        self.model = ObjectModel()
        self.view = QTableView()
        self.view.setModel(self.model)
        self.view.setSortingEnabled(True)
        self.view.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.view.horizontalHeader().setDefaultSectionSize(72)
        self.view.horizontalHeader().setResizeContentsPrecision(200)  # rows measured
        self.view.horizontalHeader().setSortIndicatorShown(True)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.view.clicked.connect(lambda index: guarded(self.show_row)(index.row()))
        layout.addWidget(self.view)

        buttons = QHBoxLayout()
        self.delete_button = QPushButton("Delete")
        self.delete_button.setToolTip("remove the selected rows' objects (Ctrl-Z on the layer)")
        self.merge_button = QPushButton("Merge")
        self.merge_button.setToolTip("give the selected rows' objects the smallest of their ids")
        self.export_button = QPushButton("Export CSV…")
        self.save_button = QPushButton("Save labels…")
        self.save_button.setToolTip(
            "the labels as a compressed TIFF with its provenance (<image>_labels.tif), "
            "which opens as labels again"
        )
        for button, func in ((self.delete_button, self.delete_selected),
                             (self.merge_button, self.merge_selected),
                             (self.export_button, self._export_dialog),
                             (self.save_button, self._save_dialog)):  # fmt: skip
            handler = guarded(func)
            button.clicked.connect(lambda _checked=False, f=handler: f())
            buttons.addWidget(button)
        layout.addLayout(buttons)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.runner = Runner(status=self.status)
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(THROTTLE_MS)
        self.timer.timeout.connect(self.refresh)
        self._layer_changed()

    # -- following the layer -------------------------------------------------------------

    def _events(self, layer):
        events = layer.events
        return (events.data, events.paint, events.set_data, events.features)

    def _layer_changed(self, *_args) -> None:
        if self.layer is not None:
            for event in self._events(self.layer):
                event.disconnect(self._changed)
        self.layer = self.labels_combo.layer()
        self._fingerprint = None
        self._shown = None  # the layer whose table the dock shows
        self._edited, self._merged = {}, {}
        self.model.set_table(empty_table())
        if self.layer is None:
            self.image_label.setText("")
            self.status.setText("add or choose a Labels layer")
            return
        for event in self._events(self.layer):
            event.connect(self._changed)
        self._changed()

    def _changed(self, *_args) -> None:
        if self._writing:
            return
        self._generation += 1
        self.timer.start()  # restarts: one table after a burst of changes

    def image(self):
        """The image the objects' intensities are measured in: ``<name>`` for a layer
        ``<name>_labels`` or ``<name> everything``, else an image of the labels' shape."""
        layer = self.layer
        if layer is None:
            return None
        images = [im for im in self.viewer.layers if isinstance(im, Image)]
        for suffix in ("_labels", " everything"):
            name = layer.name.removesuffix(suffix)
            if name != layer.name and name in self.viewer.layers:
                image = self.viewer.layers[name]
                if image in images and image_shape(image) == tuple(layer.data.shape):
                    return image
        fits = [im for im in images if image_shape(im) == tuple(layer.data.shape)]
        return fits[-1] if fits else None

    def refresh(self) -> None:
        """Compute the table of the layer in a worker (nothing when its pixels and image
        did not change since the last table); shown and written to ``features`` after."""
        layer, image = self.layer, self.image()
        if layer is None:
            return
        self.image_label.setText(image.name if image is not None else "(no image of its shape)")
        data = layer.data
        pixels = None if image is None else image.data
        previous, generation = self._fingerprint, self._generation
        said = self.status.text()  # (the job's message replaces it while it runs)
        source = None if image is None else (image.name, id(image.data))

        def work():
            key = (_fingerprint(data), source)
            if key == previous and key[0] is not None:
                return key, None
            return key, object_table(data, pixels)

        def done(result) -> None:
            if layer is not self.layer:
                return
            key, table = result
            self._fingerprint = key
            self._show(table if table is not None else self.model.table, generation, said)

        self.runner.submit(work, done, MEASURING, key="table")

    def _show(self, table: dict, generation: int, said: str = "") -> None:
        layer = self.layer
        table = self._restored(apply_scores(table, scores_from(layer.features, layer.ndim - 2)))
        n = len(table["id"])
        counted = f"{n} object{'s' if n != 1 else ''} in {layer.name}"
        if self._shown is layer and same_table(table, self.model.table):
            # nothing changed (napari also signals a change of the shown plane): the
            # status line says again what it said, e.g. which object a row click showed
            self.status.setText(said if said and said != MEASURING else counted)
            return
        selected = self._selected_keys()
        self.model.set_table(table)
        self.view.resizeColumnsToContents()
        self._select(selected)
        self.status.setText(counted)
        self._shown = layer
        if generation == self._generation:  # else the layer changed: a new table follows
            self._writing = True
            try:
                layer.features = features_from(table)
            finally:
                self._writing = False

    def _restored(self, table: dict) -> dict:
        """The table with the scores of objects deleted or merged here put back where an
        undo restored them (same plane, id and area, no scores of their own), and none for
        a merged object (a redo of the merge after such an undo)."""
        if not (self._edited or self._merged) or not len(table["id"]):
            return table
        n = self.layer.ndim - 2
        iou, stab = table["predicted_iou"].copy(), table["stability_score"].copy()
        for k in range(len(table["id"])):
            key = (tuple(int(table[f"plane_{i}"][k]) for i in range(n)), int(table["id"][k]))
            old, area = self._edited.get(key), int(table["area"][k])
            if old is not None and area == old[2]:
                if np.isnan(iou[k]) and np.isnan(stab[k]):
                    iou[k], stab[k] = old[0], old[1]
            elif self._merged.get(key) == area:
                iou[k] = stab[k] = np.nan
        return {**table, "predicted_iou": iou, "stability_score": stab}

    def _filter_changed(self, *_args) -> None:
        on = self.filter_box.isChecked()
        self.model.set_filter(self.iou_below.value() if on else None)

    # -- rows ----------------------------------------------------------------------------

    def _key(self, row: dict) -> tuple[tuple[int, ...], int]:
        n = self.layer.ndim - 2 if self.layer is not None else 0
        return tuple(int(row[f"plane_{i}"]) for i in range(n)), int(row["id"])

    def selected_rows(self) -> list[int]:
        """The shown rows selected, ascending."""
        return sorted({index.row() for index in self.view.selectionModel().selectedRows()})

    def _selected_keys(self) -> set:
        return {self._key(self.model.row(r)) for r in self.selected_rows()}

    def _select(self, keys: set) -> None:
        self.view.clearSelection()
        if not keys:
            return
        flags = self.view.selectionModel().SelectionFlag
        table, order = self.model.table, self.model.order
        ids = set(int(label) for _, label in keys)
        for r in np.flatnonzero(np.isin(table["id"][order], list(ids))).tolist():
            if self._key(self.model.row(r)) in keys:
                index = self.model.index(r, 0)
                self.view.selectionModel().select(index, flags.Select | flags.Rows)

    def show_row(self, view_row: int) -> None:
        """Show a row's object: the sliders to its plane, the camera centred on it and
        its id selected in the layer."""
        layer = self.layer
        row = self.model.row(view_row)
        plane, label = self._key(row)
        position = [*plane, float(row["centroid_row"]), float(row["centroid_col"])]
        world = np.asarray(layer.data_to_world(position), dtype=float)
        offset = self.viewer.dims.ndim - layer.ndim
        for i in range(len(plane)):
            self.viewer.dims.set_point(offset + i, world[i])
        displayed = [axis - offset for axis in self.viewer.dims.displayed]
        if all(axis >= 0 for axis in displayed):
            _camera(self.viewer).center = tuple(world[displayed])
        layer.selected_label = label
        self.status.setText(f"object {label}" + (f" on plane {plane}" if plane else ""))

    # -- edits ---------------------------------------------------------------------------

    def delete_selected(self) -> int:
        """Remove the selected rows' objects (their pixels become 0); one napari undo step
        of the layer. Returns the number of pixels changed."""
        return self._edit(merge=False)

    def merge_selected(self) -> int:
        """Give the selected rows' objects the smallest of their ids (on each row's own
        plane); one napari undo step. The merged object's recorded scores are dropped.
        Returns the id they now have."""
        return self._edit(merge=True)

    def _edit(self, merge: bool) -> int:
        layer = self.layer
        keys = sorted({self._key(self.model.row(r)) for r in self.selected_rows()})
        if layer is None or not keys:
            raise ValueError("select one or more rows of the table first")
        if not writable(layer.data):  # numpy, or chunked labels on disk
            raise ValueError(unwritable(layer.name))
        indices, value = edit_indices(layer.data, keys, merge=merge)
        for r in self.selected_rows():  # their scores, for an undo of this edit
            row = self.model.row(r)
            if np.isfinite(row["predicted_iou"]) or np.isfinite(row["stability_score"]):
                scores = (float(row["predicted_iou"]), float(row["stability_score"]))
                self._edited[self._key(row)] = (*scores, int(row["area"]))
        layer.data_setitem(indices, value)  # napari's undo history; emits paint
        if merge:
            for plane in sorted({plane for plane, _ in keys}):
                _features.record(layer, plane, [value], [np.nan], [np.nan])
                self._merged[(plane, value)] = int(np.count_nonzero(layer.data[plane] == value))
        what = f"merged into object {value}" if merge else "deleted"
        self.status.setText(f"{len(keys)} object(s) {what}")
        self.view.clearSelection()
        return value if merge else len(indices[0])

    def export_csv(self, path) -> Path:
        """Write every row (in the shown order of sorting, ignoring the filter) to a CSV
        file, atomically. Returns the path written."""
        path = Path(path)
        order = self.model.sorted_rows()
        write_text_atomic(path, table_csv(self.model.table, order))
        self.status.setText(f"{len(order)} rows written to {path}")
        return path

    def save_labels(self, path) -> None:
        """Save the labels layer in the background, as *File > Save Selected Layers* with
        *MobileSAM labels TIFF* does (:func:`~napari_mobilesam.napari_io.write_labels`:
        compressed TIFF written atomically, and a ``*_labels.tif`` name's provenance
        ``*_labels.json`` beside it); the status line says when it is written.

        Raises
        ------
        ValueError
            When no Labels layer is chosen.
        """
        layer = self.layer
        if layer is None:
            raise ValueError("choose a Labels layer first")
        data = snapshot(layer.data)  # edits made meanwhile are not saved half
        meta = {
            "name": layer.name,
            "axis_labels": tuple(getattr(layer, "axis_labels", ()) or ()) or None,
            "metadata": dict(layer.metadata),
        }

        def done(paths) -> None:
            self.status.setText(f"{layer.name} saved to {paths[0]}")

        def work():
            try:
                return write_labels(str(path), data, meta)
            finally:
                release(data)

        self.runner.submit(work, done, f"saving {Path(path).name}…")

    def _save_dialog(self) -> None:
        if self.layer is None:
            raise ValueError("choose a Labels layer first")
        name = self.layer.name
        suggested = f"{name}.tif" if name.endswith("_labels") else f"{name}_labels.tif"
        path, _ = QFileDialog.getSaveFileName(
            self, "Save labels", suggested, "MobileSAM labels TIFF (*.tif *.tiff)"
        )
        if path:
            self.save_labels(path)

    def _export_dialog(self) -> None:
        name = self.layer.name if self.layer is not None else "objects"
        path, _ = QFileDialog.getSaveFileName(self, "Export objects", f"{name}.csv", "*.csv")
        if path:
            self.export_csv(path)


def _camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, else ``viewer.camera``)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _fingerprint(data) -> bytes | None:
    """A digest of in-memory labels (None for other arrays: always measured again)."""
    if not isinstance(data, np.ndarray):
        return None
    digest = hashlib.blake2b(np.ascontiguousarray(data).view(np.uint8), digest_size=16)
    digest.update(repr((data.shape, data.dtype.str)).encode())
    return digest.digest()
