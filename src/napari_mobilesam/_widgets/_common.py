"""Pieces shared by the widgets: cached predictors, layer helpers, workers (the model
choice is in :mod:`._model`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QComboBox,
    QLabel,
    QWidget,
)

from ..build import load_model
from ..engine import Engine, EngineOptions, make_engine
from ..predictor import Predictor

#: (name, weights, device, backend, precision, max upscale) -> the engine widgets share
_ENGINES: dict[tuple[str, str, str, str, str, float | None], Engine] = {}
_LOCK = threading.Lock()


def get_predictor(
    name: str,
    weights: str | None,
    device: str,
    backend: str = "torch",
    precision: str = "fp32",
    max_upscale: float | None = None,
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
    max_upscale : float, optional
        Enlarge small images at most this many times (``Predictor(max_upscale=)``).
    """
    key = (name, weights or "", device, backend, precision, max_upscale)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            model = load_model(name, weights or None, device=device)
            options = EngineOptions(max_upscale=max_upscale)
            engine = _ENGINES[key] = make_engine(model, backend, precision, options=options)
    return Predictor(engine)


class LayerCombo(QComboBox):
    """The viewer's layers of one kind, kept up to date as layers come and go.

    It starts on the selected layer when that is of the kind, else on the top visible
    one; when its layer goes away it moves to the selected (else top visible) one again.
    """

    def __init__(self, viewer, kind: type, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.kind = kind
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.renamed.connect(self.refresh)  # type: ignore[attr-defined]
        self.refresh()

    def default(self) -> str:
        """Name of the selected layer of the kind, else of the top visible one, else ""."""
        active = self.viewer.layers.selection.active
        if isinstance(active, self.kind):
            return active.name
        layers = [layer for layer in self.viewer.layers if isinstance(layer, self.kind)]
        visible = [layer for layer in layers if layer.visible] or layers
        return visible[-1].name if visible else ""

    def refresh(self, *_args) -> None:
        current = self.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, self.kind)]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        choice = current if current in names else self.default()
        if choice:
            self.setCurrentText(choice)
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentTextChanged.emit(self.currentText())

    def layer(self):
        name = self.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None


def plane_axes_count(layer) -> int:
    """Leading axes of an image layer that index planes (all but (H, W) and RGB)."""
    return layer.ndim - 2


def _shown_index(viewer, layer) -> tuple[int, ...]:
    """The layer's data index (leading axes) under the viewer's sliders: the sliders'
    world position through the layer's transform (its scale and translation, level 0
    of a multiscale layer), rounded."""
    n = plane_axes_count(layer)
    point = layer.world_to_data(viewer.dims.point[-layer.ndim :])
    return tuple(int(np.round(v)) for v in np.asarray(point)[:n])


def current_plane(viewer, layer) -> tuple[int, ...] | None:
    """The plane of ``layer`` the viewer shows, as indices into its leading axes.

    None when the viewer's sliders point beyond the layer (a stack shorter than the
    slider's range): the layer shows nothing there, so no plane of it is meant.
    """
    n = plane_axes_count(layer)
    if n == 0:
        return ()
    shape = layer.data.shape
    plane = _shown_index(viewer, layer)
    if any(not 0 <= s < shape[i] for i, s in enumerate(plane)):
        return None
    return plane


def outside_message(viewer, layer) -> str:
    """Why :func:`current_plane` is None for ``layer``, and what to do."""
    n = plane_axes_count(layer)
    step = _shown_index(viewer, layer)
    sizes = tuple(int(s) for s in layer.data.shape[:n])
    return (
        f"the sliders show plane {step}, beyond {layer.name!r} (planes {sizes}); "
        "move the slider into its range"
    )


class Runner:
    """Background jobs, one at a time: interactive jobs first, background jobs after.

    Model work never runs on the GUI thread: each job runs in a napari thread worker,
    its result is delivered on the GUI thread, and errors become napari
    notifications. A job submitted with a ``key`` replaces a queued job with the same
    key (a newer prompt supersedes an older one that has not started). A *background*
    job (one plane of a precompute) waits behind every interactive job, so a click is
    served after the plane that runs now, not after all queued planes.

    Parameters
    ----------
    on_busy : callable(busy, message), optional
        Called when a job starts (True, its message) and when the queue is empty.
    status : QLabel, optional
        The widget's status line: a job's message is shown while it runs and cleared
        when it ends (unless its result replaced it); an error replaces it.
    """

    def __init__(
        self, on_busy: Callable[[bool, str], None] | None = None, status: QLabel | None = None
    ) -> None:
        self.worker = None
        self.running = ""  # the message of the job that runs now
        self._queue: list[tuple] = []
        self._held = 0
        self.on_busy = on_busy
        self.status = status

    @property
    def busy(self) -> bool:
        return self.worker is not None or bool(self._queue) or self._held > 0

    def hold(self) -> None:
        """Keep the runner busy, and queued jobs waiting, until :meth:`release` (for work
        on the GUI thread spread over several turns of the event loop)."""
        self._held += 1

    def release(self) -> None:
        """End a :meth:`hold`; queued jobs start again."""
        self._held -= 1
        if self._held == 0 and self.worker is None:
            self._start_next()

    @property
    def interactive_waiting(self) -> bool:
        """Whether an interactive job (a click's) waits in the queue; safe to read from a
        worker, so that a long background job can stop early and let it go first."""
        return any(not job[6] for job in list(self._queue))

    @property
    def queued_background(self) -> int:
        """How many background jobs wait."""
        return sum(1 for job in self._queue if job[6])

    def submit(
        self,
        func: Callable,
        done: Callable[[Any], None] | None = None,
        message: str = "",
        yielded: Callable[[Any], None] | None = None,
        key: str | None = None,
        failed: Callable[[BaseException], None] | None = None,
        background: bool = False,
    ) -> None:
        """Queue ``func`` (a function or generator function) to run in a worker.

        ``done(result)``, ``yielded(value)`` and ``failed(exception)`` run on the GUI
        thread; ``message`` is shown in the status line while the job runs. An
        interactive job (``background=False``) goes before every queued background job.
        """
        job = (func, done, message, yielded, key, failed, background)
        if key is not None:
            self._queue = [j for j in self._queue if j[4] != key]
        if background:
            self._queue.append(job)
        else:
            first = next((i for i, j in enumerate(self._queue) if j[6]), len(self._queue))
            self._queue.insert(first, job)
        if self.worker is None:
            self._start_next()

    def _start_next(self) -> None:
        if self.status is not None and not alive(self.status):
            self._queue.clear()  # the widget was closed: nothing to show results in
        if self._held:
            self.worker, self.running = None, ""
            return  # release() starts the next job
        if not self._queue:
            self.worker, self.running = None, ""
            if self.on_busy and (self.status is None or alive(self.status)):
                self.on_busy(False, "")
            return
        func, done, message, yielded, _, failed, _ = self._queue.pop(0)
        # errors are shown as notifications (_notify), not re-raised in the event loop
        worker = create_worker(func, _start_thread=False, _ignore_errors=True)
        self.worker, self.running = worker, message
        if done is not None:
            worker.returned.connect(done)
        if yielded is not None and hasattr(worker, "yielded"):
            worker.yielded.connect(yielded)
        worker.errored.connect(_notify)
        worker.errored.connect(self._show_error)
        if failed is not None:
            worker.errored.connect(failed)
        worker.finished.connect(lambda: self._finished(message))
        if message and self.status is not None:
            self.status.setText(message)
        if self.on_busy:
            self.on_busy(True, message)
        worker.start()

    def _show_error(self, exc: BaseException) -> None:
        if self.status is not None and alive(self.status):
            self.status.setText(f"failed: {type(exc).__name__}: {exc}")

    def _finished(self, message: str) -> None:
        if (
            message
            and self.status is not None
            and alive(self.status)
            and (self.status.text() == message)
        ):
            self.status.setText("")  # nothing runs any more: no stale "computing…"
        self._start_next()

    def cancel(self) -> None:
        """Drop queued jobs and ask the running one to stop (generators stop at a yield)."""
        self._queue.clear()
        if self.worker is not None:
            self.worker.quit()

    def cancel_background(self) -> int:
        """Drop the queued background jobs (the running job finishes); how many."""
        n = self.queued_background
        self._queue = [job for job in self._queue if not job[6]]
        return n


#: modules napari imports on the GUI thread when it adds the first Points, Shapes and
#: Labels layers of a session (0.2-0.3 s): imported beforehand in a worker
LAYER_IMPORTS = ("pandas", "scipy.linalg", "skimage.color", "skimage.exposure", "skimage.util")


def warm_imports() -> None:
    """Import :data:`LAYER_IMPORTS` (one missing is skipped) and fill vispy's dash-pattern
    cache (once per process, from :func:`prepare_process`).

    The first Labels layer of a process gets a polygon overlay whose line visuals each
    build a ``DashAtlas``: 13 dash patterns computed in pure Python (0.2-0.5 s), memoised
    by vispy after the first time. Building one atlas beforehand (numpy only, no OpenGL)
    leaves napari only cached patterns to look up when it adds the layer.
    """
    import importlib

    for name in LAYER_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # napari does without it, or imports it itself
            pass
    try:
        from vispy.visuals.line.dash_atlas import DashAtlas
    except ImportError:  # another vispy layout: napari pays the cost itself
        return
    DashAtlas()


_PREPARED = False


def prepare_process() -> bool:
    """Once per process (the first call; later calls return False at once), do on the
    calling thread what would otherwise block the GUI thread during the first *Start*:
    import what napari needs to add the session's layers and fill vispy's dash patterns
    (:func:`warm_imports`), then run Python's full garbage collection. Called when the
    prompt dock is built, before it shows, with the plugin's own imports.

    - napari imports pandas on the GUI thread for the first Points layer (0.3-0.4 s), and
      vispy builds its dash patterns (0.2 s) for the first Labels layer. In *Start*'s
      worker thread, while the model loaded, they still held the GUI thread 0.4-0.7 s:
      waiting for the GIL.
    - A full collection of a process holding napari, Qt and torch scans about 400,000
      objects (0.1-0.2 s on a 2-core CPU) holding the GIL, whichever thread runs it.
      Python starts one when the objects that survived since the last one reach a quarter
      of those it kept; loading the model and adding the layers of the first *Start*
      (about 60,000 objects) did, in the middle of adding a layer. After this one, the
      next is due only after about 100,000 more.
    """
    global _PREPARED
    if _PREPARED:
        return False
    import gc

    _PREPARED = True
    warm_imports()
    gc.collect()
    return True


def add_quietly(viewer, add: Callable[[], object]) -> object:
    """``add()`` (adding a layer to ``viewer``) without napari making the new layer the
    selected one; what ``add`` returns.

    Selecting it swaps the layer controls and the active layer's key bindings (0.03-0.04 s
    of the 0.1-0.2 s napari takes to add a layer on a 2-core CPU); a caller adding several
    layers selects the one it wants once, at the end. A napari without the switch adds
    the layer as usual.
    """
    layers = viewer.layers
    before = getattr(layers, "_activate_on_insert", None)
    if not isinstance(before, bool):
        return add()
    layers._activate_on_insert = False
    try:
        return add()
    finally:
        layers._activate_on_insert = before


def in_turns(
    steps: list[Callable[[], object]],
    done: Callable[[], object],
    failed: Callable[[Exception], object],
) -> None:
    """Run ``steps`` on the GUI thread one per turn of the event loop (5 ms apart, so that
    input, painting and timers are served between them), then ``done()``; an exception
    in a step calls ``failed(exception)`` instead, and no later step runs."""
    from qtpy.QtCore import QTimer

    pending = list(steps)

    def next_step() -> None:
        if not pending:
            done()
            return
        try:
            pending.pop(0)()
        except Exception as exc:  # shown by failed(), never raised into Qt
            failed(exc)
            return
        QTimer.singleShot(5, next_step)

    QTimer.singleShot(0, next_step)


def alive(widget: QWidget) -> bool:
    """Whether the Qt object behind ``widget`` still exists (not deleted with its viewer)."""
    try:
        widget.objectName()
    except RuntimeError:
        return False
    return True


def _notify(exc: BaseException) -> None:
    show_error(f"MobileSAM: {type(exc).__name__}: {exc}")


def guarded(func: Callable) -> Callable:
    """``func`` for a key binding or a button: an exception becomes a short notification
    (its message names the fix) instead of reaching Qt's event loop."""

    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # shown to the user, never re-raised
            show_info(f"MobileSAM: {exc}")
            return None

    run.__name__ = getattr(func, "__name__", "handler")
    run.__doc__ = func.__doc__
    return run


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
