"""MobileSAM: segment with prompts (points and boxes) on 2D images and stacks.

The widget translates napari layers into :class:`~napari_mobilesam.interactive.PromptSession`
calls and back; the embedding, predictions and propagation run in thread workers.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..interactive import EmbeddingCache, Prediction, PromptSession
from ._common import (
    LayerCombo,
    ModelPicker,
    Runner,
    current_plane,
    embedding_cache_dir,
    empty_labels,
)

POINTS = "MobileSAM points"
BOX = "MobileSAM box"
PREVIEW = "MobileSAM preview"
TARGET = "MobileSAM labels"

SHORTCUTS = (
    "click: add a point (Points layer, add mode) · N: next points negative/positive · "
    "draw a rectangle in the box layer · C: commit · X: cycle masks · "
    "Shift-Z: undo · Escape: clear prompts"
)


class PromptWidget(QWidget):
    """Dock widget: click points / draw a box, see the mask, commit it to a Labels layer.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session: PromptSession | None = None
        self.cache = EmbeddingCache(max_items=32)
        self.prediction: Prediction | None = None
        self.cycle = 0
        self.negative = False
        self._plane: tuple[int, ...] | None = None
        self._ready: set[tuple[int, ...]] = set()
        self.runner = Runner(self._busy)

        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = LayerCombo(napari_viewer, Image)
        self.image_combo.currentTextChanged.connect(self._image_changed)
        form.addRow("image", self.image_combo)
        layout.addLayout(form)
        self.model = ModelPicker()
        layout.addWidget(self.model)

        opts = QFormLayout()
        self.multimask = QComboBox()
        self.multimask.addItems(["best of 3", "cycle (X)", "single"])
        opts.addRow("masks", self.multimask)
        self.negative_box = QCheckBox("next points are negative (N)")
        self.negative_box.toggled.connect(self._set_negative)
        opts.addRow(self.negative_box)
        self.disk_cache = QCheckBox("precompute all planes (on-disk cache)")
        self.disk_cache.setToolTip(
            "embed every plane in the background at Start and keep the embeddings on disk "
            "(about 4 MB per plane), also for the next session with the same image"
        )
        opts.addRow(self.disk_cache)
        layout.addLayout(opts)

        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("compute the embedding of the shown plane, add prompt layers")
        self.start_button.clicked.connect(self.start)
        self.commit_button = QPushButton("Commit (C)")
        self.commit_button.clicked.connect(self.commit)
        self.undo_button = QPushButton("Undo (Shift-Z)")
        self.undo_button.clicked.connect(self.undo)
        self.clear_button = QPushButton("Clear (Esc)")
        self.clear_button.clicked.connect(self.clear)
        for b in (self.start_button, self.commit_button, self.undo_button, self.clear_button):
            buttons.addWidget(b)
        layout.addLayout(buttons)

        prop = QGroupBox("propagate through z / t")
        pform = QFormLayout(prop)
        self.prop_axis = QComboBox()
        self.prop_direction = QComboBox()
        self.prop_direction.addItems(["both", "forward", "backward"])
        self.prop_min_score = QDoubleSpinBox()
        self.prop_min_score.setRange(0.0, 1.0)
        self.prop_min_score.setSingleStep(0.05)
        self.prop_min_score.setValue(0.7)
        self.prop_button = QPushButton("Propagate")
        self.prop_button.setToolTip("commit the mask and follow the object plane by plane")
        self.prop_button.clicked.connect(self.propagate)
        pform.addRow("axis", self.prop_axis)
        pform.addRow("direction", self.prop_direction)
        pform.addRow("stop below score", self.prop_min_score)
        pform.addRow(self.prop_button)
        layout.addWidget(prop)

        self.status = QLabel("choose an image and press Start")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        layout.addWidget(self.status)
        layout.addWidget(self.progress)
        help_label = QLabel(SHORTCUTS)
        help_label.setWordWrap(True)
        layout.addWidget(help_label)
        layout.addStretch()

        napari_viewer.dims.events.current_step.connect(self._plane_changed)
        self._image_changed()

    # -- setup ---------------------------------------------------------------------------

    def _image_changed(self, *_args) -> None:
        self.session = None
        self._ready.clear()
        self.prop_axis.clear()
        layer = self.image_combo.layer()
        if layer is not None:
            shape = layer.data.shape
            self.prop_axis.addItems(
                [f"axis {i} ({shape[i]} planes)" for i in range(layer.ndim - 2)]
            )
        self.prop_button.setEnabled(self.prop_axis.count() > 0)

    def start(self) -> None:
        """Create the session and the prompt layers, and embed the shown plane."""
        layer = self.image_combo.layer()
        if layer is None:
            show_info("MobileSAM: add an image layer first")
            return
        self._ensure_layers(layer)

        on_disk = self.disk_cache.isChecked()

        def make():
            predictor = self.model.predictor()
            limits = tuple(float(v) for v in layer.contrast_limits)
            # keyed by the planes' pixels (and the model and limits), so an entry is never
            # taken for other data, and a later session on the same image reuses it
            if on_disk:
                cache = EmbeddingCache(max_items=32, folder=embedding_cache_dir())
            else:
                cache = self.cache
            return PromptSession(
                predictor, layer.data, rgb=bool(layer.rgb), contrast_limits=limits, cache=cache
            )

        def made(session) -> None:
            self.session = session
            self._ready.clear()
            self._plane = None
            self.status.setText(f"model on {session.predictor.describe()}")
            self._plane_changed()
            if on_disk:
                self.precompute()

        self.runner.submit(make, made, "loading the model…")

    def _ensure_layers(self, image) -> None:
        ndim = image.ndim
        shape = image.data.shape[:-1] if image.rgb else image.data.shape
        v = self.viewer
        if POINTS not in v.layers:
            pts = v.add_points(
                ndim=ndim, name=POINTS, size=max(4, min(shape[-2:]) // 60),
                features={"positive": np.zeros(0, dtype=bool)},
                feature_defaults={"positive": True},
                face_color="positive", face_color_cycle=["red", "lime"],
            )  # fmt: skip
            pts.events.data.connect(self._prompts_changed)
            pts.mode = "add"
            self._bind_keys(pts)
        if BOX not in v.layers:
            box = v.add_shapes(
                ndim=ndim, name=BOX, edge_color="yellow", face_color="transparent",
                edge_width=max(1, min(shape[-2:]) // 300),
            )  # fmt: skip
            box.events.data.connect(self._prompts_changed)
            self._bind_keys(box)
        if PREVIEW not in v.layers:
            v.add_labels(np.zeros(shape[-2:], dtype=np.uint8), name=PREVIEW, opacity=0.5)
        if TARGET not in v.layers or v.layers[TARGET].data.shape != tuple(shape):
            if TARGET in v.layers:
                v.layers.remove(TARGET)
            v.add_labels(empty_labels(tuple(shape)), name=TARGET, opacity=0.6)
        self._bind_keys(image)
        v.layers.selection.active = v.layers[POINTS]

    def _bind_keys(self, layer) -> None:
        for key, func in (
            ("c", self.commit), ("x", self.next_mask), ("n", self.toggle_negative),
            ("Shift-z", self.undo), ("Escape", self.clear),
        ):  # fmt: skip
            layer.bind_key(key, lambda _layer, f=func: f(), overwrite=True)

    # -- plane and prompts -----------------------------------------------------------------

    def current_plane(self) -> tuple[int, ...]:
        return current_plane(self.viewer, self.image_combo.layer())

    def _plane_changed(self, *_args) -> None:
        if self.session is None or self.image_combo.layer() is None:
            return
        plane = self.current_plane()
        if plane == self._plane:
            return
        self._plane = plane
        self._show(None)
        if plane in self._ready:
            self.runner.submit(lambda: self.session.embed(plane), lambda _: self._predict())
        else:
            self.runner.submit(
                lambda: self.session.embed(plane), lambda _: self._embedded(plane),
                f"computing the embedding of plane {plane}…",
            )  # fmt: skip

    def _embedded(self, plane) -> None:
        self._ready.add(plane)
        self._predict()

    def _prompts_changed(self, *_args) -> None:
        self.cycle = 0
        self._predict()

    def prompts(self) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Points (N, 2) (row, col), labels (N,), box (4,) (r0, c0, r1, c1) on the shown plane."""
        plane = self._plane or ()
        points = labels = box = None
        if POINTS in self.viewer.layers:
            layer = self.viewer.layers[POINTS]
            data = np.asarray(layer.data)
            if len(data):
                on = _on_plane(data, plane)
                if on.any():
                    points = data[on][:, -2:]
                    labels = np.asarray(layer.features["positive"])[on].astype(int)
        if BOX in self.viewer.layers:
            layer = self.viewer.layers[BOX]
            for shape, kind in zip(layer.data[::-1], layer.shape_type[::-1], strict=True):
                shape = np.asarray(shape)
                if kind == "rectangle" and _on_plane(shape, plane).all():
                    rc = shape[:, -2:]
                    box = np.array([*rc.min(axis=0), *rc.max(axis=0)])
                    break
        return points, labels, box

    def _predict(self) -> None:
        if self.session is None or self._plane not in self._ready:
            return
        points, labels, box = self.prompts()
        if points is None and box is None:
            self._show(None)
            return
        mode = self.multimask.currentIndex()
        choice = "best" if mode == 0 else self.cycle
        plane = self._plane

        # three candidates only for an ambiguous prompt: a single point (a box is not)
        multimask = mode != 2 and box is None

        def run():
            return plane, self.session.predict(
                points, labels, box, multimask=multimask, choice=choice
            )

        self.runner.submit(run, self._predicted, key="predict")

    def _predicted(self, result) -> None:
        plane, prediction = result
        if plane != self._plane:
            return
        self._show(prediction)

    def _show(self, prediction: Prediction | None) -> None:
        self.prediction = prediction
        if PREVIEW not in self.viewer.layers:
            return
        preview = self.viewer.layers[PREVIEW]
        if prediction is None:
            preview.data = np.zeros_like(preview.data)
            return
        preview.data = prediction.mask.astype(np.uint8)
        n = len(prediction.scores)
        self.status.setText(
            f"mask {prediction.choice + 1} of {n}, predicted IoU {prediction.score:.3f}"
        )

    # -- actions ---------------------------------------------------------------------------

    def _target(self):
        return self.viewer.layers[TARGET] if TARGET in self.viewer.layers else None

    def commit(self) -> int | None:
        """Write the previewed mask into the target Labels layer with a new id."""
        target = self._target()
        if self.session is None or self.prediction is None or target is None:
            return None
        if not self.prediction.mask.any():
            return None
        plane = self._plane or ()
        # ids are unique over the whole layer, not per plane
        new_id = int(np.max(target.data)) + 1
        self.session.commit(target.data[plane], self.prediction.mask, label_id=new_id)
        target.refresh()
        self.status.setText(f"committed object {new_id}")
        self.clear()
        return new_id

    def undo(self) -> None:
        target = self._target()
        if self.session is None or target is None:
            return
        removed = self.session.undo()
        if removed is not None:
            target.refresh()
            self.status.setText(f"removed object {', '.join(map(str, removed))}")

    def clear(self) -> None:
        """Remove the prompts of the shown plane and the preview."""
        plane = self._plane or ()
        if POINTS in self.viewer.layers:
            layer = self.viewer.layers[POINTS]
            data = np.asarray(layer.data)
            if len(data):
                keep = ~_on_plane(data, plane)
                with layer.events.data.blocker():
                    layer.selected_data = set(np.flatnonzero(~keep))
                    layer.remove_selected()
        if BOX in self.viewer.layers:
            layer = self.viewer.layers[BOX]
            with layer.events.data.blocker():
                layer.selected_data = set(range(layer.nshapes))
                layer.remove_selected()
        self.cycle = 0
        self._show(None)

    def next_mask(self) -> None:
        """Show the next of the three candidate masks."""
        if self.multimask.currentIndex() == 0:
            self.multimask.setCurrentIndex(1)
        self.cycle += 1
        self._predict()

    def toggle_negative(self) -> None:
        self.negative_box.setChecked(not self.negative_box.isChecked())

    def _set_negative(self, negative: bool) -> None:
        self.negative = negative
        if POINTS in self.viewer.layers:
            layer = self.viewer.layers[POINTS]
            layer.feature_defaults["positive"] = not negative
            layer.feature_defaults = layer.feature_defaults

    def precompute(self) -> None:
        """Embed every plane in the background (shown in the progress bar)."""
        if self.session is None:
            return
        session = self.session

        def run():
            indices = [tuple(int(v) for v in i) for i in np.ndindex(*session.plane_shape)]
            step = session.batch_size  # planes per encoder call (batched on a GPU)
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                session.precompute(chunk)
                self._ready.update(chunk)
                yield start + len(chunk), len(indices)

        self.runner.submit(run, None, "precomputing embeddings…", yielded=self._progressed)

    def _progressed(self, value) -> None:
        done, total = value
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def propagate(self) -> None:
        """Commit the shown mask, then segment the same object in neighbouring planes."""
        target = self._target()
        if self.session is None or self.prediction is None or target is None:
            show_info("MobileSAM: segment an object on this plane first")
            return
        start = self._plane or ()
        mask = self.prediction.mask.copy()
        new_id = self.commit()
        if new_id is None:
            return
        axis = self.prop_axis.currentIndex()
        direction = {0: 0, 1: 1, 2: -1}[self.prop_direction.currentIndex()]
        min_score = self.prop_min_score.value()
        session = self.session

        def run():
            masks = session.propagate(start, mask, axis, direction=direction, min_score=min_score)
            return masks

        def done(masks) -> None:
            for index, m in masks.items():
                session.commit(target.data[index], m, label_id=new_id)
                self._ready.add(index)
            target.refresh()
            self.status.setText(f"object {new_id} propagated to {len(masks)} more plane(s)")

        self.runner.submit(run, done, "propagating…")

    def _busy(self, busy: bool, message: str) -> None:
        if busy:
            self.progress.setRange(0, 0)  # indeterminate
            if message:
                self.status.setText(message)
        else:
            self.progress.setRange(0, 1)
            self.progress.setValue(1)


def _on_plane(coords: np.ndarray, plane: tuple[int, ...]) -> np.ndarray:
    """Rows of (N, ndim) layer coordinates that lie on ``plane`` (leading axes)."""
    if not plane:
        return np.ones(len(coords), dtype=bool)
    lead = np.round(coords[:, : len(plane)]).astype(int)
    return (lead == np.asarray(plane)).all(axis=1)
