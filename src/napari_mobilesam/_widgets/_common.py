"""Pieces shared by the widgets: model choice, cached predictors, layer helpers, workers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QWidget,
)

from ..build import load_model, model_names
from ..engine import Engine, make_engine
from ..predictor import Predictor

_ENGINES: dict[tuple[str, str, str, str, str], Engine] = {}
_LOCK = threading.Lock()


def get_predictor(
    name: str, weights: str | None, device: str, backend: str = "torch", precision: str = "fp32"
) -> Predictor:
    """A new predictor for the model, over an engine shared by all widgets (the model is
    loaded once; slow the first time). Each caller gets its own current image.

    Parameters
    ----------
    name : str
        Registry name (``vit_t``, ...).
    weights : str or None
        Checkpoint file; None downloads the registry weights on first use.
    device : str
        ``auto``, ``cpu``, ``cuda``, ...
    backend : {"torch", "onnx", "auto"}
        ``onnx`` exports the model on first use (cached) and runs onnxruntime; ``auto``
        is the fastest choice (:class:`~napari_mobilesam.predictor.Predictor`): torch.
    precision : {"fp32", "auto", "bf16", "fp16"}
        Image encoder precision (see :class:`~napari_mobilesam.predictor.Predictor`).
    """
    key = (name, weights or "", device, backend, precision)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            model = load_model(name, weights or None, device=device)
            engine = _ENGINES[key] = make_engine(model, backend, precision)
    return Predictor(engine)


class ModelPicker(QWidget):
    """Model name, optional weights file and device."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        self.name = QComboBox()
        self.name.addItems(model_names())
        self.name.setToolTip(
            "vit_t is MobileSAM; vit_b/l/h are SAM's encoders; vit_t_synthetic_cells is "
            "the bundled demonstration model for synthetic fluorescent cells"
        )
        self.weights = QLineEdit()
        self.weights.setPlaceholderText("registry weights (downloaded once)")
        browse = QPushButton("…")
        browse.setToolTip("choose a checkpoint file (e.g. mobile_sam.pt)")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.weights)
        row.addWidget(browse)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.backend = QComboBox()
        self.backend.addItems(["torch", "onnx", "auto"])
        self.backend.setToolTip(
            "onnx: onnxruntime (exported once on first use); auto: the fastest, which is "
            "torch (onnxruntime's float32 encoder is no faster on CPUs)"
        )
        form.addRow("model", self.name)
        form.addRow("weights", row)
        form.addRow("device", self.device)
        self.precision = QComboBox()
        self.precision.addItems(["fp32", "auto", "bf16", "fp16"])
        self.precision.setToolTip(
            "image encoder precision. fp32: the reference's numbers; auto: bf16 on GPUs and "
            "on CPUs with bf16 units (1.5-2x faster, masks mean IoU 0.998 vs fp32), else fp32"
        )
        form.addRow("backend", self.backend)
        form.addRow("precision", self.precision)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "MobileSAM weights", "", "*.pt *.pth")
        if path:
            self.weights.setText(path)

    def spec(self) -> tuple[str, str | None, str, str, str]:
        """(name, weights or None, device, backend, precision) as chosen."""
        text = self.weights.text().strip()
        return (
            self.name.currentText(),
            text or None,
            self.device.currentText(),
            self.backend.currentText(),
            self.precision.currentText(),
        )

    def predictor(self) -> Predictor:
        """Load (or reuse) the chosen model; call from a worker thread."""
        name, weights, device, backend, precision = self.spec()
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")
        return get_predictor(name, weights, device, backend, precision)


class LayerCombo(QComboBox):
    """The viewer's layers of one kind, kept up to date as layers come and go."""

    def __init__(self, viewer, kind: type, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.kind = kind
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.renamed.connect(self.refresh)  # type: ignore[attr-defined]
        self.refresh()

    def refresh(self, *_args) -> None:
        current = self.currentText()
        names = [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, self.kind) and not layer.name.startswith("MobileSAM ")
        ]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        if current not in names:
            self.currentTextChanged.emit(self.currentText())

    def layer(self):
        name = self.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None


def plane_axes_count(layer) -> int:
    """Leading axes of an image layer that index planes (all but (H, W) and RGB)."""
    return layer.ndim - 2


def current_plane(viewer, layer) -> tuple[int, ...]:
    """The plane of ``layer`` the viewer shows, as indices into its leading axes."""
    n = plane_axes_count(layer)
    if n == 0:
        return ()
    step = viewer.dims.current_step[-layer.ndim :]
    shape = layer.data.shape
    return tuple(int(min(max(s, 0), shape[i] - 1)) for i, s in enumerate(step[:n]))


class Runner:
    """Background jobs, one at a time, in submission order.

    Model work never runs on the GUI thread: each job runs in a napari thread worker,
    its result is delivered on the GUI thread, and errors become napari
    notifications. A job submitted with a ``key`` replaces a queued job with the same
    key (a newer prompt supersedes an older one that has not started).
    """

    def __init__(self, on_busy: Callable[[bool, str], None] | None = None) -> None:
        self.worker = None
        self._queue: list[tuple] = []
        self.on_busy = on_busy

    @property
    def busy(self) -> bool:
        return self.worker is not None or bool(self._queue)

    def submit(
        self,
        func: Callable,
        done: Callable[[Any], None] | None = None,
        message: str = "",
        yielded: Callable[[Any], None] | None = None,
        key: str | None = None,
    ) -> None:
        job = (func, done, message, yielded, key)
        if key is not None:
            self._queue = [j for j in self._queue if j[4] != key]
        self._queue.append(job)
        if self.worker is None:
            self._start_next()

    def _start_next(self) -> None:
        if not self._queue:
            self.worker = None
            if self.on_busy:
                self.on_busy(False, "")
            return
        func, done, message, yielded, _ = self._queue.pop(0)
        # errors are shown as notifications (_notify), not re-raised in the event loop
        worker = create_worker(func, _start_thread=False, _ignore_errors=True)
        self.worker = worker
        if done is not None:
            worker.returned.connect(done)
        if yielded is not None and hasattr(worker, "yielded"):
            worker.yielded.connect(yielded)
        worker.errored.connect(_notify)
        worker.finished.connect(self._start_next)
        if self.on_busy:
            self.on_busy(True, message)
        worker.start()

    def cancel(self) -> None:
        """Drop queued jobs and ask the running one to stop (generators stop at a yield)."""
        self._queue.clear()
        if self.worker is not None:
            self.worker.quit()


def _notify(exc: BaseException) -> None:
    show_error(f"MobileSAM: {type(exc).__name__}: {exc}")


def embedding_cache_dir() -> Path:
    """Folder of the on-disk embedding cache: ``$MOBILESAM_EMBEDDINGS`` or the user cache."""
    import os

    env = os.environ.get("MOBILESAM_EMBEDDINGS", "")
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-mobilesam")) / "embeddings"


def empty_labels(shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint32)
