"""Headless napari: the object table dock (issue 19's object review), on a real viewer."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from skimage.draw import disk

from .widget_support import WAIT, Qt  # skips the module without napari or a display


def _cells(shape=(80, 100)):
    image = np.full(shape, 100, np.uint16)
    labels = np.zeros(shape, np.uint32)
    for label, (center, value) in enumerate(
        (((20, 25), 1000), ((55, 70), 3000), ((60, 20), 2000)), start=1
    ):
        rr, cc = disk(center, 9, shape=shape)
        image[rr, cc] = value
        labels[rr, cc] = label
    return image, labels


def _dock(viewer, qtbot, layer=None):
    from napari_mobilesam._widgets import ObjectsWidget

    w = ObjectsWidget(viewer)
    viewer.window.add_dock_widget(w, name="MobileSAM: objects")
    if layer is not None:
        w.labels_combo.setCurrentText(layer.name)
    _settled(qtbot, w)
    return w


def _settled(qtbot, w):
    """Wait for the throttled refresh and its worker."""
    qtbot.waitUntil(lambda: not w.timer.isActive() and not w.runner.busy, timeout=WAIT)


def _column(w, name):
    m = w.model
    return [m.row(r)[name] for r in range(m.rowCount())]


def _select(w, view_rows):
    w.view.clearSelection()
    sel = w.view.selectionModel()
    flags = sel.SelectionFlag
    for r in view_rows:
        sel.select(w.model.index(r, 0), flags.Select | flags.Rows)


def test_table_of_a_labels_layer_with_intensities_and_features(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image, labels = _cells()
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(labels, name="cells_labels")
    w = _dock(viewer, qtbot)  # the selected Labels layer by default
    assert w.labels_combo.currentText() == "cells_labels" and w.layer is layer
    assert w.image_label.text() == "cells"
    assert _column(w, "id") == [1, 2, 3]
    assert _column(w, "mean_intensity") == [1000.0, 3000.0, 2000.0]
    assert _column(w, "area") == [int((labels == i).sum()) for i in (1, 2, 3)]
    assert np.isnan(_column(w, "predicted_iou")).all()
    headers = [w.model.headerData(c, Qt.Orientation.Horizontal) for c in range(5)]
    assert headers == ["id", "predicted iou", "stability score", "area", "mean intensity"]
    assert w.model.names[-4:] == ["bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col"]
    assert w.model.data(w.model.index(0, 0)) == "1" and w.model.rowCount(w.model.index(0, 0)) == 0
    # napari's features (tooltips, features table): one row per object, napari's index
    assert list(layer.features["index"]) == [1, 2, 3]
    assert list(layer.features["mean_intensity"]) == [1000.0, 3000.0, 2000.0]
    assert "1 object" not in w.status.text() and "3 objects in cells_labels" in w.status.text()


def test_scores_sort_filter_and_refresh_after_painting(make_napari_viewer, qtbot):
    from napari_mobilesam._widgets import _features

    viewer = make_napari_viewer()
    image, labels = _cells()
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(labels, name="cells_labels")
    w = _dock(viewer, qtbot, layer)
    _features.record(layer, (), [1, 3], [0.95, 0.55], [0.97, 0.9])
    _settled(qtbot, w)
    assert _column(w, "predicted_iou")[::2] == [0.95, 0.55]
    assert np.isnan(_column(w, "predicted_iou")[1])
    col = w.model.names.index("predicted_iou")
    w.view.sortByColumn(col, Qt.SortOrder.AscendingOrder)  # a header click
    assert _column(w, "id") == [3, 1, 2]  # doubtful first, hand-painted (NaN) last
    w.view.sortByColumn(col, Qt.SortOrder.DescendingOrder)
    assert _column(w, "id") == [1, 3, 2]
    w.filter_box.setChecked(True)  # predicted IoU below 0.8 only
    assert _column(w, "id") == [3]
    w.iou_below.setValue(0.99)
    assert _column(w, "id") == [1, 3]
    w.filter_box.setChecked(False)
    assert len(_column(w, "id")) == 3

    # painting by hand: one new table after the stroke, scores kept
    runs = []
    w.runner.submit = _counting(w.runner.submit, runs)
    layer.selected_label = 7
    for c in range(3, 8):
        layer.paint((75, c), 7, refresh=True)
    _settled(qtbot, w)
    assert len(runs) == 1
    assert 7 in _column(w, "id") and dict(zip(_column(w, "id"), _column(w, "predicted_iou"),
                                              strict=True))[3] == 0.55  # fmt: skip
    # nothing changed: a refresh measures nothing again
    w.refresh()
    _settled(qtbot, w)
    assert 7 in list(layer.features["index"])


def _counting(submit, runs):
    def wrapped(*args, **kwargs):
        runs.append(1)
        return submit(*args, **kwargs)

    return wrapped


def test_click_a_row_shows_its_object_on_its_plane(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image, labels = _cells()
    stack = np.zeros((4, *labels.shape), np.uint32)
    stack[2] = labels
    stack[3][labels == 2] = 2  # the same object on the next plane (propagated)
    viewer.add_image(np.stack([image] * 4), name="stack")
    layer = viewer.add_labels(stack, name="stack_labels", scale=(1, 2, 2))
    w = _dock(viewer, qtbot, layer)
    # by id (an object's planes together); the features in table order (plane, id)
    assert list(zip(_column(w, "plane_0"), _column(w, "id"), strict=True)) == [
        (2, 1), (2, 2), (3, 2), (2, 3)
    ]  # fmt: skip
    assert list(layer.features["index"]) == [1, 2, 3, 2]
    viewer.dims.set_point(0, 0)
    w.view.clicked.emit(w.model.index(3, 0))  # object 3 on plane 2
    assert viewer.dims.current_step[0] == 2
    assert layer.selected_label == 3
    row = w.model.row(3)
    from napari_mobilesam._widgets._objects import _camera

    center = np.asarray(_camera(viewer).center)[-2:]
    np.testing.assert_allclose(center, [2 * row["centroid_row"], 2 * row["centroid_col"]])
    w.show_row(2)
    assert viewer.dims.current_step[0] == 3 and layer.selected_label == 2


def test_moving_through_planes_keeps_the_table_and_its_status(make_napari_viewer, qtbot):
    """napari signals set_data when the shown plane changes: the table is checked again
    but, its objects unchanged, neither rebuilt nor its status line overwritten."""
    viewer = make_napari_viewer()
    image, labels = _cells()
    stack = np.zeros((4, *labels.shape), np.uint32)
    stack[2] = labels
    viewer.add_image(np.stack([image] * 4), name="stack")
    layer = viewer.add_labels(stack, name="stack_labels")
    w = _dock(viewer, qtbot, layer)
    assert w.status.text() == "3 objects in stack_labels"
    resets = []
    w.model.modelReset.connect(lambda: resets.append(1))
    _select(w, [1])  # what a click on a row does
    w.show_row(1)
    _settled(qtbot, w)
    assert viewer.dims.current_step[0] == 2
    viewer.dims.set_point(0, 0)
    _settled(qtbot, w)
    assert w.status.text() == "object 2 on plane (2,)"
    assert resets == [] and w.selected_rows() == [1]
    from napari_mobilesam._widgets._objects import MEASURING

    w.status.setText(MEASURING)  # (an earlier measuring job's message): never kept
    w.refresh()
    _settled(qtbot, w)
    assert w.status.text() == "3 objects in stack_labels" and resets == []
    layer.data[0, :5, :5] = 7  # a real change is measured and said
    layer.refresh()
    _settled(qtbot, w)
    assert w.status.text() == "4 objects in stack_labels" and resets == [1]


def test_delete_and_merge_touch_only_the_selected_objects_and_undo(
    make_napari_viewer, qtbot, tmp_path
):
    from napari_mobilesam._widgets import _features
    from napari_mobilesam.interactive.objects import scores_from

    viewer = make_napari_viewer()
    _, labels = _cells()
    layer = viewer.add_labels(labels.copy(), name="objects")
    w = _dock(viewer, qtbot, layer)
    assert w.image_label.text() == "(no image of its shape)"
    assert "mean_intensity" not in w.model.names
    _select(w, [1])
    assert w.delete_selected() == int((labels == 2).sum())
    assert not (layer.data == 2).any()
    np.testing.assert_array_equal(layer.data[labels != 2], labels[labels != 2])
    _settled(qtbot, w)
    assert _column(w, "id") == [1, 3]
    layer.undo()  # napari's undo of the layer brings it back
    np.testing.assert_array_equal(layer.data, labels)
    _settled(qtbot, w)
    assert _column(w, "id") == [1, 2, 3]

    _features.record(layer, (), [3], [0.9], [0.8])
    _settled(qtbot, w)
    _select(w, [2])  # a deleted object's scores come back with its undo
    w.delete_selected()
    _settled(qtbot, w)
    assert _column(w, "id") == [1, 2]
    layer.undo()
    _settled(qtbot, w)
    assert _column(w, "id") == [1, 2, 3] and _column(w, "stability_score")[2] == 0.8
    assert scores_from(layer.features)[((), 3)] == (0.9, 0.8)
    _features.record(layer, (), [1], [0.7], [0.6])
    _settled(qtbot, w)
    _select(w, [2, 0])  # objects 3 and 1
    assert w.merge_selected() == 1
    assert (layer.data[labels == 3] == 1).all() and (layer.data[labels == 2] == 2).all()
    _settled(qtbot, w)
    assert _column(w, "id") == [1, 2] and np.isnan(_column(w, "predicted_iou")).all()
    layer.undo()  # both objects again, each with its own scores
    _settled(qtbot, w)
    assert _column(w, "predicted_iou")[::2] == [0.7, 0.9]
    layer.redo()
    _settled(qtbot, w)
    assert _column(w, "id") == [1, 2] and np.isnan(_column(w, "predicted_iou")).all()

    # export: every row, in the shown order, atomically
    w.view.sortByColumn(w.model.names.index("area"), Qt.SortOrder.DescendingOrder)
    w.filter_box.setChecked(True)  # the filter does not limit the export
    path = w.export_csv(tmp_path / "objects.csv")
    rows = list(csv.DictReader(path.open()))
    assert [int(r["id"]) for r in rows] == [1, 2] and rows[0]["predicted_iou"] == ""
    assert int(rows[0]["area"]) == int(np.isin(labels, [1, 3]).sum())
    assert [p.name for p in tmp_path.iterdir()] == ["objects.csv"]


def test_edits_refuse_with_a_message(make_napari_viewer, qtbot, notes):
    viewer = make_napari_viewer()
    _, labels = _cells()
    layer = viewer.add_labels(labels.copy(), name="objects")
    w = _dock(viewer, qtbot, layer)
    with pytest.raises(ValueError, match="select one or more rows"):
        w.delete_selected()
    _select(w, [0])
    with pytest.raises(ValueError, match="2 or more ids"):
        w.merge_selected()
    w.merge_button.click()  # a button: a message, no exception
    assert notes and "2 or more ids" in notes[-1]
    np.testing.assert_array_equal(layer.data, labels)

    da = pytest.importorskip("dask.array")
    lazy = viewer.add_labels(da.from_array(labels), name="lazy")
    w.labels_combo.setCurrentText("lazy")
    _settled(qtbot, w)
    assert _column(w, "id") == [1, 2, 3]
    _select(w, [0])
    with pytest.raises(ValueError, match="not an in-memory array"):
        w.delete_selected()
    assert lazy.data is not None


def test_follows_the_chosen_layer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, labels = _cells()
    a = viewer.add_labels(labels, name="a")
    w = _dock(viewer, qtbot, a)
    b = viewer.add_labels(labels[:40, :50] * 0, name="b")
    w.labels_combo.setCurrentText("b")
    _settled(qtbot, w)
    assert w.layer is b and _column(w, "id") == []
    a.data = np.where(labels == 1, 5, 0).astype(np.uint32)  # not followed any more
    _settled(qtbot, w)
    assert _column(w, "id") == []
    w.labels_combo.setCurrentText("a")
    _settled(qtbot, w)
    assert _column(w, "id") == [5]
    viewer.layers.remove(a)
    viewer.layers.remove(b)
    _settled(qtbot, w)
    assert w.layer is None and w.model.rowCount() == 0
    assert "add or choose a Labels layer" in w.status.text()


def test_prompt_commits_record_their_scores(make_napari_viewer, qtbot, tiny_predictor):
    from napari_mobilesam._widgets import PromptWidget

    viewer = make_napari_viewer()
    image, _ = _cells()
    cells = viewer.add_image(image, name="cells")
    p = PromptWidget(viewer)
    viewer.window.add_dock_widget(p)
    p.start()
    qtbot.waitUntil(lambda: not p.runner.busy and p.session is not None, timeout=WAIT)
    rc = [(10, 10), (10, 40), (40, 40), (40, 10)]
    p.state.box.add_rectangles(np.array(rc, dtype=float))
    qtbot.waitUntil(lambda: not p.runner.busy and p.prediction is not None, timeout=WAIT)
    score = p.prediction.score
    assert p.commit() == 1
    w = _dock(viewer, qtbot, viewer.layers["cells_labels"])
    assert w.image() is cells
    assert _column(w, "id") == [1]
    assert _column(w, "predicted_iou") == [pytest.approx(score)]
    assert 0.0 <= _column(w, "stability_score")[0] <= 1.0


def test_everything_records_scores_and_commit_carries_them(
    make_napari_viewer, qtbot, tiny_predictor
):
    from napari_mobilesam._widgets import EverythingWidget

    viewer = make_napari_viewer()
    image, _ = _cells()
    viewer.add_image(np.stack([image, image]), name="cells")
    viewer.dims.set_point(0, 1)
    e = EverythingWidget(viewer)
    viewer.window.add_dock_widget(e)
    e.points_per_side.setValue(4)
    e.pred_iou_thresh.setValue(0.0)
    e.stability_score_thresh.setValue(0.0)
    e.run()
    qtbot.waitUntil(lambda: not e.runner.busy, timeout=WAIT)
    found = viewer.layers["cells everything"]
    n = int(found.data[1].max())
    assert n > 0 and found.data[0].max() == 0
    feats = found.features
    assert list(feats["index"]) == list(range(1, n + 1)) and set(feats["plane_0"]) == {1}
    assert np.isfinite(feats["predicted_iou"]).all() and np.isfinite(feats["stability_score"]).all()

    ids = e.commit_to_labels()
    labels = viewer.layers["cells_labels"]
    w = _dock(viewer, qtbot, labels)
    assert _column(w, "id") == ids and set(_column(w, "plane_0")) == {1}
    # each committed object has the scores of the everything object it came from
    by_id = dict(zip(feats["index"], feats["predicted_iou"], strict=True))
    for label, iou in zip(_column(w, "id"), _column(w, "predicted_iou"), strict=True):
        source = np.unique(found.data[1][labels.data[1] == label])
        assert len(source) == 1 and iou == by_id[int(source[0])]


def test_save_labels_writes_the_plugins_tiff_in_the_background(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    """The review dock saves with the plugin's writer (napari's Save dialog lists its own
    TIFF writer first), suggesting <image>_labels.tif; the file opens as labels again."""
    import tifffile
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer()
    _, labels = _cells()
    layer = viewer.add_labels(labels.copy(), name="cells_labels")
    w = _dock(viewer, qtbot, layer)
    asked = []

    def dialog(parent, title, suggested, filters):
        asked.append((suggested, filters))
        return str(tmp_path / suggested), filters

    monkeypatch.setattr(QFileDialog, "getSaveFileName", dialog)
    w.save_button.click()
    qtbot.waitUntil(lambda: "saved to" in w.status.text(), timeout=WAIT)
    qtbot.waitUntil(lambda: not w.runner.busy, timeout=WAIT)
    assert asked == [("cells_labels.tif", "MobileSAM labels TIFF (*.tif *.tiff)")]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "cells_labels.tif"), labels)
    assert (tmp_path / "cells_labels.json").is_file()
    (opened,) = viewer.open(str(tmp_path / "cells_labels.tif"), plugin="napari-mobilesam")
    assert type(opened).__name__ == "Labels"
    assert opened.metadata["mobilesam"]["layer"] == "cells_labels"
    # another layer name gets _labels appended; no layer chosen is an error
    viewer.layers.remove(opened)
    w.labels_combo.setCurrentText(layer.name)
    layer.name = "mine"
    qtbot.waitUntil(lambda: not w.runner.busy and not w.timer.isActive(), timeout=WAIT)
    w.save_button.click()
    qtbot.waitUntil(lambda: (tmp_path / "mine_labels.json").is_file(), timeout=WAIT)
    assert asked[-1][0] == "mine_labels.tif" and (tmp_path / "mine_labels.tif").is_file()
    viewer.layers.clear()
    with pytest.raises(ValueError, match="choose a Labels layer"):
        w.save_labels(tmp_path / "x_labels.tif")
