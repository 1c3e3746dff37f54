"""What the headless-napari widget tests share: the module-level skip, waits, a gate,
disk-shaped point masks, a permissive Everything widget, and a prompt widget's
session on a test image (``blobs``, ``prompt_widget``, ``start_session``, ``draw_box``,
``object_ids``).

A widget test module starts with::

    from .widget_support import WAIT, Gate, Qt, idle, napari

which skips the whole module when napari, pytest-qt or a display (Xvfb, started by
pytest-xvfb) is missing. The fixtures ``tiny_predictor``, ``golden_predictor`` and
``notes`` live in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
if shutil.which("Xvfb") is None and not os.environ.get("DISPLAY"):
    pytest.skip(
        "no display: install Xvfb (apt-get install xvfb xauth libxcb-icccm4 libxcb-keysyms1 "
        "libxcb-xinerama0) so that pytest-xvfb can start one",
        allow_module_level=True,
    )

from qtpy.QtCore import Qt  # noqa: E402  (after the skip: qtpy comes with napari)
from skimage.draw import disk  # noqa: E402

__all__ = ["WAIT", "Gate", "Qt", "disk_masks", "everything_widget", "idle", "napari"]

#: ms: only a hang guard (tests never depend on how busy the machine is), short enough
#: that a hung test fails within the suite's time instead of stalling it
WAIT = 300_000


def idle(qtbot, widget) -> None:
    """Wait until ``widget``'s background work (its runner) is done."""
    qtbot.waitUntil(lambda: not widget.runner.busy, timeout=WAIT)


class Gate:
    """Holds every call of ``predictor.<name>`` until the test lets one through, so a
    test decides exactly when each call finishes."""

    def __init__(self, monkeypatch, predictor, name: str):
        self.entered = 0
        self.passed = 0
        self._sem = threading.Semaphore(0)
        real = getattr(predictor, name)

        def gated(*args, **kwargs):
            self.entered += 1
            assert self._sem.acquire(timeout=WAIT / 1000)  # a hang guard only
            self.passed += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(predictor, name, gated)

    def release(self, n: int = 1) -> None:
        self._sem.release(n)


def disk_masks(monkeypatch, predictor, radius: int):
    """Make the predictor's point masks contain a disk of ``radius`` px at each positive
    point (the tiny random model's are empty), so commits paint something.

    ``predict`` adds the disks to its masks. ``predict_low_res`` (a click on an untiled
    plane) answers with the disks alone: its low-res logits are positive only under the
    disks' centres, so that the candidates' bounds hold them, and its upsampler paints
    the disks whatever logits it gets.
    """
    import numpy as np

    real = predictor.predict
    real_low = predictor.predict_low_res

    def disks(points_xy, labels, shape) -> np.ndarray:
        out = np.zeros(shape, bool)
        if points_xy is not None:
            yy, xx = np.mgrid[: shape[0], : shape[1]]
            for x, y in np.asarray(points_xy)[np.asarray(labels) == 1]:
                out |= (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
        return out

    def predict(points_xy=None, labels=None, box=None, **kwargs):
        masks, scores, low_res = real(points_xy, labels, box, **kwargs)
        return masks | disks(points_xy, labels, masks.shape[1:])[None], scores, low_res

    class Disks:
        def __init__(self, upsample, painted):
            self.original_size, self.input_size = upsample.original_size, upsample.input_size
            self.scale, self.painted = upsample.scale, painted

        def __call__(self, low):
            return np.repeat(self.painted[None], len(low), axis=0)

    def predict_low_res(points_xy=None, labels=None, box=None, **kwargs):
        scores, low_res, upsample = real_low(points_xy, labels, box, **kwargs)
        painted = disks(points_xy, labels, upsample.original_size)
        low_res = np.full_like(low_res, -20.0)
        (big_h, big_w), (h, w) = upsample.original_size, upsample.input_size
        for r, c in np.argwhere(painted):
            low_res[:, int(r * h / big_h / upsample.scale), int(c * w / big_w / upsample.scale)] = (
                20.0
            )
        return scores, low_res, Disks(upsample, painted)

    monkeypatch.setattr(predictor, "predict", predict)
    monkeypatch.setattr(predictor, "predict_low_res", predict_low_res)
    return predictor


def everything_widget(viewer, image_name: str, points_per_side: int = 4):
    """An Everything widget docked in ``viewer`` on ``image_name``: a coarse grid, and
    score thresholds at 0 so that the random model's masks are kept."""
    from napari_mobilesam._widgets import EverythingWidget

    e = EverythingWidget(viewer)
    viewer.window.add_dock_widget(e)
    e.image_combo.setCurrentText(image_name)
    e.points_per_side.setValue(points_per_side)
    e.pred_iou_thresh.setValue(0.0)
    e.stability_score_thresh.setValue(0.0)
    return e


def blobs(shape=(96, 120), centers=((40, 50),), value=3000):
    """A uint16 (Y, X) image of bright discs of radius 14 px at ``centers`` (row, col)."""
    img = np.full(shape, 300, np.uint16)
    for c in centers:
        img[disk(c, 14, shape=shape)] = value
    return img


def prompt_widget(viewer, qtbot, layer=None):
    """A docked PromptWidget, its session started on ``layer`` if given."""
    from napari_mobilesam._widgets import PromptWidget

    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    if layer is not None:
        start_session(w, qtbot, layer)
    return w


def start_session(w, qtbot, layer):
    """Start ``w``'s session on ``layer`` and wait until it is ready."""
    w.image_combo.setCurrentText(layer.name)
    w.start()
    idle(qtbot, w)
    assert w.session is not None and w.state.image is layer


def draw_box(w, qtbot, corners, plane=()):
    """Draw a box prompt from corners ((r0, c0), (r1, c1)), on ``plane`` (leading indices)."""
    (r0, c0), (r1, c1) = corners
    rc = [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]
    w.state.box.add_rectangles(np.array([[*plane, r, c] for r, c in rc], dtype=float))
    idle(qtbot, w)
    assert w.prediction is not None


def object_ids(layer) -> set[int]:
    """The ids (not 0) in a Labels layer."""
    return set(np.unique(np.asarray(layer.data)).tolist()) - {0}
