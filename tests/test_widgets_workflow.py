"""Headless napari: the prompt workflow never loses work (issue 19), on a real viewer.

One test per problem of the issue, with the tiny random model (its box masks are the
same large mask wherever the box is, which is what the overlap tests need), and a
scripted walk over two images with the bundled stand-in model.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from napari_mobilesam.predictor import Predictor

from .widget_support import (  # skips the module without napari or a display
    WAIT,
    everything_widget,
    idle,
)


def _blobs(shape=(96, 120), centers=((40, 50),), value=3000):
    img = np.full(shape, 300, np.uint16)
    for c in centers:
        img[disk(c, 14, shape=shape)] = value
    return img


def _widget(viewer, qtbot, layer=None):
    from napari_mobilesam._widgets import PromptWidget

    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    if layer is not None:
        _start(w, qtbot, layer)
    return w


def _start(w, qtbot, layer):
    w.image_combo.setCurrentText(layer.name)
    w.start()
    idle(qtbot, w)
    assert w.session is not None and w.state.image is layer


def _box(w, qtbot, corners, plane=()):
    (r0, c0), (r1, c1) = corners
    rc = [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]
    w.state.box.add_rectangles(np.array([[*plane, r, c] for r, c in rc], dtype=float))
    idle(qtbot, w)
    assert w.prediction is not None


def _objects(layer) -> set[int]:
    return set(np.unique(np.asarray(layer.data)).tolist()) - {0}


# -- problem 1: one session per image -----------------------------------------------------


def test_each_image_keeps_its_own_layers_and_objects(make_napari_viewer, qtbot, tiny_predictor):
    viewer = make_napari_viewer()
    cells = viewer.add_image(_blobs(), name="cells", contrast_limits=(0, 4000))
    stack = viewer.add_image(np.stack([_blobs((64, 80))] * 4), name="stack")
    w = _widget(viewer, qtbot, cells)
    assert {"cells points", "cells box", "cells preview", "cells_labels"} <= set(
        layer.name for layer in viewer.layers
    )
    _box(w, qtbot, ((20, 30), (60, 70)))
    assert w.commit() == 1
    cells_labels = viewer.layers["cells_labels"]
    first = cells_labels.data.copy()

    # the stack: its own layers, of its dimensionality; the 2D image's layers stay
    viewer.dims.current_step = (2, 0, 0)
    _start(w, qtbot, stack)
    assert viewer.layers["stack points"].ndim == 3 and viewer.layers["stack box"].ndim == 3
    assert viewer.layers["stack_labels"].data.shape == (4, 64, 80)
    assert viewer.layers["cells_labels"] is cells_labels
    np.testing.assert_array_equal(cells_labels.data, first)
    # leftover points on another plane are no prompts on this one
    w.state.points.add(np.array([[0.0, 30.0, 30.0]]))
    idle(qtbot, w)
    assert w.prompts() == (None, None, None) and w.prediction is None
    _box(w, qtbot, ((10, 10), (40, 50)), plane=(2,))
    assert w.commit() == 1
    stack_labels = viewer.layers["stack_labels"]
    assert _objects(stack_labels) == {1} and stack_labels.data[[0, 1, 3]].max() == 0

    # back to the 2D image: its session resumes (labels, undo), no new layer, no Start
    n_layers = len(viewer.layers)
    w.image_combo.setCurrentText("cells")
    idle(qtbot, w)
    assert w.state.labels is cells_labels and w.session is not None
    assert len(viewer.layers) == n_layers
    w.overlap.setCurrentText("overwrite")
    _box(w, qtbot, ((50, 60), (90, 110)))
    assert w.commit() == 2
    w.undo()  # this image's undo step, not the stack's
    np.testing.assert_array_equal(cells_labels.data, first)
    assert _objects(stack_labels) == {1}


def test_shape_mismatch_and_failed_start_touch_no_layer(
    make_napari_viewer, qtbot, tiny_predictor, notes, tmp_path
):
    viewer = make_napari_viewer()
    cells = viewer.add_image(_blobs(), name="cells")
    w = _widget(viewer, qtbot, cells)
    _box(w, qtbot, ((20, 30), (60, 70)))
    w.commit()
    kept = viewer.layers["cells_labels"].data.copy()

    # an image whose labels name is taken by a layer of another shape: a message
    other = viewer.add_image(np.zeros((50, 40), np.uint8), name="other")
    wrong = viewer.add_labels(np.ones((3, 3), np.uint32), name="other_labels")
    names = [layer.name for layer in viewer.layers]
    w.image_combo.setCurrentText("other")
    w.start()
    idle(qtbot, w)
    assert any("'other_labels'" in n and "rename" in n for n in notes)
    assert [layer.name for layer in viewer.layers] == names and w.session is None
    assert viewer.layers["other_labels"] is wrong and wrong.data.shape == (3, 3)

    # a failed Start (bad weights) on an image with labels: nothing removed or added
    viewer.layers.remove(wrong)
    names = [layer.name for layer in viewer.layers]
    w.model.weights.setText(str(tmp_path / "missing.pt"))
    w.image_combo.setCurrentText("cells")
    w.start()
    idle(qtbot, w)
    assert [layer.name for layer in viewer.layers] == names
    np.testing.assert_array_equal(viewer.layers["cells_labels"].data, kept)
    assert "missing.pt" in w.status.text() and "loading" not in w.status.text()
    assert other in viewer.layers


# -- problem 2: commit inside an existing object; handlers never raise --------------------


def test_commit_inside_an_object_follows_the_overlap_option(make_napari_viewer, qtbot,
                                                            tiny_predictor, notes):  # fmt: skip
    from app_model.types import KeyBinding

    viewer = make_napari_viewer()
    cells = viewer.add_image(_blobs(), name="cells")
    w = _widget(viewer, qtbot, cells)
    assert w.overlap.currentText() == "only unlabeled pixels"
    _box(w, qtbot, ((20, 30), (60, 70)))
    assert w.commit() == 1
    labels = w.state.labels
    first = labels.data.copy()
    # the same box again: its mask lies inside the first object
    _box(w, qtbot, ((20, 30), (60, 70)))
    assert w.commit() is None
    assert "overlap: overwrite" in notes[-1]
    np.testing.assert_array_equal(labels.data, first)
    # with a fifth of the object erased, the same mask lies mostly inside it: refused too
    # (it would add the erased pixels as a fragment of its own)
    inside = np.argwhere(labels.data == 1)
    labels.data[tuple(inside[: len(inside) // 5].T)] = 0
    partial = labels.data.copy()
    assert w.commit() is None
    assert "mostly inside existing objects" in notes[-1] and "overlap: overwrite" in notes[-1]
    np.testing.assert_array_equal(labels.data, partial)
    w.overlap.setCurrentText("overwrite")
    assert w.commit() == 2
    assert _objects(labels) == {2}

    # the C key with a read-only labels layer: a message, never an exception in Qt
    _box(w, qtbot, ((30, 40), (50, 60)))
    labels.data.flags.writeable = False
    handler = w.state.points.keymap[KeyBinding.from_str("C")]
    handler(w.state.points)
    assert "read-only" in notes[-1]
    labels.data.flags.writeable = True
    # any other error in a handler also becomes a message
    session = w.session

    def broken(*_a, **_k):
        raise RuntimeError("boom")

    session.commit = broken
    handler(w.state.points)
    assert notes[-1] == "MobileSAM: boom"
    del session.commit
    for key in ("X", "N", "Shift+Z", "Escape"):
        w.state.image.keymap[KeyBinding.from_str(key)](w.state.image)
    assert _objects(labels) == {1}  # Shift-Z undid object 2 and gave object 1 back


# -- problem 3: X cycles the current object's candidates only ----------------------------


def test_x_cycles_this_object_only_and_explains_when_it_cannot(
    make_napari_viewer, qtbot, tiny_predictor, notes
):
    viewer = make_napari_viewer()
    cells = viewer.add_image(_blobs(), name="cells")
    w = _widget(viewer, qtbot, cells)
    w.state.points.add(np.array([[40.0, 50.0]]))
    idle(qtbot, w)
    first = w.prediction
    best = int(np.argmax(first.scores))
    assert len(first.scores) == 3 and first.choice == best
    # X shows the next candidate that has pixels (every one: test_widgets.py's golden
    # test; empty ones skipped: test_x_steps_over_empty_candidates); this tiny model
    # leaves some of them empty
    full = [k for k in range(3) if first.masks[k].any()]
    after = [k for k in ((best + 1) % 3, (best + 2) % 3) if k in full]
    w.next_mask()
    assert w.multimask.currentText() == "best of 3"
    assert w.prediction.choice == (after[0] if after else best)
    np.testing.assert_array_equal(w.state.preview.data.astype(bool),
                                  first.masks[w.prediction.choice])  # fmt: skip
    # the next object starts with the best candidate again
    w.clear()
    w.state.points.add(np.array([[70.0, 90.0]]))
    idle(qtbot, w)
    assert w.prediction.choice == int(np.argmax(w.prediction.scores))
    # two points, or a box: one mask, and X says why it does nothing
    w.state.points.add(np.array([[72.0, 92.0]]))
    idle(qtbot, w)
    w.next_mask()
    assert "2 points" in notes[-1] and w.prediction.choice == 0
    w.clear()
    _box(w, qtbot, ((20, 30), (60, 70)))
    w.next_mask()
    assert "a box" in notes[-1]


def test_x_steps_over_empty_candidates(make_napari_viewer, qtbot, tiny_predictor, notes):
    """An empty candidate (a model may leave one of its three outputs empty) is never
    shown; when every other candidate is empty X says so and keeps the mask shown."""
    import dataclasses

    viewer = make_napari_viewer()
    w = _widget(viewer, qtbot, viewer.add_image(_blobs(), name="cells"))
    w.state.points.add(np.array([[40.0, 50.0]]))
    idle(qtbot, w)
    first = w.state.prediction
    best = first.choice
    masks = np.stack([np.asarray(first.masks[k]) for k in range(3)])
    masks[:] = False
    masks[:, 30:50, 40:60] = True
    masks[(best + 1) % 3] = False  # the next one is empty
    w.state.prediction = dataclasses.replace(first, masks=masks)
    w.next_mask()
    assert w.prediction.choice == (best + 2) % 3
    np.testing.assert_array_equal(w.state.preview.data.astype(bool), masks[(best + 2) % 3])
    masks[best] = False  # now only the one shown has pixels
    w.state.prediction = dataclasses.replace(w.state.prediction, masks=masks)
    w.next_mask()
    assert w.prediction.choice == (best + 2) % 3
    assert "other candidate masks of this click are empty" in notes[-1]


# -- problem 9 (part): prompt conventions --------------------------------------------------


def _click(layer, position, button=1, modifiers=()):
    """A mouse click on ``layer`` at world ``position``, through napari's callbacks."""
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    for kind, callbacks in (("mouse_press", mouse_press_callbacks),
                            ("mouse_release", mouse_release_callbacks)):  # fmt: skip
        event = read_only_mouse_event(
            type=kind, button=button, modifiers=list(modifiers), position=position
        )
        callbacks(layer, event)


def test_green_positive_red_negative_right_click_and_n_reset(
    make_napari_viewer, qtbot, tiny_predictor
):
    viewer = make_napari_viewer()
    cells = viewer.add_image(_blobs(), name="cells")
    w = _widget(viewer, qtbot, cells)
    points = w.state.points
    assert points.mode == "add"
    _click(points, (40, 50))
    _click(points, (10, 10), button=2)  # right-click
    _click(points, (12, 12), modifiers=("Shift",))
    _click(points, (42, 52))
    idle(qtbot, w)
    assert points.features["positive"].tolist() == [True, False, False, True]
    green, red = [0, 1, 0, 1], [1, 0, 0, 1]
    np.testing.assert_allclose(points.face_color, [green, red, red, green])
    assert w.prompts()[1].tolist() == [1, 0, 0, 1]
    # N: negative until toggled back, or until the object is committed
    w.clear()
    w.toggle_negative()
    _click(points, (30, 30))
    assert points.features["positive"].tolist() == [False]
    _box(w, qtbot, ((20, 30), (60, 70)))
    assert w.commit() == 1
    assert not w.negative_box.isChecked()
    _click(points, (40, 50))
    idle(qtbot, w)
    assert points.features["positive"].tolist() == [True]
    np.testing.assert_allclose(points.face_color, [green])


# -- problem 5: segment everything per plane, and into the session's labels ---------------


def _everything(viewer, qtbot, image_name):
    return everything_widget(viewer, image_name)


def test_everything_per_plane_then_commit_to_labels(make_napari_viewer, qtbot, tiny_predictor):
    viewer = make_napari_viewer()
    stack = np.stack([_blobs(centers=((40, 50), (70, 95)))] * 3)
    viewer.add_image(stack, name="cells")
    e = _everything(viewer, qtbot, "cells")
    viewer.dims.current_step = (0, 0, 0)
    e.run()
    idle(qtbot, e)
    result = viewer.layers["cells everything"]
    plane0 = result.data[0].copy()
    assert plane0.max() > 0 and result.data[1:].max() == 0
    viewer.dims.current_step = (2, 0, 0)
    e.run()
    idle(qtbot, e)
    assert viewer.layers["cells everything"] is result  # updated, not replaced
    np.testing.assert_array_equal(result.data[0], plane0)  # plane 0 kept its objects
    assert result.data[2].max() > 0 and result.data[1].max() == 0

    # commit the shown plane (2) into cells_labels, which already holds an object on 0
    labels = viewer.add_labels(np.zeros(stack.shape, np.uint32), name="cells_labels")
    labels.data[0, :10, :10] = 1
    ids = e.commit_to_labels()
    n2 = len(np.unique(result.data[2])) - 1
    assert ids == list(range(2, 2 + n2))
    np.testing.assert_array_equal(labels.data[2] > 0, result.data[2] > 0)
    assert labels.data[1].max() == 0 and (labels.data[0] == 1).sum() == 100
    # the whole stack: plane 0's objects only where plane 0 is unlabeled; nothing twice
    e.scope.setCurrentIndex(1)
    before = labels.data.copy()
    ids = e.commit_to_labels()
    assert min(ids) == before.max() + 1
    np.testing.assert_array_equal(labels.data[2], before[2])  # already committed
    assert (labels.data[0, :10, :10] == 1).all()  # the existing object is untouched
    assert set(np.unique(labels.data[0])) - {0, 1} == set(ids)


def test_commit_to_labels_skips_objects_already_committed(
    make_napari_viewer, qtbot, tiny_predictor
):
    """An everything object that a prompt already committed (all but a few pixels) is not
    added again as a sliver; the others are."""
    viewer = make_napari_viewer()
    viewer.add_image(_blobs(centers=((40, 50), (70, 95))), name="cells")
    e = _everything(viewer, qtbot, "cells")
    e.run()
    idle(qtbot, e)
    result = viewer.layers["cells everything"]
    found = np.zeros(result.data.shape, result.data.dtype)  # the two blobs as its objects
    found[disk((40, 50), 14, shape=found.shape)] = 1
    found[disk((70, 95), 14, shape=found.shape)] = 2
    result.data = found.copy()
    ids, areas = np.unique(found[found > 0], return_counts=True)
    k = int(ids[np.argmax(areas)])
    committed = np.where(found == k, 7, 0).astype(np.uint32)
    sliver = np.argwhere(found == k)[:3]
    committed[tuple(sliver.T)] = 0  # the prompt's mask missed 3 of its pixels
    labels = viewer.add_labels(committed.copy(), name="cells_labels")
    new = e.commit_to_labels()
    assert len(new) == len(ids) - 1 and "1 mostly inside existing objects skipped" in (
        e.status.text()
    )
    assert (labels.data[tuple(sliver.T)] == 0).all()  # no 3-pixel object
    np.testing.assert_array_equal(labels.data > 0, (found > 0) & ~(
        (found == k) & (committed == 0)
    ))  # fmt: skip


def test_commit_to_labels_without_objects_makes_no_layer(
    make_napari_viewer, qtbot, tiny_predictor, notes
):
    viewer = make_napari_viewer()
    viewer.add_image(_blobs(), name="cells")
    e = _everything(viewer, qtbot, "cells")
    e.run()
    idle(qtbot, e)
    result = viewer.layers["cells everything"]
    result.data = np.zeros(result.data.shape, result.data.dtype)  # nothing found
    assert e.commit_to_labels() == []
    assert notes[-1] == "MobileSAM: nothing to commit: no object was found on the image"
    assert "cells_labels" not in viewer.layers


def test_drop_covered_keeps_objects_mostly_unlabeled():
    from napari_mobilesam.interactive import drop_covered

    objects = np.zeros((6, 6), np.uint16)
    objects[:2, :3] = 1  # 6 px, 4 labeled: dropped
    objects[3:, :2] = 2  # 6 px, 3 labeled: kept at min_free 0.5
    objects[3:, 4:] = 3  # free
    labels = np.zeros((6, 6), np.uint32)
    labels[:2, :2] = 9
    labels[3:, 0] = 9
    kept = drop_covered(objects, labels)
    assert kept.dtype == objects.dtype and set(np.unique(kept)) == {0, 2, 3}
    np.testing.assert_array_equal(kept[3:, :2], 2)
    assert set(np.unique(drop_covered(objects, labels, min_free=0.6))) == {0, 3}
    again, dropped = drop_covered(objects, labels, min_free=0.6, return_dropped=True)
    assert dropped == 2 and np.array_equal(again, drop_covered(objects, labels, min_free=0.6))
    assert set(np.unique(drop_covered(objects, labels, min_free=0.0))) == {0, 1, 2, 3}
    assert drop_covered(np.zeros((0, 4), np.uint8), np.zeros((0, 4), np.uint32)).shape == (0, 4)
    with pytest.raises(ValueError, match="shape"):
        drop_covered(objects[:3], labels)
    with pytest.raises(ValueError, match="min_free"):
        drop_covered(objects, labels, min_free=1.5)


def test_add_objects_refuses_ids_that_do_not_fit():
    from napari_mobilesam.interactive import add_objects

    labels = np.zeros((4, 4), np.uint8)
    labels[0, 1] = 250  # object 1's only pixel is labeled: it is skipped
    objects = np.arange(16).reshape(4, 4)
    with pytest.raises(ValueError, match="do not fit"):
        add_objects(labels, objects)
    assert labels.sum() == 250
    with pytest.raises(ValueError, match="shape"):
        add_objects(labels, objects[:2])
    assert add_objects(labels, objects, start=1) == list(range(1, 15))
    assert labels[0, 1] == 250 and labels[3, 3] == 14 and labels[0, 0] == 0


# -- problem 6: the status line says what runs now ----------------------------------------


def test_status_clears_when_idle_and_cancel_waits_for_the_work(
    make_napari_viewer, qtbot, tiny_predictor
):
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_blobs()] * 30), name="cells")
    w = _widget(viewer, qtbot, viewer.layers["cells"])
    viewer.dims.current_step = (3, 0, 0)
    qtbot.waitUntil(
        lambda: "computing the embedding of plane (3,)" in w.status.text(), timeout=WAIT
    )
    idle(qtbot, w)
    assert "computing" not in w.status.text()

    e = _everything(viewer, qtbot, "cells")
    e.scope.setCurrentIndex(1)
    e.run()
    qtbot.waitUntil(lambda: e.progress.value() >= 1, timeout=WAIT)
    e.cancel()
    assert e.runner.busy  # the plane being segmented still runs
    assert e.status.text().startswith("cancelling") and not e.cancel_button.isEnabled()
    idle(qtbot, e)
    assert e.status.text().startswith("cancelled; the ") and e.run_button.isEnabled()
    kept = viewer.layers["cells everything"].data
    assert 1 <= sum(kept[z].any() for z in range(30)) < 30  # the planes done stay


# -- problem 7: a stack shorter than the slider's range -----------------------------------


def test_shorter_stack_beyond_the_slider_is_refused(
    make_napari_viewer, qtbot, tiny_predictor, notes, monkeypatch
):
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_blobs()] * 12), name="long")
    short = viewer.add_image(np.stack([_blobs()] * 3), name="short")
    embedded = []
    real = tiny_predictor.set_image
    monkeypatch.setattr(
        tiny_predictor, "set_image", lambda *a, **k: embedded.append(1) or real(*a, **k)
    )
    viewer.dims.current_step = (5, 0, 0)
    w = _widget(viewer, qtbot, short)
    assert embedded == [] and w.session.current is None
    assert "beyond 'short'" in w.status.text() and "slider" in w.status.text()
    w.state.box.add_rectangles(np.array([[5, 20, 30], [5, 20, 70], [5, 60, 70], [5, 60, 30.0]]))
    idle(qtbot, w)
    assert w.prediction is None and w.commit() is None
    e = _everything(viewer, qtbot, "short")
    e.run()
    idle(qtbot, e)
    assert "beyond 'short'" in notes[-1] and "short everything" not in viewer.layers
    viewer.dims.current_step = (1, 0, 0)
    idle(qtbot, w)
    assert w.session.current == (1,) and embedded == [1]


# -- problem 8: saving and opening ---------------------------------------------------------


def test_labels_save_as_image_labels_tif_and_open_with_the_plugin(
    make_napari_viewer, qtbot, tiny_predictor, tmp_path
):
    import tifffile
    from napari.plugins import _npe2

    from napari_mobilesam import napari_io

    viewer = make_napari_viewer()
    cells = viewer.add_image(_blobs(), name="cells")
    w = _widget(viewer, qtbot, cells)
    _box(w, qtbot, ((20, 30), (60, 70)))
    w.commit()
    labels = w.state.labels
    filters, _ = _npe2.file_extensions_string_for_layers([labels])
    assert (
        "MobileSAM labels TIFF (*.tif *.tiff)" in filters and "MobileSAM MobileSAM" not in filters
    )
    # napari's save dialog suggests the layer's name: cells_labels.tif, what the reader opens
    path = tmp_path / f"{labels.name}.tif"
    viewer.layers.selection.active = labels
    viewer.layers.save(str(path), selected=True, plugin="napari-mobilesam")
    assert (tmp_path / "cells_labels.json").is_file()
    viewer.layers.remove(labels)
    (opened,) = viewer.open(str(path), plugin="napari-mobilesam")
    assert opened.name == "cells_labels" and type(opened).__name__ == "Labels"
    assert opened.metadata["mobilesam"]["tool"] == "napari-mobilesam"
    assert _objects(opened) == {1}
    # a *_labels.tif from elsewhere (no provenance beside it) opens as labels too
    tifffile.imwrite(tmp_path / "other_labels.tif", np.zeros((4, 4), np.uint8))
    assert napari_io.get_reader(str(tmp_path / "other_labels.tif")) is not None
    # the reopened labels are this image's session labels again
    w.image_combo.setCurrentText("cells")
    w.start()
    idle(qtbot, w)
    assert w.state.labels is opened


def test_labels_tif_opens_without_choose_reader(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """napari asks "Choose reader" when two readers match a name (ours: *_labels.tif; its
    own: *.tif), unless a reader preference settles it: the widgets add one."""
    import tifffile
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    from napari_mobilesam._widgets import ObjectsWidget, PromptWidget, _reader_preference

    notes: list[str] = []
    monkeypatch.setattr(_reader_preference, "show_info", notes.append)
    viewer = make_napari_viewer()
    path = tmp_path / "cells_labels.tif"
    tifffile.imwrite(path, np.eye(6, dtype=np.uint16))
    with pytest.raises(MultipleReaderError):  # what File > Open turns into the dialog
        viewer.open(str(path), plugin=None)
    w = PromptWidget(viewer)
    qtbot.addWidget(w)
    assert "open as labels" in notes[-1] and "Preferences" in notes[-1]
    (layer,) = viewer.open(str(path), plugin=None)
    assert type(layer).__name__ == "Labels" and layer.name == "cells_labels"
    (layer,) = viewer.open(str(tmp_path / "cells_labels.tif"), plugin=None)
    np.testing.assert_array_equal(np.asarray(layer.data), np.eye(6))
    # once set, the next widget says nothing more
    count = len(notes)
    qtbot.addWidget(ObjectsWidget(viewer))
    assert len(notes) == count
    # a user's own choice for such files is kept
    get_settings().plugins.extension2reader = {"*.tiff": "napari"}
    qtbot.addWidget(PromptWidget(viewer))
    assert get_settings().plugins.extension2reader == {
        "*.tiff": "napari",
        "*_labels.tif": "napari-mobilesam",
    }


# -- problem 9 (part): the image defaults to the selected or top visible one ---------------


def test_image_combo_defaults_to_selected_then_top_visible(make_napari_viewer, qtbot):
    from napari_mobilesam._widgets import EverythingWidget, PromptWidget

    viewer = make_napari_viewer()
    w0 = PromptWidget(viewer)
    qtbot.addWidget(w0)
    assert w0.image_combo.currentText() == ""
    viewer.add_image(np.zeros((8, 8)), name="a")
    assert w0.image_combo.currentText() == "a"  # the first image, once there is one
    b = viewer.add_image(np.zeros((8, 8)), name="b")
    c = viewer.add_image(np.zeros((8, 8)), name="c", visible=False)
    viewer.layers.selection.active = b
    for kind in (PromptWidget, EverythingWidget):
        w = kind(viewer)
        qtbot.addWidget(w)
        assert w.image_combo.currentText() == "b"  # the selected image, not the first
    viewer.add_points(name="p")  # selected, not an image: the top visible image
    w = PromptWidget(viewer)
    qtbot.addWidget(w)
    assert w.image_combo.currentText() == "b" and c.name in _items(w.image_combo)
    # the list follows the layers: renamed, removed (-> top visible), added
    viewer.layers["b"].name = "b2"
    assert w.image_combo.currentText() == "b2"
    viewer.layers.remove("b2")
    assert w.image_combo.currentText() == "a" and _items(w.image_combo) == ["a", "c"]
    viewer.add_image(np.zeros((8, 8)), name="d")
    assert _items(w.image_combo) == ["a", "c", "d"] and w.image_combo.currentText() == "a"


def _items(combo) -> list[str]:
    return [combo.itemText(i) for i in range(combo.count())]


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
    w = _widget(viewer, qtbot)
    w.model.name.setCurrentText("vit_t_synthetic_cells")
    expected: dict[str, np.ndarray] = {}

    def visit(name, plane=None):
        if plane is not None:
            viewer.dims.current_step = (plane, 0, 0)
        w.image_combo.setCurrentText(name)
        idle(qtbot, w)
        if w.session is None:
            _start(w, qtbot, layers[name])
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
    _box(w, qtbot, ((25, 25), (85, 85)))
    assert w.commit() == 1
    expected["coins"] = viewer.layers["coins_labels"].data.copy()
    visit("stack", plane=2)
    assert commit_point("stack", s2, plane=(2,)) == 2
    visit("cells")
    visit("coins")
    visit("stack", plane=1)
    assert {name: _objects(viewer.layers[f"{name}_labels"]) for name in layers} == {
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
    w = _widget(viewer, qtbot)
    w.image_combo.setCurrentText("x")
    w.start_button.click()
    assert "'x points'" in notes[-1] and "Shapes" in notes[-1] and w.session is None
    viewer.layers.remove(shapes)
    preview = viewer.add_labels(np.zeros((4, 4), np.uint8), name="x preview")  # another shape
    w.start_button.click()
    assert "'x preview'" in notes[-1] and w.session is None
    viewer.layers.remove(preview)
    n_layers = len(viewer.layers)
    e = _everything(viewer, qtbot, "x")
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
    cells = viewer.add_image(_blobs(), name="cells", contrast_limits=(0, 60000))
    other = viewer.add_image(_blobs(centers=((30, 30),)), name="other")
    w = _widget(viewer, qtbot, cells)
    first = w.session
    assert w.state.limits == (0.0, 60000.0)
    _box(w, qtbot, ((20, 30), (60, 70)))
    assert w.commit() == 1

    cells.contrast_limits = (200, 4000)  # e.g. the user drags the contrast slider
    qtbot.waitUntil(lambda: w.session is not first, timeout=WAIT)
    idle(qtbot, w)
    assert w.state.limits == (200.0, 4000.0) and w.state.image is cells
    want = PromptSession(tiny_predictor, cells.data, contrast_limits=(200.0, 4000.0))
    assert w.session.contrast_limits == want.contrast_limits != first.contrast_limits
    assert w.state.plane == () and () in w.state.ready  # the shown plane embedded again
    assert _objects(w.state.labels) == {1}  # objects and undo steps kept
    w.undo()
    assert _objects(w.state.labels) == set()

    # changed while another image is chosen: its session starts again when chosen
    _start(w, qtbot, other)
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
    cells = viewer.add_image(_blobs(), name="cells")
    viewer.add_image(_blobs(centers=((30, 30),)), name="other")
    w = _widget(viewer, qtbot)
    w.image_combo.setCurrentText("cells")
    w.start()
    w.image_combo.setCurrentText("other")  # before the model has loaded
    idle(qtbot, w)
    assert w.session_of(cells).session is not None  # cells' session was made...
    assert w.state is None and w.status.text() == "press Start to segment 'other'"  # ...quietly
