"""Headless napari: labels layers of large stacks on chunked labels (zarr on disk).

The size above which a stack's labels are chunked is lowered through
``MOBILESAM_CHUNKED_LABELS_MB`` so that small stacks take the chunked path. The same
edits made on a chunked layer and on a numpy layer of the same image must give the same
labels: prompt commits (one object, several boxes), undo, propagation, segment
everything committed to the labels, the object table's delete, napari's own brush, fill
and *new label*, and a save that reopens."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.chunked_labels import THRESHOLD_ENV, ChunkedLabels

from .widget_support import (  # skips the module without napari or a display
    WAIT,
    disk_masks,
    everything_widget,
    idle,
)

RADIUS = 6
SHAPE = (3, 64, 80)  # 61,440 bytes of uint32 labels
LOW = "0.04"  # MiB: 41,943 bytes, so SHAPE is chunked


@pytest.fixture
def disks(monkeypatch, tiny_predictor):
    """Point masks with a disk at each positive point (the tiny model's are empty)."""
    return disk_masks(monkeypatch, tiny_predictor, RADIUS)


def _stack(shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(500, 3000, shape).astype(np.uint16)


def _started(viewer, qtbot, monkeypatch, name, data, threshold):
    """A prompt widget started on a new image ``name``, its labels made with the
    ``threshold`` (MiB, or "off")."""
    from napari_mobilesam._widgets import PromptWidget

    monkeypatch.setenv(THRESHOLD_ENV, threshold)
    viewer.add_image(data, name=name)
    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image_combo.setCurrentText(name)
    w.start()
    idle(qtbot, w)
    return w


def _click(w, qtbot, *point) -> None:
    w.state.points.add(np.array([point], float))
    idle(qtbot, w)


def _refreshes(layer, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = layer.refresh
    monkeypatch.setattr(layer, "refresh", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


@pytest.mark.slow  # four Starts
def test_stacks_over_the_threshold_get_chunked_labels(
    make_napari_viewer, qtbot, monkeypatch, tiny_predictor
):
    viewer = make_napari_viewer()
    big = _started(viewer, qtbot, monkeypatch, "big", _stack(), LOW)
    assert isinstance(big.state.labels.data, ChunkedLabels)
    assert big.state.labels.data.shape == SHAPE and big.state.labels.data.max() == 0
    assert big.state.labels.data.path.is_dir()
    # one plane is never chunked (napari holds the plane it shows in memory anyway)
    plane = _started(viewer, qtbot, monkeypatch, "plane", _stack((100, 120)), "0")
    assert isinstance(plane.state.labels.data, np.ndarray)
    small = _started(viewer, qtbot, monkeypatch, "small", _stack((2, 32, 40)), LOW)
    assert isinstance(small.state.labels.data, np.ndarray)  # 10 KiB: under the threshold
    off = _started(viewer, qtbot, monkeypatch, "off", _stack(), "off")
    assert isinstance(off.state.labels.data, np.ndarray)


def _edits(w, qtbot, viewer):
    """The same edits on either image: commits on two planes, two boxes, an undo."""
    ids = []
    viewer.dims.current_step = (1, 0, 0)
    _click(w, qtbot, 1, 20, 30)
    ids.append(w.commit())
    _click(w, qtbot, 1, 24, 36)  # overlaps object 1: fills only unlabeled pixels
    ids.append(w.commit())
    viewer.dims.current_step = (2, 0, 0)
    idle(qtbot, w)
    _click(w, qtbot, 2, 50, 60)
    ids.append(w.commit())
    w.undo()  # object 3 goes
    _click(w, qtbot, 2, 10, 70)
    ids.append(w.commit())
    w.state.box.add_rectangles(np.array([[[2, 30, 5], [2, 40, 5], [2, 40, 20], [2, 30, 20]]]))
    w.state.box.add_rectangles(np.array([[[2, 5, 5], [2, 15, 5], [2, 15, 20], [2, 5, 20]]]))
    idle(qtbot, w)
    ids.append(w.commit())  # two boxes: two objects
    return ids


@pytest.mark.slow  # two images, each edited twice
def test_commit_undo_and_save_on_chunked_labels_match_numpy(
    make_napari_viewer, qtbot, monkeypatch, disks, tmp_path
):
    viewer = make_napari_viewer(show=True)
    image = _stack()
    dense = _started(viewer, qtbot, monkeypatch, "dense", image, "off")
    expected_ids = _edits(dense, qtbot, viewer)
    chunked = _started(viewer, qtbot, monkeypatch, "chunked", image, LOW)
    labels = chunked.state.labels
    assert isinstance(labels.data, ChunkedLabels)
    refreshes = _refreshes(labels, monkeypatch)
    assert _edits(chunked, qtbot, viewer) == expected_ids == [1, 2, 3, 3, 4]  # 3 undone
    want = dense.state.labels.data
    assert want[1].max() == 2 and set(np.unique(want[2])) == {0, 3, 4, 5}
    np.testing.assert_array_equal(np.asarray(labels.data), want)
    assert refreshes == []  # commits and undo redrew only their regions
    # what napari shows is what the labels hold
    shown = np.array(labels._slice.image.raw)
    np.testing.assert_array_equal(shown, labels.data[2])
    # the object table's scores were recorded on the chunked layer as on the other
    for key in ("index", "predicted_iou"):
        np.testing.assert_array_equal(
            np.asarray(labels.features[key]), np.asarray(dense.state.labels.features[key])
        )
    # undo everything: back to zeros, and the next id is 1 again
    while chunked.session.can_undo:
        chunked.undo()
    assert labels.data.max() == 0
    _click(chunked, qtbot, 2, 30, 40)
    assert chunked.commit() == 1
    # saved with the plugin's writer, read back with its reader: the same labels
    chunked.undo()
    while dense.session.can_undo:
        dense.undo()
    _edits(chunked, qtbot, viewer)
    _edits(dense, qtbot, viewer)
    path = str(tmp_path / "chunked_labels.tif")
    labels.save(path, plugin="napari-mobilesam")
    (reopened,) = viewer.open(path, plugin="napari-mobilesam")
    np.testing.assert_array_equal(np.asarray(reopened.data), dense.state.labels.data)


def test_propagation_into_chunked_labels(make_napari_viewer, qtbot, monkeypatch, disks):
    viewer = make_napari_viewer(show=True)  # shown: napari's partial redraws apply
    image = np.stack([_stack((64, 80))] * 3)
    results = []
    for name, threshold in (("dense", "off"), ("chunked", LOW)):
        w = _started(viewer, qtbot, monkeypatch, name, image, threshold)
        w.prop_min_score.setValue(0.0)
        for method in ("propagate", "propagate_all"):  # any area change (random weights)
            real = getattr(w.session, method)
            monkeypatch.setattr(
                w.session, method,
                lambda *a, real=real, **k: real(*a, **{**k, "min_area_ratio": 1e-6}),
            )  # fmt: skip
        viewer.dims.current_step = (1, 0, 0)
        _click(w, qtbot, 1, 30, 30)
        w.propagate()
        idle(qtbot, w)
        _click(w, qtbot, 1, 50, 60)
        w.commit()
        w.propagate_all()
        idle(qtbot, w)
        results.append(w.state.labels.data)
    dense, chunked = results

    assert isinstance(chunked, ChunkedLabels) and all(p.max() >= 1 for p in dense)
    np.testing.assert_array_equal(np.asarray(chunked), dense)
    # undo, plane by plane, of the propagated objects: only each step's region redrawn
    refreshes = _refreshes(w.state.labels, monkeypatch)
    steps = 0
    while w.session.can_undo:
        steps += 1
        w.undo()
    assert steps >= 3 and refreshes == [] and not np.asarray(chunked).any()


def test_everything_results_and_commits_on_chunked_labels(
    make_napari_viewer, qtbot, monkeypatch, tiny_predictor
):
    viewer = make_napari_viewer()
    yy, xx = np.mgrid[:64, :80]
    cells = np.zeros((64, 80), np.uint16) + 200
    for r, c in ((20, 25), (40, 55), (15, 60)):
        cells[(yy - r) ** 2 + (xx - c) ** 2 <= 64] = 3000
    stack = np.stack([cells, cells[::-1], cells[:, ::-1]])
    merged = []
    for name, threshold in (("dense", "off"), ("chunked", LOW)):
        monkeypatch.setenv(THRESHOLD_ENV, threshold)
        viewer.add_image(stack, name=name)
        e = everything_widget(viewer, name)
        e.scope.setCurrentIndex(1)  # the whole stack
        e.run()
        idle(qtbot, e)
        result = viewer.layers[f"{name} everything"]
        assert isinstance(result.data, ChunkedLabels) == (threshold == LOW)
        target = viewer.layers[f"{name}_labels"] if f"{name}_labels" in viewer.layers else None
        assert target is None
        ids = e.commit_to_labels()
        target = viewer.layers[f"{name}_labels"]
        assert isinstance(target.data, ChunkedLabels) == (threshold == LOW)
        merged.append((np.asarray(result.data), np.asarray(target.data), ids))
    (dense_result, dense_labels, dense_ids), (result, labels, ids) = merged
    assert dense_result.max() > 0 and len(dense_ids) > 0
    np.testing.assert_array_equal(result, dense_result)
    np.testing.assert_array_equal(labels, dense_labels)
    assert ids == dense_ids


def test_napari_tools_on_chunked_labels(make_napari_viewer, qtbot, monkeypatch, tiny_predictor):
    from napari.utils.key_bindings import coerce_keybinding

    viewer = make_napari_viewer(show=True)
    w = _started(viewer, qtbot, monkeypatch, "cells", _stack(), LOW)
    layer = w.state.labels
    data = layer.data
    viewer.layers.selection.active = layer
    viewer.dims.current_step = (1, 0, 0)
    layer.brush_size = 5
    layer.paint((1, 20, 20), 4)  # napari's brush
    assert data[1, 20, 20] == 4 and data.max() == 4
    assert layer._slice.image.raw[20, 20] == 4  # shown
    layer.fill((1, 20, 20), 7)  # fill the object
    assert data[1, 20, 20] == 7 and data.max() == 7 and not (data[1] == 4).any()
    layer.undo()
    assert data[1, 20, 20] == 4 and data.max() == 4
    layer.redo()
    layer.paint_polygon(np.array([[1, 40, 40], [1, 40, 60], [1, 55, 60]]), 5)  # polygon
    assert data[1, 50, 58] == 5 and data.max() == 7
    layer.mode = "erase"
    layer.paint((1, 20, 20), 0)  # the eraser, over all of object 7
    assert not (data[1] == 7).any() and data.max() == 5  # the largest id follows
    layer.undo()
    assert data[1, 20, 20] == 7 and data.max() == 7
    layer.mode = "fill"
    layer.fill((1, 60, 5), 2, refresh=True)  # the background of the plane
    assert (data[1] > 0).all() and not data[0].any()
    layer.undo()
    # *new label* (M): the largest id + 1, read from the record, not the whole stack
    layer.keymap[coerce_keybinding("m")](layer)
    assert layer.selected_label == 8


def test_a_full_disk_during_a_commit_says_so_and_undo_reverts(
    make_napari_viewer, qtbot, monkeypatch, disks, notes
):
    """Chunked labels whose disk fills up while a commit writes: the widget says what
    happened (no traceback), and Undo reverts the partly written object once there is
    room again."""
    viewer = make_napari_viewer()
    w = _started(viewer, qtbot, monkeypatch, "cells", _stack(), LOW)
    data = w.state.labels.data
    viewer.dims.current_step = (1, 0, 0)
    _click(w, qtbot, 1, 20, 30)
    real = ChunkedLabels.__setitem__
    writes = []

    def full(self, key, value):
        if not writes:  # the commit: the disk fills after the region's first half
            rows = key[1]
            half = (rows.stop - rows.start) // 2
            real(self, (key[0], slice(rows.start, rows.start + half), key[2]), value[:half])
        writes.append(key)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ChunkedLabels, "__setitem__", full)
    assert w.commit() is None
    assert "No space left on device" in notes[-1] and "Undo reverts it" in notes[-1]
    assert len(writes) == 2 and data.max() == 1  # partly written, not put back
    monkeypatch.setattr(ChunkedLabels, "__setitem__", real)  # room again
    w.undo()
    assert data.max() == 0 and not np.asarray(data).any()


def test_large_saved_labels_reopen_editable(make_napari_viewer, monkeypatch, tmp_path):
    """A saved stack over the reader's lazy size opens as ChunkedLabels over the file:
    napari's brush paints into it, and saving over the file it came from keeps every
    plane, edited or not."""
    from napari_mobilesam import napari_io

    stack = np.zeros((3, 40, 50), np.uint16)
    stack[0, 5:15, 5:15], stack[2, 20:30, 10:40] = 3, 9
    path = str(tmp_path / "big_labels.tif")
    napari_io.write_labels(path, stack, {})
    monkeypatch.setattr(napari_io, "LAZY_BYTES", 100)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin="napari-mobilesam")
    assert isinstance(layer.data, ChunkedLabels) and layer.data.max() == 9
    viewer.dims.current_step = (1, 0, 0)
    layer.brush_size = 3
    layer.paint((1, 20, 20), 12)
    stack[1] = np.asarray(layer.data[1])
    assert stack[1, 20, 20] == 12 and layer.data.max() == 12
    layer.save(path, plugin="napari-mobilesam")
    ((again, _, _),) = napari_io.read_labels(path)
    np.testing.assert_array_equal(again[...], stack)
    np.testing.assert_array_equal(np.asarray(layer.data), stack)


def test_object_table_on_chunked_labels(
    make_napari_viewer, qtbot, monkeypatch, tiny_predictor, tmp_path
):
    """The object table measures, deletes from and saves a chunked layer; the save reads
    a copy of the store, so an edit made meanwhile neither breaks it nor is half in it."""
    import glob

    from napari_mobilesam._widgets import ObjectsWidget

    viewer = make_napari_viewer()
    w = _started(viewer, qtbot, monkeypatch, "cells", _stack(), LOW)
    layer = w.state.labels
    data = layer.data
    data[0, 5:10, 5:10] = 1
    data[2, 30:40, 50:60] = 2
    data[2, 50:55, 10:12] = 3
    layer.refresh()
    table = ObjectsWidget(viewer)
    viewer.window.add_dock_widget(table)
    table.labels_combo.setCurrentText(layer.name)

    def settled():
        qtbot.waitUntil(lambda: not table.timer.isActive() and not table.runner.busy, timeout=WAIT)

    settled()
    rows = [table.model.row(r) for r in range(table.model.rowCount())]
    assert [(int(r["id"]), int(r["plane_0"]), int(r["area"])) for r in rows] == [
        (1, 0, 25), (2, 2, 100), (3, 2, 10)
    ]  # fmt: skip
    sel = table.view.selectionModel()
    sel.select(table.model.index(1, 0), sel.SelectionFlag.Select | sel.SelectionFlag.Rows)
    assert table.delete_selected() == 100
    assert not (data[2] == 2).any() and data.max() == 3
    layer.undo()  # napari's undo of the table's delete
    assert (data[2, 30:40, 50:60] == 2).all()
    settled()
    stores = set(glob.glob(str(data.path.parent / "mobilesam-labels-*")))
    table.save_labels(tmp_path / "cells_labels.tif")
    data[1, 0, 0] = 9  # meanwhile: not in the file (saved from a copy)
    settled()
    (saved,) = viewer.open(str(tmp_path / "cells_labels.tif"), plugin="napari-mobilesam")
    expected = np.asarray(data)
    expected[1, 0, 0] = 0
    np.testing.assert_array_equal(np.asarray(saved.data), expected)
    assert set(glob.glob(str(data.path.parent / "mobilesam-labels-*"))) == stores  # copy gone


def test_step_region_finds_the_plane_an_undo_changes(tmp_path):
    """The plane and box of an undo step, for numpy views and chunked planes alike."""
    from napari_mobilesam._widgets._tiles import step_region
    from napari_mobilesam.chunked_labels import label_plane

    box = (slice(3, 9), slice(4, 12))
    dense = np.zeros((2, 3, 20, 30), np.uint32)
    assert step_region(dense, (label_plane(dense, (1, 2)), box)) == ((1, 2), (3, 4, 9, 12))
    assert step_region(dense, (np.zeros((20, 30), np.uint32), box)) is None  # not its plane
    assert step_region(dense, (dense[1, 2, :10], box)) is None  # not a whole plane
    assert step_region(dense[0, 0], (dense[0, 0], box)) == ((), (3, 4, 9, 12))  # 2D
    chunked = ChunkedLabels((4, 20, 30), folder=tmp_path)
    assert step_region(chunked, (chunked.plane((3,)), box)) == ((3,), (3, 4, 9, 12))
    other = ChunkedLabels((4, 20, 30), folder=tmp_path)
    assert step_region(other, (chunked.plane((3,)), box)) is None
    assert step_region(chunked, None) is None
    chunked.close()
    other.close()
