"""The model setting, one per viewer: every widget's picker shows and edits the same choice.

The prompt widget and the segment-everything widget each show a :class:`ModelPicker`;
pickers on one viewer share a :class:`ModelSetting`, so a model or weights file chosen in
one is the choice of both (weights are entered once). *backend* and *precision* sit in
a collapsed *advanced* group.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..build import model_names
from ..predictor import Predictor
from ..weights import REGISTRY, default_max_upscale
from . import _common

_FIELDS = ("name", "weights", "device", "backend", "precision", "max_upscale")
#: the *max upscale* choices: "none" is SAM's resize to the model's input
UPSCALE_CHOICES = ("model default", "none", "1", "1.5", "2", "3", "4")
_SETTINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ModelSetting(QObject):
    """The chosen model of one viewer: ``values`` maps each field of
    :meth:`ModelPicker.spec` (name, weights, device, backend, precision, max upscale) to its
    text;
    ``changed`` is emitted after every change."""

    changed = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}

    def update(self, values: dict[str, str]) -> None:
        if values != self.values:
            self.values = dict(values)
            self.changed.emit()


def model_setting(viewer) -> ModelSetting:
    """The :class:`ModelSetting` of ``viewer`` (created on first use; a private one for
    ``viewer=None``)."""
    if viewer is None:
        return ModelSetting()
    setting = _SETTINGS.get(viewer)
    if setting is None:
        setting = _SETTINGS[viewer] = ModelSetting()
    return setting


class ModelPicker(QWidget):
    """Model name, optional weights file and device; backend, precision and the upscale
    limit for small images under *advanced*. Every picker of a viewer shows the viewer's
    one :class:`ModelSetting`.

    Parameters
    ----------
    viewer : napari.viewer.Viewer, optional
        Whose setting to show and edit; None: a setting of this picker only.
    """

    def __init__(self, viewer=None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        form = QFormLayout()
        outer.addLayout(form)
        self.name = QComboBox()
        self.name.addItems(model_names())
        self.name.setToolTip(
            "vit_t is MobileSAM; vit_b/l/h are SAM's encoders; vit_t_synthetic_cells is "
            "the bundled demonstration model for synthetic fluorescent cells"
        )
        self.weights = QLineEdit()
        browse = QPushButton("…")
        browse.setToolTip("choose a checkpoint file (e.g. mobile_sam.pt)")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.weights)
        row.addWidget(browse)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        form.addRow("model", self.name)
        form.addRow("weights", row)
        form.addRow("device", self.device)

        self.advanced = QToolButton()
        self.advanced.setText("advanced")
        self.advanced.setCheckable(True)
        self.advanced.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced.setAutoRaise(True)
        self.advanced_box = QWidget()
        extra = QFormLayout(self.advanced_box)
        extra.setContentsMargins(0, 0, 0, 0)
        self.backend = QComboBox()
        self.backend.addItems(["torch", "onnx", "auto"])
        self.backend.setToolTip(
            "onnx: onnxruntime (exported once on first use); auto: the fastest, which is "
            "torch (onnxruntime's float32 encoder is no faster on CPUs)"
        )
        self.precision = QComboBox()
        self.precision.addItems(["fp32", "auto", "bf16", "fp16"])
        self.precision.setToolTip(
            "image encoder precision. fp32: the reference's numbers; auto: bf16 on GPUs and "
            "on CPUs with bf16 units (1.5-2x faster, masks mean IoU 0.998 vs fp32), else fp32"
        )
        self.max_upscale = QComboBox()
        self.max_upscale.addItems(UPSCALE_CHOICES)
        self.max_upscale.setToolTip(
            "enlarge images smaller than the model's 1024 px input at most this many times, "
            "padding the rest with their background, so their objects keep the size the "
            "model learnt. model default: the registry's value for the model (2 for "
            "vit_t_synthetic_cells, none for the others). none: enlarge to 1024 px, as SAM does"
        )
        extra.addRow("backend", self.backend)
        extra.addRow("precision", self.precision)
        extra.addRow("max upscale", self.max_upscale)
        self.advanced_box.setVisible(False)
        self.advanced.toggled.connect(self._toggle_advanced)
        outer.addWidget(self.advanced)
        outer.addWidget(self.advanced_box)

        self.name.currentTextChanged.connect(self._weights_hint)
        self._weights_hint()
        self.setting = model_setting(viewer)
        if self.setting.values:
            self._pull()  # a second widget shows what the first chose
        else:
            self._push()
        self.setting.changed.connect(self._pull)
        for combo in (self.name, self.device, self.backend, self.precision, self.max_upscale):
            combo.currentTextChanged.connect(self._push)
        self.weights.textChanged.connect(self._push)

    def _weights_hint(self, *_args) -> None:
        """What an empty weights field means for the chosen model."""
        info = REGISTRY.get(self.name.currentText())
        bundled = info is not None and info.bundled
        self.weights.setPlaceholderText(
            "bundled weights (installed with the plugin)"
            if bundled
            else "registry weights (downloaded once)"
        )

    def _toggle_advanced(self, shown: bool) -> None:
        self.advanced_box.setVisible(shown)
        self.advanced.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)

    def _values(self) -> dict[str, str]:
        return {
            "name": self.name.currentText(),
            "weights": self.weights.text(),
            "device": self.device.currentText(),
            "backend": self.backend.currentText(),
            "precision": self.precision.currentText(),
            "max_upscale": self.max_upscale.currentText(),
        }

    def _push(self, *_args) -> None:
        self.setting.update(self._values())

    def _pull(self) -> None:
        values = self.setting.values
        if values == self._values():
            return
        for field in _FIELDS:
            control = getattr(self, field)
            control.blockSignals(True)
            if isinstance(control, QLineEdit):
                control.setText(values[field])
            else:
                control.setCurrentText(values[field])
            control.blockSignals(False)
        self._weights_hint()

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "MobileSAM weights", "", "*.pt *.pth")
        if path:
            self.weights.setText(path)

    def spec(self) -> tuple[str, str | None, str, str, str, float | None]:
        """(name, weights or None, device, backend, precision, max upscale or None) as
        chosen."""
        text = self.weights.text().strip()
        upscale = self.max_upscale.currentText()
        return (
            self.name.currentText(),
            text or None,
            self.device.currentText(),
            self.backend.currentText(),
            self.precision.currentText(),
            _upscale(upscale, self.name.currentText()),
        )

    def predictor(self) -> Predictor:
        """Load (or reuse) the chosen model; call from a worker thread."""
        name, weights, device, backend, precision, max_upscale = self.spec()
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")
        return _common.get_predictor(name, weights, device, backend, precision, max_upscale)


def _upscale(choice: str, name: str) -> float | None:
    """The upscale limit of a choice of :data:`UPSCALE_CHOICES` for model ``name``."""
    if choice == "model default":
        return default_max_upscale(name)
    return None if choice == "none" else float(choice)
