"""What the headless-napari widget tests share: the module-level skip, waits, a gate.

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

__all__ = ["WAIT", "Gate", "Qt", "idle", "napari"]

#: ms: only a hang guard; tests never depend on how busy the machine is
WAIT = 1_800_000


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
