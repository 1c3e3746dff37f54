"""MobileSAM: segment everything on the shown plane or on every plane of a stack."""

from __future__ import annotations

import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..everything import MaskGenerator
from ..interactive import predictor_lock
from ..normalize import to_rgb_uint8
from ._common import LayerCombo, ModelPicker, Runner, current_plane


class EverythingWidget(QWidget):
    """Dock widget: segment everything into a new Labels layer, in the background.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.runner = Runner(self._busy)
        self.result_layer = None
        self._cancelled = False

        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = LayerCombo(napari_viewer, Image)
        form.addRow("image", self.image_combo)
        self.scope = QComboBox()
        self.scope.addItems(["shown plane", "whole stack"])
        form.addRow("segment", self.scope)
        layout.addLayout(form)
        self.model = ModelPicker()
        layout.addWidget(self.model)

        params = QFormLayout()
        self.points_per_side = _spin(QSpinBox(), 1, 128, 32)
        self.pred_iou_thresh = _spin(QDoubleSpinBox(), 0.0, 1.0, 0.88, 0.01)
        self.stability_score_thresh = _spin(QDoubleSpinBox(), 0.0, 1.0, 0.95, 0.01)
        self.box_nms_thresh = _spin(QDoubleSpinBox(), 0.0, 1.0, 0.7, 0.05)
        self.min_mask_region_area = _spin(QSpinBox(), 0, 10**7, 0)
        params.addRow("points per side", self.points_per_side)
        params.addRow("predicted IoU ≥", self.pred_iou_thresh)
        params.addRow("stability ≥", self.stability_score_thresh)
        params.addRow("NMS IoU", self.box_nms_thresh)
        params.addRow("min region area (px)", self.min_mask_region_area)
        layout.addLayout(params)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        layout.addWidget(self.status)
        layout.addWidget(self.progress)
        layout.addStretch()

    def parameters(self) -> dict:
        """The MaskGenerator keyword arguments chosen in the widget."""
        return {
            "points_per_side": self.points_per_side.value(),
            "pred_iou_thresh": self.pred_iou_thresh.value(),
            "stability_score_thresh": self.stability_score_thresh.value(),
            "box_nms_thresh": self.box_nms_thresh.value(),
            "min_mask_region_area": self.min_mask_region_area.value(),
        }

    def run(self) -> None:
        """Segment the shown plane or every plane into a new Labels layer."""
        layer = self.image_combo.layer()
        if layer is None:
            show_info("MobileSAM: add an image layer first")
            return
        data, rgb = layer.data, bool(layer.rgb)
        shape = tuple(data.shape[:-1] if rgb else data.shape)
        lead = shape[:-2]
        if self.scope.currentIndex() == 0 or not lead:
            planes = [current_plane(self.viewer, layer)]
        else:
            planes = [tuple(int(i) for i in ix) for ix in np.ndindex(*lead)]
        limits = tuple(float(v) for v in layer.contrast_limits)
        params = self.parameters()
        model = self.model
        labels = np.zeros(shape, dtype=np.uint32)
        name = f"{layer.name} everything"

        ran_on: list[str] = []  # what ran, as chosen (shown when done)

        def work():
            gen = MaskGenerator(model.predictor(), **params)
            ran_on.append(gen.predictor.describe())
            for i, index in enumerate(planes):
                plane = np.asarray(data[index])
                rgb_plane = to_rgb_uint8(
                    plane, contrast_limits=None if rgb else limits,
                    channel_axis=-1 if rgb else None,
                )  # fmt: skip
                # the predictor is shared with the prompt widget: hold its image for
                # the plane (a prompt gets its turn between planes)
                with predictor_lock(gen.predictor):
                    labels[index] = gen.generate_labels(rgb_plane)
                yield i + 1, len(planes)
            return labels

        def done(result) -> None:
            if self._cancelled:
                return
            if name in self.viewer.layers:
                self.viewer.layers[name].data = result
                self.result_layer = self.viewer.layers[name]
            else:
                self.result_layer = self.viewer.add_labels(result, name=name)
            counts = [int(result[index].max()) for index in planes]
            self.status.setText(
                f"{sum(counts)} objects in {len(planes)} plane(s); {', '.join(ran_on)}"
            )

        self.progress.setRange(0, len(planes))
        self.progress.setValue(0)
        self._cancelled = False
        self.runner.submit(work, done, f"segmenting {len(planes)} plane(s)…",
                           yielded=self._progressed)  # fmt: skip

    def cancel(self) -> None:
        """Stop after the plane being segmented; nothing is added to the viewer."""
        self._cancelled = True
        self.runner.cancel()
        self.status.setText("cancelled")

    def _progressed(self, value) -> None:
        if self._cancelled:
            return
        done, total = value
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.status.setText(f"plane {done} of {total}")

    def _busy(self, busy: bool, message: str) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if busy and message:
            self.status.setText(message)
        elif not busy and self._cancelled:
            self.status.setText("cancelled")


def _spin(box, lo, hi, value, step=None):
    box.setRange(lo, hi)
    box.setValue(value)
    if step is not None:
        box.setSingleStep(step)
    return box
