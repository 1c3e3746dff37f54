"""Headless napari: the prompt workflow never loses work (issue 19), on a real viewer.

One test per problem of the issue, with the tiny random model (its box masks are the
same large mask wherever the box is, which is what the overlap tests need). The scripted
walk over three images with the bundled stand-in model is in test_widgets_walk.py; the
shared helpers (``blobs``, ``prompt_widget``, ``draw_box``, ...) in widget_support.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

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

# -- problem 1: one session per image -----------------------------------------------------


def test_each_image_keeps_its_own_layers_and_objects(make_napari_viewer, qtbot, tiny_predictor):
    viewer = make_napari_viewer()
    cells = viewer.add_image(blobs(), name="cells", contrast_limits=(0, 4000))
    stack = viewer.add_image(np.stack([blobs((64, 80))] * 4), name="stack")
    w = prompt_widget(viewer, qtbot, cells)
    assert {"cells points", "cells box", "cells preview", "cells_labels"} <= set(
        layer.name for layer in viewer.layers
    )
    draw_box(w, qtbot, ((20, 30), (60, 70)))
    assert w.commit() == 1
    cells_labels = viewer.layers["cells_labels"]
    first = cells_labels.data.copy()

    # the stack: its own layers, of its dimensionality; the 2D image's layers stay
    viewer.dims.current_step = (2, 0, 0)
    start_session(w, qtbot, stack)
    assert viewer.layers["stack points"].ndim == 3 and viewer.layers["stack box"].ndim == 3
    assert viewer.layers["stack_labels"].data.shape == (4, 64, 80)
    assert viewer.layers["cells_labels"] is cells_labels
    np.testing.assert_array_equal(cells_labels.data, first)
    # leftover points on another plane are no prompts on this one
    w.state.points.add(np.array([[0.0, 30.0, 30.0]]))
    idle(qtbot, w)
    assert w.prompts() == (None, None, None) and w.prediction is None
    draw_box(w, qtbot, ((10, 10), (40, 50)), plane=(2,))
    assert w.commit() == 1
    stack_labels = viewer.layers["stack_labels"]
    assert object_ids(stack_labels) == {1} and stack_labels.data[[0, 1, 3]].max() == 0

    # back to the 2D image: its session resumes (labels, undo), no new layer, no Start
    n_layers = len(viewer.layers)
    w.image_combo.setCurrentText("cells")
    idle(qtbot, w)
    assert w.state.labels is cells_labels and w.session is not None
    assert len(viewer.layers) == n_layers
    w.overlap.setCurrentText("overwrite")
    draw_box(w, qtbot, ((50, 60), (90, 110)))
    assert w.commit() == 2
    w.undo()  # this image's undo step, not the stack's
    np.testing.assert_array_equal(cells_labels.data, first)
    assert object_ids(stack_labels) == {1}


def test_shape_mismatch_and_failed_start_touch_no_layer(
    make_napari_viewer, qtbot, tiny_predictor, notes, tmp_path
):
    viewer = make_napari_viewer()
    cells = viewer.add_image(blobs(), name="cells")
    w = prompt_widget(viewer, qtbot, cells)
    draw_box(w, qtbot, ((20, 30), (60, 70)))
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
    cells = viewer.add_image(blobs(), name="cells")
    w = prompt_widget(viewer, qtbot, cells)
    assert w.overlap.currentText() == "only unlabeled pixels"
    draw_box(w, qtbot, ((20, 30), (60, 70)))
    assert w.commit() == 1
    labels = w.state.labels
    first = labels.data.copy()
    # the same box again: its mask lies inside the first object
    draw_box(w, qtbot, ((20, 30), (60, 70)))
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
    assert object_ids(labels) == {2}

    # the C key with a read-only labels layer: a message, never an exception in Qt
    draw_box(w, qtbot, ((30, 40), (50, 60)))
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
    assert object_ids(labels) == {1}  # Shift-Z undid object 2 and gave object 1 back


# -- problem 3: X cycles the current object's candidates only ----------------------------


def test_x_cycles_this_object_only_and_explains_when_it_cannot(
    make_napari_viewer, qtbot, tiny_predictor, notes
):
    viewer = make_napari_viewer()
    cells = viewer.add_image(blobs(), name="cells")
    w = prompt_widget(viewer, qtbot, cells)
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
    draw_box(w, qtbot, ((20, 30), (60, 70)))
    w.next_mask()
    assert "a box" in notes[-1]


def test_x_steps_over_empty_candidates(make_napari_viewer, qtbot, tiny_predictor, notes):
    """An empty candidate (a model may leave one of its three outputs empty) is never
    shown; when every other candidate is empty X says so and keeps the mask shown."""
    import dataclasses

    viewer = make_napari_viewer()
    w = prompt_widget(viewer, qtbot, viewer.add_image(blobs(), name="cells"))
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
    cells = viewer.add_image(blobs(), name="cells")
    w = prompt_widget(viewer, qtbot, cells)
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
    draw_box(w, qtbot, ((20, 30), (60, 70)))
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
    stack = np.stack([blobs(centers=((40, 50), (70, 95)))] * 3)
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
    viewer.add_image(blobs(centers=((40, 50), (70, 95))), name="cells")
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
    viewer.add_image(blobs(), name="cells")
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
    viewer.add_image(np.stack([blobs()] * 30), name="cells")
    w = prompt_widget(viewer, qtbot, viewer.layers["cells"])
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
    viewer.add_image(np.stack([blobs()] * 12), name="long")
    short = viewer.add_image(np.stack([blobs()] * 3), name="short")
    embedded = []
    real = tiny_predictor.set_image
    monkeypatch.setattr(
        tiny_predictor, "set_image", lambda *a, **k: embedded.append(1) or real(*a, **k)
    )
    viewer.dims.current_step = (5, 0, 0)
    w = prompt_widget(viewer, qtbot, short)
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
    cells = viewer.add_image(blobs(), name="cells")
    w = prompt_widget(viewer, qtbot, cells)
    draw_box(w, qtbot, ((20, 30), (60, 70)))
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
    assert object_ids(opened) == {1}
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
