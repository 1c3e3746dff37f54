"""Headless napari: several boxes on a plane give several objects, in one decoder call,
committed together (issue 19), with the bundled stand-in model on synthetic cells."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.predictor import Predictor

from .widget_support import idle  # skips the module without napari or a display


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-in model's predictor, counting its decoder calls."""
    from napari_mobilesam._widgets import _common
    from napari_mobilesam.build import load_model

    pred = Predictor(load_model("vit_t_synthetic_cells", device="cpu"))
    monkeypatch.setattr(_common, "get_predictor", lambda *a, **k: pred)
    pred.decoder_calls = []
    for name in ("predict", "predict_low_res", "predict_batch", "predict_torch"):
        real = getattr(pred, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            pred.decoder_calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(pred, name, counted)
    return pred


def _rectangle(plane, r0, c0, r1, c1):
    return np.array([[*plane, r0, c0], [*plane, r0, c1], [*plane, r1, c1], [*plane, r1, c0]], float)


def _cell_boxes(truth, n, pad=4):
    ids, areas = np.unique(truth[truth > 0], return_counts=True)
    out = []
    for i in ids[np.argsort(areas)[::-1][:n]]:
        rows, cols = np.nonzero(truth == i)
        out.append((i, (rows.min() - pad, cols.min() - pad, rows.max() + pad, cols.max() + pad)))
    return out


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_two_boxes_give_two_objects_in_one_decoder_call(make_napari_viewer, qtbot, stand_in):
    from napari_mobilesam._widgets import PromptWidget
    from napari_mobilesam.synthetic import cells_2d

    cells = cells_2d((256, 256), seed=0, n_cells=6)
    viewer = make_napari_viewer()
    layer = viewer.add_image(cells.image, name="cells")
    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image_combo.setCurrentText("cells")
    w.start()
    idle(qtbot, w)
    (id_a, box_a), (id_b, box_b) = _cell_boxes(cells.labels, 2)
    w.state.box.add_rectangles(_rectangle((), *box_a))
    idle(qtbot, w)
    assert w.prediction is not None and w.state.predictions is None  # one box: one object
    stand_in.decoder_calls.clear()
    w.state.box.add_rectangles(_rectangle((), *box_b))
    idle(qtbot, w)
    assert stand_in.decoder_calls == ["predict_batch"]  # both objects in one call
    assert w.prediction is None and len(w.state.predictions) == 2
    preview = np.array(w.state.preview.data)  # a copy: the preview is updated in place
    assert set(np.unique(preview)) == {0, 1, 2}
    assert _iou(preview == 1, cells.labels == id_a) > 0.6
    assert _iou(preview == 2, cells.labels == id_b) > 0.6
    assert "2 objects" in w.status.text()

    labels = viewer.layers["cells_labels"]
    assert w.commit() == 1
    assert set(np.unique(labels.data)) == {0, 1, 2}
    np.testing.assert_array_equal(labels.data, preview)
    assert len(w.state.box.data) == 0 and not w.state.preview.data.any()
    assert "objects 1-2" in w.status.text()
    w.undo()  # one undo step for both
    assert labels.data.max() == 0
    assert layer in viewer.layers

    # a's object committed alone first: the two boxes again add b only (not a's fringe)
    w.state.box.add_rectangles(_rectangle((), *box_a))
    idle(qtbot, w)
    assert w.commit() == 1
    w.state.box.add_rectangles(_rectangle((), *box_a))
    w.state.box.add_rectangles(_rectangle((), *box_b))
    idle(qtbot, w)
    assert w.commit() == 2
    assert set(np.unique(labels.data)) == {0, 1, 2}
    assert "committed object 2" in w.status.text()
    assert "(1 mostly inside existing objects skipped)" in w.status.text()


def test_points_go_with_the_box_around_them(make_napari_viewer, qtbot, stand_in):
    from napari_mobilesam._widgets import PromptWidget
    from napari_mobilesam._widgets._multi import plane_objects

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 100, 120), np.uint8), name="stack")
    viewer.dims.current_step = (1, 0, 0)
    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.start()
    idle(qtbot, w)
    state = w.state
    state.box.add_rectangles(_rectangle((1,), 10, 10, 50, 50))
    state.box.add_rectangles(_rectangle((1,), 20, 20, 40, 40))  # inside the first
    state.box.add_rectangles(_rectangle((1,), 60, 70, 90, 110))
    state.box.add_rectangles(_rectangle((0,), 60, 70, 90, 110))  # another plane
    state.points.add(np.array([[1, 30.0, 30.0], [1, 15.0, 15.0], [1, 80.0, 80.0]]))
    w.toggle_negative()
    state.points.add(np.array([[1, 5.0, 100.0], [0, 30.0, 30.0]]))
    idle(qtbot, w)
    objects = plane_objects(state)
    assert len(objects) == 3  # the negative point outside every box is no object
    assert [o.points_rc.tolist() for o in objects] == [[[15, 15]], [[30, 30]], [[80, 80]]]
    np.testing.assert_allclose(objects[1].box_rc, [20, 20, 40, 40])
    assert len(w.state.predictions) == 3
