"""Headless napari: the prompt widget propagates every committed object of the shown plane
at once (issue 20), on a real viewer.

The encoder is held at a gate (a semaphore the test releases plane by plane), so each
test decides exactly when a plane finishes: nothing depends on how fast the machine is.
"""

from __future__ import annotations

import numpy as np
from skimage.draw import disk

from napari_mobilesam.interactive.objects import scores_from

from .widget_support import (  # skips the module without napari or a display
    WAIT,
    Gate,
    idle,
)

SHAPE = (64, 80)
CENTRES = {1: (24, 22), 2: (40, 56)}  # the committed objects' disks on plane 0


def _stack(n=6):
    """``n`` planes that differ (so no plane is another's cache hit), two blobs each."""
    planes = []
    for z in range(n):
        img = np.full(SHAPE, 300 + z, np.uint16)
        for centre in CENTRES.values():
            img[disk((centre[0], centre[1] + z), 9, shape=SHAPE)] = 3000
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


def _any_area(monkeypatch, session):
    """Random weights: masks of any area change are accepted (the widget has no control
    for it; its default 0.3 stops the tiny model's masks at once)."""
    real = session.propagate_all
    monkeypatch.setattr(
        session, "propagate_all", lambda *a, **k: real(*a, **{**k, "min_area_ratio": 1e-6})
    )


def _with_objects(make_napari_viewer, qtbot, monkeypatch, n=6):
    """A viewer on plane 0 of the stack, the widget started, objects 1 and 2 committed
    on plane 0 (painted into the image's labels), any score and area accepted, forward."""
    viewer = make_napari_viewer()
    layer = viewer.add_image(_stack(n), name="cells", contrast_limits=(0, 4000))
    viewer.dims.current_step = (0, 0, 0)
    w = _widget(viewer, qtbot, layer)
    for i, centre in CENTRES.items():
        w.state.labels.data[0][disk(centre, 9, shape=SHAPE)] = i
    w.prop_min_score.setValue(0.0)  # random weights: any score
    w.prop_direction.setCurrentText("forward")
    _any_area(monkeypatch, w.session)
    return viewer, w


def _planes_of(labels, i):
    return [z for z in range(len(labels)) if (labels[z] == i).any()]


def test_propagate_all_commits_each_object_with_its_id_and_scores(
    make_napari_viewer, qtbot, tiny_predictor, monkeypatch
):
    _viewer, w = _with_objects(make_napari_viewer, qtbot, monkeypatch)
    assert w.prop_all_button.isEnabled()
    gate = Gate(monkeypatch, tiny_predictor, "set_image")  # the encoder of each next plane
    w.propagate_all()
    assert w.cancel_button.isEnabled() and "propagating 2 objects" in w.status.text()
    gate.release()  # plane 1
    qtbot.waitUntil(lambda: "plane 1" in w.status.text(), timeout=WAIT)
    assert w.status.text() == "propagating 2 objects forward: plane 1 (2 still going)"
    gate.release(10)
    idle(qtbot, w)
    labels = w.state.labels.data
    assert set(np.unique(labels)) == {0, 1, 2}  # the objects' own ids, no new ones
    found = {i: _planes_of(labels, i) for i in CENTRES}
    assert all(planes[:2] == [0, 1] for planes in found.values())
    scores = scores_from(w.state.labels.features, 1)
    for i, planes in found.items():  # each propagated plane has its scores
        for z in planes[1:]:
            assert np.isfinite(scores[((z,), i)]).all() and 0 <= scores[((z,), i)][1] <= 1
    # every object walks planes 1-5 (any score and area); where the tiny model's masks of
    # the two overlap, the higher predicted IoU keeps the pixels and the other is skipped
    n_planes = sum(len(p) - 1 for p in found.values())
    skipped = 10 - n_planes
    note = f"; {skipped} inside other objects, skipped" if skipped else ""
    assert w.status.text() == (
        f"2 objects propagated to {n_planes} more object planes (planes per object: "
        f"1: 5, 2: 5{note})"
    )
    assert {(z,) for p in found.values() for z in p} <= w.state.ready
    assert not w.cancel_button.isEnabled()


def test_cancel_keeps_the_planes_done(make_napari_viewer, qtbot, tiny_predictor, monkeypatch):
    _viewer, w = _with_objects(make_napari_viewer, qtbot, monkeypatch, n=8)
    gate = Gate(monkeypatch, tiny_predictor, "set_image")
    w.propagate_all()
    gate.release(2)  # planes 1 and 2
    qtbot.waitUntil(lambda: gate.entered == 3, timeout=WAIT)  # plane 3 runs
    w.cancel()
    assert w.status.text().startswith("cancelling") and not w.cancel_button.isEnabled()
    gate.release()
    idle(qtbot, w)
    assert gate.entered == 3  # no plane after the one that ran
    labels = w.state.labels.data
    assert _planes_of(labels, 1) == [0, 1, 2, 3]
    assert set(_planes_of(labels, 2)) <= {0, 1, 2, 3}
    assert w.status.text().startswith("propagation cancelled: 2 objects propagated to ")
    assert "(planes per object: 1: 3, 2: 3" in w.status.text()


def test_propagate_all_needs_objects_and_one_propagation_at_a_time(
    make_napari_viewer, qtbot, tiny_predictor, monkeypatch, notes
):
    said = notes
    viewer = make_napari_viewer()
    layer = viewer.add_image(_stack(), name="cells", contrast_limits=(0, 4000))
    from napari_mobilesam._widgets import PromptWidget

    before = PromptWidget(viewer)
    before.image_combo.setCurrentText(layer.name)
    before.propagate_all()
    assert said == ["MobileSAM: press Start first"]

    viewer.dims.current_step = (0, 0, 0)
    w = _widget(viewer, qtbot, layer)
    w.propagate_all()
    assert said[-1] == "MobileSAM: no committed objects on this plane: commit some first"
    assert not w.runner.busy

    w.state.labels.data[0][disk(CENTRES[1], 9, shape=SHAPE)] = 1
    _any_area(monkeypatch, w.session)
    gate = Gate(monkeypatch, tiny_predictor, "set_image")
    w.propagate_all()
    w.propagate_all()  # refused while the first runs
    assert said[-1] == "MobileSAM: a propagation runs: wait for it, or Cancel it"
    gate.release(10)
    idle(qtbot, w)
    assert w.status.text().startswith("1 object propagated to")
