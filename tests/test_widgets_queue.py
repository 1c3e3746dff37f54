"""Headless napari: the prompt widget's work queue (issue 19, problem 4), on a real viewer.

The encoder is held at a gate (a semaphore the test releases plane by plane), so each
test decides exactly when a plane finishes: nothing depends on how fast the machine is.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from .widget_support import (  # skips the module without napari or a display
    WAIT,
    Gate,
    idle,
)


def _stack(n=6, shape=(64, 80)):
    """``n`` planes that differ (so no plane is another's cache hit), one blob each."""
    planes = []
    for z in range(n):
        img = np.full(shape, 300 + z, np.uint16)
        img[disk((30 + z, 40), 12, shape=shape)] = 3000
        planes.append(img)
    return np.stack(planes)


def _widget(viewer, qtbot, layer):
    from napari_mobilesam._widgets import PromptWidget

    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image_combo.setCurrentText(layer.name)
    w.start()
    idle(qtbot, w)
    assert w.session is not None
    return w


def test_a_click_overtakes_the_queued_precompute_planes(
    make_napari_viewer, qtbot, tiny_predictor, monkeypatch
):
    viewer = make_napari_viewer()
    layer = viewer.add_image(_stack(), name="cells", contrast_limits=(0, 4000))
    viewer.dims.current_step = (0, 0, 0)
    w = _widget(viewer, qtbot, layer)
    gate = Gate(monkeypatch, tiny_predictor, "embed_images")  # precompute's encoder call
    w.precompute()
    qtbot.waitUntil(lambda: gate.entered == 1, timeout=WAIT)
    # determinate: plane 0 (embedded at Start) of 6 is done; Cancel is offered
    assert (w.progress.minimum(), w.progress.maximum(), w.progress.value()) == (0, 6, 1)
    assert w.cancel_button.isEnabled() and w.runner.queued_background == 4

    # move to plane 3 and click there while plane 1 is being precomputed
    viewer.dims.current_step = (3, 0, 0)
    assert "the embedding of plane (3,) runs next, after: precomputing" in w.status.text()
    w.state.points.add(np.array([[3.0, 33.0, 40.0]]))
    assert "your prompt runs next, after: precomputing" in w.status.text()
    gate.release()  # plane 1 ends: the click's embedding and prediction run next
    qtbot.waitUntil(lambda: w.prediction is not None, timeout=WAIT)
    assert gate.passed == 1 and w.runner.queued_background >= 2  # planes 2, 4, 5 wait
    np.testing.assert_array_equal(w.state.preview.data.astype(bool), w.prediction.mask)
    assert (3,) in w.state.ready
    assert w.session.current == (3,)

    gate.release(10)
    idle(qtbot, w)
    # plane 3 came from the click's embedding (a cache hit): only 1, 2, 4, 5 encoded here
    assert gate.passed == 4 and w.state.ready == {(z,) for z in range(6)}
    assert "all 6 planes embedded" in w.status.text()
    assert not w.cancel_button.isEnabled() and w.progress.value() == w.progress.maximum()


def test_cancel_precompute_keeps_the_planes_done(
    make_napari_viewer, qtbot, tiny_predictor, monkeypatch
):
    viewer = make_napari_viewer()
    layer = viewer.add_image(_stack(), name="cells", contrast_limits=(0, 4000))
    viewer.dims.current_step = (0, 0, 0)
    w = _widget(viewer, qtbot, layer)
    gate = Gate(monkeypatch, tiny_predictor, "embed_images")
    w.precompute()
    gate.release()  # plane 1
    qtbot.waitUntil(lambda: gate.entered == 2, timeout=WAIT)  # plane 2 runs
    assert w.progress.value() == 2
    w.cancel()
    assert w.runner.queued_background == 0 and w.runner.busy
    assert w.status.text().startswith("cancelling") and not w.cancel_button.isEnabled()
    gate.release()  # plane 2 ends; nothing more starts
    idle(qtbot, w)
    assert gate.entered == 2 and w.state.ready == {(0,), (1,), (2,)}
    assert [w.session.is_cached((z,)) for z in range(6)] == [True] * 3 + [False] * 3
    assert w.status.text() == "precompute cancelled: 3 of 6 planes embedded (kept)"
    assert w.progress.maximum() == 1 and w.progress.value() == 1  # idle again


def test_cancel_propagation_commits_the_planes_done(
    make_napari_viewer, qtbot, tiny_predictor, monkeypatch
):
    viewer = make_napari_viewer()
    layer = viewer.add_image(_stack(8), name="cells", contrast_limits=(0, 4000))
    viewer.dims.current_step = (0, 0, 0)
    w = _widget(viewer, qtbot, layer)
    w.state.box.add_rectangles(np.array([[0, 16, 26], [0, 16, 54], [0, 44, 54], [0, 44, 26.0]]))
    idle(qtbot, w)
    w.prop_min_score.setValue(0.0)  # random weights: any score
    w.prop_direction.setCurrentText("forward")
    gate = Gate(monkeypatch, tiny_predictor, "set_image")  # the encoder of each next plane
    w.propagate()
    assert w.cancel_button.isEnabled() and "propagating" in w.status.text()
    gate.release(2)  # planes 1 and 2
    qtbot.waitUntil(lambda: gate.entered == 3, timeout=WAIT)  # plane 3 runs
    w.cancel()
    assert w.status.text().startswith("cancelling") and not w.cancel_button.isEnabled()
    gate.release()
    idle(qtbot, w)
    assert gate.entered == 3  # no plane after the one that ran
    labels = w.state.labels.data
    found = [z for z in range(8) if (labels[z] == 1).any()]
    assert found == [0, 1, 2, 3] and labels.max() == 1
    assert w.status.text().startswith("propagation cancelled: object 1 propagated to 3")


def test_start_adds_the_layers_in_separate_turns_of_the_event_loop(
    make_napari_viewer, qtbot, tiny_predictor
):
    """napari takes 0.1-0.3 s per added layer: Start adds one per turn of the event loop,
    so the viewer serves input and timers between them (no block of all four)."""
    from qtpy.QtCore import QTimer

    from napari_mobilesam._widgets import PromptWidget

    viewer = make_napari_viewer()
    viewer.add_image(_stack(2), name="cells")
    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    inserted, served, seen = [], [], []

    statuses = []

    def on_insert(event):
        seen.append(len(served))  # how many earlier insertions' timers have run
        inserted.append(event.value.name)
        statuses.append(w.status.text())
        count = len(inserted)
        QTimer.singleShot(0, lambda: served.append(count))

    viewer.layers.events.inserted.connect(on_insert)
    w.start()
    qtbot.waitUntil(lambda: len(inserted) == 4, timeout=WAIT)
    assert w.runner.busy  # until the session is ready
    idle(qtbot, w)
    assert inserted == ["cells points", "cells box", "cells preview", "cells_labels"]
    # a timer queued at each insertion ran before the next insertion
    assert seen == [0, 1, 2, 3] and served == [1, 2, 3, 4]
    assert statuses == ["adding the layers of 'cells'…"] * 4  # never a blank status line
    assert w.session is not None and w.state.points.name == "cells points"


def test_an_image_removed_while_start_adds_its_layers_is_said(
    make_napari_viewer, qtbot, tiny_predictor
):
    from qtpy.QtCore import QTimer

    from napari_mobilesam._widgets import PromptWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(_stack(2), name="cells")
    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    inserted = []

    def on_insert(event):  # the user removes the image after the first layer came
        inserted.append(event.value.name)
        if len(inserted) == 1:
            QTimer.singleShot(0, lambda: viewer.layers.remove(image))

    viewer.layers.events.inserted.connect(on_insert)
    w.start()
    idle(qtbot, w)
    assert image not in viewer.layers and len(inserted) < 4
    assert w.status.text() == "'cells' was removed while its layers were added"
    assert w.session is None and not w.sessions


def test_start_adds_its_layers_without_napari_selecting_each(
    make_napari_viewer, qtbot, tiny_predictor
):
    """Selecting each new layer costs napari 0.03-0.04 s per layer on the GUI thread: Start
    adds its four without selection changes, then selects the points layer once."""
    from napari_mobilesam._widgets import PromptWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(_stack(2), name="cells")
    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    actives = []
    viewer.layers.selection.events.active.connect(lambda e: actives.append(e.value))
    w.start()
    idle(qtbot, w)
    assert w.state.points in viewer.layers
    # (napari clears the selection before it selects a layer: None in between)
    assert {layer.name for layer in actives if layer is not None} == {"cells points"}
    assert image in viewer.layers
    mine = viewer.add_image(np.zeros((8, 8)), name="mine")  # napari's default again
    assert viewer.layers.selection.active is mine


def test_add_quietly_restores_the_switch_and_works_without_it(make_napari_viewer):
    from napari_mobilesam._widgets._common import add_quietly

    viewer = make_napari_viewer()
    first = viewer.add_image(np.zeros((8, 8)), name="a")

    def fails():
        raise ValueError("no layer")

    assert viewer.layers.selection.active is first
    with pytest.raises(ValueError, match="no layer"):
        add_quietly(viewer, fails)
    second = viewer.add_image(np.ones((8, 8)), name="b")  # napari's default again,
    assert viewer.layers.selection.active is second  # also after an add that raised
    layer = add_quietly(viewer, lambda: viewer.add_image(np.ones((8, 8)), name="c"))
    assert layer.name == "c" and viewer.layers.selection.active is second
    last = viewer.add_image(np.ones((8, 8)), name="d")
    assert viewer.layers.selection.active is last

    class OtherNapari:  # a layer list without the switch: added as usual
        layers = object()

    assert add_quietly(OtherNapari(), lambda: "added") == "added"


def test_prepare_process_runs_once_and_leaves_nothing_to_collect(monkeypatch):
    """The dock's once-per-process preparation: napari's layer imports, then a full
    garbage collection, so the first Start's model and layers do not trigger one."""
    import gc
    import sys

    from napari_mobilesam._widgets import _common

    monkeypatch.setattr(_common, "_PREPARED", False)
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    assert _common.prepare_process() is True
    assert calls == [()]
    assert all(name in sys.modules for name in _common.LAYER_IMPORTS)
    assert _common.prepare_process() is False  # once per process
    assert calls == [()]


def test_warm_imports_builds_vispys_dash_patterns_beforehand():
    """The first Labels layer's polygon overlay builds vispy dash patterns (0.2-0.5 s);
    warm_imports (run when the dock is built) fills vispy's cache first, so napari only
    looks them up when Start adds the layers."""
    import threading

    from vispy.visuals.line import dash_atlas

    from napari_mobilesam._widgets._common import warm_imports

    dash_atlas._make_pattern.cache_clear()
    worker = threading.Thread(target=warm_imports)
    worker.start()
    worker.join()
    built = dash_atlas._make_pattern.cache_info()
    assert built.misses == 13 and built.currsize == 13
    dash_atlas.DashAtlas()  # what a line visual does on the GUI thread: lookups only
    assert dash_atlas._make_pattern.cache_info().misses == 13


def test_cancel_precompute_counts_the_plane_start_embedded(
    make_napari_viewer, qtbot, tiny_predictor, monkeypatch, tmp_path
):
    """Start with the disk cache embeds the shown plane and precomputes the others at once:
    the plane it embedded counts among those kept at Cancel."""
    from napari_mobilesam._widgets import PromptWidget

    monkeypatch.setenv("MOBILESAM_EMBEDDINGS", str(tmp_path / "emb"))
    viewer = make_napari_viewer()
    viewer.add_image(_stack(), name="cells", contrast_limits=(0, 4000))
    viewer.dims.current_step = (3, 0, 0)
    gate = Gate(monkeypatch, tiny_predictor, "embed_images")
    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image_combo.setCurrentText("cells")
    w.disk_cache.setChecked(True)
    w.start()  # embeds the shown plane 3, then precomputes 0, 1, 2, 4, 5
    gate.release(2)  # planes 0 and 1
    qtbot.waitUntil(lambda: gate.entered == 3, timeout=WAIT)  # plane 2 runs
    assert w.progress.value() == 2 and w.state.ready == {(0,), (1,), (3,)}
    w.cancel()
    gate.release()
    idle(qtbot, w)
    assert w.state.ready == {(0,), (1,), (2,), (3,)}
    assert w.status.text() == "precompute cancelled: 4 of 6 planes embedded (kept)"
