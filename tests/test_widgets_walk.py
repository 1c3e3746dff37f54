"""Headless napari: the scripted walk over three images with the bundled stand-in model
(objects on each, back and forth: none is lost), and a contrast change restarting the
session with the new limits (issue 19, on a real viewer; the problem-by-problem tests are
in test_widgets_workflow.py)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.predictor import Predictor

from .widget_support import (  # skips the module without napari or a display
    WAIT,
    blobs,
    draw_box,
    everything_widget,
    idle,
    object_ids,
    prompt_widget,
    start_session,
)

# -- the scripted walk: three images, objects on each, back and forth ---------------------


@pytest.fixture(scope="module")
def stand_in_model():
    from napari_mobilesam.build import load_model

    return load_model("vit_t_synthetic_cells", device="cpu")


def _interior(mask: np.ndarray) -> tuple[float, float]:
    """The most interior pixel (row, col) of a bool mask."""
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(depth)), mask.shape)
    return float(r), float(c)


def _far_apart_cells(truth: np.ndarray, n: int) -> list[tuple[float, float]]:
    """Interior points of the ``n`` largest objects of a label plane."""
    ids, areas = np.unique(truth[truth > 0], return_counts=True)
    return [_interior(truth == i) for i in ids[np.argsort(areas)[::-1][:n]]]


@pytest.mark.slow  # ~9 s: three images, real-size model
def test_walk_commits_on_three_images_and_every_object_stays(
    make_napari_viewer, qtbot, stand_in_model, monkeypatch
):
    from skimage.data import coins

    from napari_mobilesam._widgets import _common
    from napari_mobilesam.synthetic import cells_2d, cells_3d

    predictor = Predictor(stand_in_model)
    monkeypatch.setattr(_common, "get_predictor", lambda *a, **k: predictor)
    cells = cells_2d((256, 256), seed=0, n_cells=6)
    stack = cells_3d((4, 160, 160), seed=1, n_cells=5)
    viewer = make_napari_viewer()
    layers = {
        "cells": viewer.add_image(cells.image, name="cells"),
        "stack": viewer.add_image(stack.image, name="stack"),
        "coins": viewer.add_image(coins()[:160, :200], name="coins"),
    }
    w = prompt_widget(viewer, qtbot)
    w.model.name.setCurrentText("vit_t_synthetic_cells")
    expected: dict[str, np.ndarray] = {}

    def visit(name, plane=None):
        if plane is not None:
            viewer.dims.current_step = (plane, 0, 0)
        w.image_combo.setCurrentText(name)
        idle(qtbot, w)
        if w.session is None:
            start_session(w, qtbot, layers[name])
        # everything committed so far is still there, in each image's own labels
        for other, data in expected.items():
            np.testing.assert_array_equal(viewer.layers[f"{other}_labels"].data, data)

    def commit_point(name, rc, plane=()):
        w.state.points.add(np.array([[*plane, *rc]]))
        idle(qtbot, w)
        new_id = w.commit()
        assert new_id is not None, (name, rc, plane)
        expected[name] = viewer.layers[f"{name}_labels"].data.copy()
        return new_id

    a, b = _far_apart_cells(cells.labels, 2)
    s1 = _far_apart_cells(stack.labels[1], 1)[0]
    s2 = _far_apart_cells(stack.labels[2], 2)[1]
    visit("cells")
    assert commit_point("cells", a) == 1
    visit("stack", plane=1)
    assert commit_point("stack", s1, plane=(1,)) == 1
    visit("cells")
    assert commit_point("cells", b) == 2
    visit("coins")
    # a box the stand-in model (trained on cells only) answers with a coin's mask
    draw_box(w, qtbot, ((25, 25), (85, 85)))
    assert w.commit() == 1
    expected["coins"] = viewer.layers["coins_labels"].data.copy()
    visit("stack", plane=2)
    assert commit_point("stack", s2, plane=(2,)) == 2
    visit("cells")
    visit("coins")
    visit("stack", plane=1)
    assert {name: object_ids(viewer.layers[f"{name}_labels"]) for name in layers} == {
        "cells": {1, 2}, "stack": {1, 2}, "coins": {1},
    }  # fmt: skip
    stack_labels = viewer.layers["stack_labels"].data
    assert set(np.unique(stack_labels[1])) == {0, 1} and set(np.unique(stack_labels[2])) == {0, 2}


def test_layers_of_the_names_that_do_not_fit_are_messages(
    make_napari_viewer, qtbot, tiny_predictor, notes
):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 40, 50), np.uint8), name="x")
    shapes = viewer.add_shapes(name="x points")  # another kind
    w = prompt_widget(viewer, qtbot)
    w.image_combo.setCurrentText("x")
    w.start_button.click()
    assert "'x points'" in notes[-1] and "Shapes" in notes[-1] and w.session is None
    viewer.layers.remove(shapes)
    preview = viewer.add_labels(np.zeros((4, 4), np.uint8), name="x preview")  # another shape
    w.start_button.click()
    assert "'x preview'" in notes[-1] and w.session is None
    viewer.layers.remove(preview)
    n_layers = len(viewer.layers)
    e = everything_widget(viewer, "x")
    viewer.add_labels(np.zeros((40, 50), np.uint32), name="x everything")
    e.run_button.click()  # a button: the error is a message
    assert "'x everything'" in notes[-1] and not e.runner.busy
    e.commit_button.click()
    assert "'x everything'" in notes[-1] and len(viewer.layers) == n_layers + 1


# -- contrast: the model sees what the user sees --------------------------------------------


def test_a_contrast_change_starts_the_session_again_with_the_new_limits(
    make_napari_viewer, qtbot, tiny_predictor
):
    from napari_mobilesam.interactive import PromptSession

    viewer = make_napari_viewer()
    cells = viewer.add_image(blobs(), name="cells", contrast_limits=(0, 60000))
    other = viewer.add_image(blobs(centers=((30, 30),)), name="other")
    w = prompt_widget(viewer, qtbot, cells)
    first = w.session
    assert w.state.limits == (0.0, 60000.0)
    draw_box(w, qtbot, ((20, 30), (60, 70)))
    assert w.commit() == 1

    cells.contrast_limits = (200, 4000)  # e.g. the user drags the contrast slider
    qtbot.waitUntil(lambda: w.session is not first, timeout=WAIT)
    idle(qtbot, w)
    assert w.state.limits == (200.0, 4000.0) and w.state.image is cells
    want = PromptSession(tiny_predictor, cells.data, contrast_limits=(200.0, 4000.0))
    assert w.session.contrast_limits == want.contrast_limits != first.contrast_limits
    assert w.state.plane == () and () in w.state.ready  # the shown plane embedded again
    assert object_ids(w.state.labels) == {1}  # objects and undo steps kept
    w.undo()
    assert object_ids(w.state.labels) == set()

    # changed while another image is chosen: its session starts again when chosen
    start_session(w, qtbot, other)
    second = w.session_of(cells).session
    cells.contrast_limits = (100, 5000)
    qtbot.wait(50)
    assert w.session_of(cells).session is second and w.state.image is other
    w.image_combo.setCurrentText("cells")
    qtbot.waitUntil(lambda: w.session is not second, timeout=WAIT)
    idle(qtbot, w)
    assert w.state.limits == (100.0, 5000.0)


def test_choosing_another_image_during_start_keeps_its_status(make_napari_viewer, qtbot,
                                                              tiny_predictor):  # fmt: skip
    viewer = make_napari_viewer()
    cells = viewer.add_image(blobs(), name="cells")
    viewer.add_image(blobs(centers=((30, 30),)), name="other")
    w = prompt_widget(viewer, qtbot)
    w.image_combo.setCurrentText("cells")
    w.start()
    w.image_combo.setCurrentText("other")  # before the model has loaded
    idle(qtbot, w)
    assert w.session_of(cells).session is not None  # cells' session was made...
    assert w.state is None and w.status.text() == "press Start to segment 'other'"  # ...quietly
