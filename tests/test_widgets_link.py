"""Headless napari: the everything widget's link option (issue 20), on a real viewer.

Most tests feed the widget per-plane labels made from the synthetic generators' truth
(ids 1..N in every plane, by decreasing area, as segment-everything numbers them), in
place of the model's, so that the linking has real objects, tracks and divisions to
find and the ids are known. One test runs the tiny model itself.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_mobilesam.interactive.objects import scores_from
from napari_mobilesam.linking import link_stack
from napari_mobilesam.synthetic import cell_time_series, cells_3d

from .extend_support import oracle, without_ends
from .widget_support import (  # skips the module without napari or a display
    WAIT,
    idle,
    napari,
)


def per_plane(labels: np.ndarray) -> np.ndarray:
    """Every plane of ``labels`` numbered on its own: ids 1..N by decreasing area."""
    out = np.zeros(labels.shape, dtype=np.uint32)
    for index in np.ndindex(*labels.shape[:-2]):
        ids, areas = np.unique(labels[index], return_counts=True)
        keep = ids > 0
        order = ids[keep][np.argsort(-areas[keep], kind="stable")]
        lut = np.zeros(int(labels.max()) + 1, dtype=np.uint32)
        lut[order] = np.arange(1, len(order) + 1)
        out[index] = lut[labels[index]]
    return out


def scores_of(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Made-up predicted IoU and stability of a plane's objects 1..n."""
    return 0.5 + 0.4 * np.arange(n) / max(n, 1), 0.9 - 0.3 * np.arange(n) / max(n, 1)


@pytest.fixture
def truth(monkeypatch, tiny_predictor):
    """``truth(planes)``: the widget's segment-everything gives plane k of a run (plane
    axes in C order) ``planes[k]`` instead of the model's labels; ``gate=True`` holds
    every plane until the test releases it (returns the semaphore)."""
    from napari_mobilesam._widgets import _everything

    def feed(planes: np.ndarray, gate: bool = False):
        flat = planes.reshape(-1, *planes.shape[-2:])
        sem = threading.Semaphore(0) if gate else None
        entered = []

        class TruthGenerator:
            def __init__(self, predictor, **_params):
                self.predictor, self.k = predictor, 0

            def describe(self):
                return self.predictor.describe()

            def generate_labels(self, image, return_info=False):
                entered.append(self.k)
                if sem is not None:
                    assert sem.acquire(timeout=WAIT / 1000)  # a hang guard only
                labels = flat[self.k].copy()
                self.k += 1
                iou, stability = scores_of(int(labels.max()))
                return labels, {"predicted_iou": iou, "stability_score": stability}

        monkeypatch.setattr(_everything, "MaskGenerator", TruthGenerator)
        return sem, entered

    return feed


def _widget(viewer, name: str, axis: str, **options):
    from napari_mobilesam._widgets import EverythingWidget

    w = EverythingWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image_combo.setCurrentText(name)
    w.link.axis.setCurrentIndex(w.link.axis.findData(axis))
    assert w.link.choice() == axis
    if "min_iou" in options:
        w.link.min_iou.setValue(options["min_iou"])
    if "max_gap" in options:
        w.link.max_gap.setValue(options["max_gap"])
    if "min_planes" in options:
        w.link.min_planes.setValue(options["min_planes"])
    return w


def _run(qtbot, w):
    w.run()
    idle(qtbot, w)


def test_link_choices_fit_the_image(make_napari_viewer, tiny_predictor):
    from napari_mobilesam._widgets import EverythingWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="flat")
    viewer.add_image(np.zeros((3, 32, 32), np.uint8), name="stack")
    viewer.add_image(np.zeros((2, 3, 32, 32), np.uint8), name="series")
    viewer.add_image(np.zeros((2, 2, 3, 32, 32), np.uint8), name="five")
    w = EverythingWidget(viewer)

    def offered():
        return [w.link.axis.itemData(i) for i in range(w.link.axis.count())]

    w.image_combo.setCurrentText("flat")
    assert offered() == [""] and not w.link.axis.isEnabled()
    assert "2D" in w.link.axis.toolTip()
    assert not w.link.min_iou.isEnabled() and not w.link.max_gap.isEnabled()
    assert not w.link.min_planes.isEnabled()
    w.image_combo.setCurrentText("stack")
    assert offered() == ["", "z", "t"] and w.link.axis.isEnabled()
    assert w.scope.isEnabled()
    w.link.axis.setCurrentIndex(offered().index("t"))
    # linking works on the whole stack: the scope follows
    assert w.scope.currentIndex() == 1 and not w.scope.isEnabled()
    assert w.link.min_iou.isEnabled() and w.link.max_gap.isEnabled()
    assert not w.link.min_planes.isEnabled()  # 3D objects (z) only
    w.link.axis.setCurrentIndex(offered().index("z"))
    assert w.link.min_planes.isEnabled()
    w.link.axis.setCurrentIndex(offered().index("t"))
    w.image_combo.setCurrentText("series")  # t does not fit (T, Z): back to none
    assert offered() == ["", "z", "zt"] and w.link.choice() == "" and w.scope.isEnabled()
    w.link.axis.setCurrentIndex(offered().index("z"))
    w.image_combo.setCurrentText("five")  # z still fits: kept
    assert offered() == ["", "z"] and w.link.choice() == "z"
    w.image_combo.setCurrentText("flat")
    assert w.link.choice() == "" and not w.link.axis.isEnabled() and w.scope.isEnabled()


def test_link_z_equals_link_stack_and_records_linked_scores(make_napari_viewer, qtbot, truth):
    sample = cells_3d((10, 96, 96), seed=3)
    planes = per_plane(sample.labels)
    truth(planes)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="cells")
    w = _widget(viewer, "cells", "z")
    _run(qtbot, w)
    result = viewer.layers["cells everything"]
    expected, _ = link_stack(planes, "z")
    np.testing.assert_array_equal(result.data, expected)
    # the truth's 3D cells are found: one id per cell, through every plane it spans
    n_cells = len(np.unique(sample.labels)) - 1
    assert n_cells >= 3 and int(result.data.max()) == n_cells
    pairs = np.unique(np.stack([sample.labels.ravel(), result.data.ravel()]), axis=1)
    assert len(pairs.T) == n_cells + 1  # a bijection (background included)
    assert "cells tracks" not in viewer.layers  # no tracks for z
    assert w.status.text().startswith(f"{n_cells} 3D objects in 10 planes; cpu")
    # the object table's scores are under the linked ids, each plane's own
    scores = scores_from(result.features, 1)
    for z in range(10):
        own = planes[z]
        iou, stability = scores_of(int(own.max()))
        for k in range(1, int(own.max()) + 1):
            linked = int(np.unique(result.data[z][own == k])[0])
            assert scores[((z,), linked)] == pytest.approx((iou[k - 1], stability[k - 1]))
    assert len(scores) == sum(int(p.max()) for p in planes)


def test_link_min_planes_leaves_out_short_objects_as_the_batch_tool(
    make_napari_viewer, qtbot, truth
):
    sample = cells_3d((10, 96, 96), seed=3, radius=(8, 16), z_radius=(1, 4))
    planes = per_plane(sample.labels)
    truth(planes)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="cells")
    full, _ = link_stack(planes, "z")
    spans = {i: int((full == i).any(axis=(1, 2)).sum()) for i in range(1, int(full.max()) + 1)}
    n = int(np.median(list(spans.values())))
    kept = [i for i, k in spans.items() if k >= n]
    assert 0 < len(kept) < len(spans)
    w = _widget(viewer, "cells", "z", min_planes=n)
    _run(qtbot, w)
    result = viewer.layers["cells everything"]
    expected = np.zeros_like(full)
    for new, old in enumerate(kept, start=1):
        expected[full == old] = new
    np.testing.assert_array_equal(result.data, expected)
    short = len(spans) - len(kept)
    assert w.status.text().startswith(
        f"{len(kept)} 3D objects in 10 planes ({short} seen in fewer than {n} planes left out)"
    )
    # the scores follow: one row per kept object per plane, under its shown id
    scores = scores_from(result.features, 1)
    assert len(scores) == sum(len(np.unique(p)) - 1 for p in expected)
    for (plane, i), _ in scores.items():
        assert (result.data[plane] == i).any()


def test_stack_link_min_planes_is_for_z():
    from napari_mobilesam._widgets._link import StackLink

    with pytest.raises(ValueError, match="min_planes applies to 3D objects"):
        StackLink("t", (4,), 0.5, 1, min_planes=2)
    assert StackLink("z", (4,), 0.5, 1, min_planes=3).short_objects() == (0, None)


def test_link_t_tracks_layer_with_divisions(make_napari_viewer, qtbot, truth):
    sample = cell_time_series(8, (96, 96), seed=0, divisions=2)
    planes = per_plane(sample.labels)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="movie")
    w = _widget(viewer, "movie", "t", min_iou=0.4, max_gap=2)
    truth(planes)
    _run(qtbot, w)
    expected, table = link_stack(planes, "t", min_iou=0.4, max_gap=2)
    np.testing.assert_array_equal(viewer.layers["movie everything"].data, expected)
    tracks = viewer.layers["movie tracks"]
    assert isinstance(tracks, napari.layers.Tracks)
    np.testing.assert_allclose(tracks.data, table.tracks_data())
    assert tracks.graph == table.graph()
    # the truth's divisions, under the linked ids
    true_parent = {c: p for c, p in sample.parents.items() if p}
    assert len(true_parent) == 4
    link_of = {int(t): int(np.unique(expected[sample.labels == t])[0]) for t in true_parent}
    link_of |= {p: int(np.unique(expected[sample.labels == p])[0]) for p in true_parent.values()}
    assert tracks.graph == {link_of[c]: [link_of[p]] for c, p in true_parent.items()}
    assert "(2 division(s))" in w.status.text()

    # a second run replaces this image's tracks (same layer); another image's stay
    viewer.add_image(sample.image[:4], name="other")
    w2 = _widget(viewer, "other", "t")
    truth(planes[:4])
    _run(qtbot, w2)
    other = viewer.layers["other tracks"]
    fewer = planes.copy()
    fewer[5:] = 0  # cells only in the first 5 frames: other tracks
    truth(fewer)
    w.run_button.click()  # the same as w.run(), as the user does it
    idle(qtbot, w)
    _, table5 = link_stack(fewer, "t", min_iou=0.4, max_gap=2)
    assert viewer.layers["movie tracks"] is tracks
    np.testing.assert_allclose(tracks.data, table5.tracks_data())
    assert tracks.graph == table5.graph()
    _, table4 = link_stack(planes[:4], "t")
    assert viewer.layers["other tracks"] is other
    np.testing.assert_allclose(other.data, table4.tracks_data())
    assert [layer.name for layer in viewer.layers].count("movie tracks") == 1


def test_link_zt_tracks_3d_objects(make_napari_viewer, qtbot, truth):
    sample = cell_time_series(3, (4, 48, 48), seed=0)
    planes = per_plane(sample.labels)
    truth(planes)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="series")
    w = _widget(viewer, "series", "zt")
    _run(qtbot, w)
    expected, table = link_stack(planes, "zt")
    np.testing.assert_array_equal(viewer.layers["series everything"].data, expected)
    tracks = viewer.layers["series tracks"]
    assert tracks.data.shape[1] == 5  # track, t, z, y, x
    np.testing.assert_allclose(tracks.data, table.tracks_data())
    assert int(expected.max()) == len(np.unique(sample.labels)) - 1


def test_link_z_on_a_series_links_each_time_point(make_napari_viewer, qtbot, truth):
    """z on a TZYX image: each time point's z-stack on its own, ids continuing (as
    ``mobilesam-everything --link z`` does), and no tracks."""
    sample = cell_time_series(2, (4, 48, 48), seed=1)
    planes = per_plane(sample.labels)
    truth(planes)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="series")
    w = _widget(viewer, "series", "z")
    _run(qtbot, w)
    first, _ = link_stack(planes[0], "z")
    second, _ = link_stack(planes[1], "z")
    second = np.where(second > 0, second + first.max(), 0)
    result = viewer.layers["series everything"].data
    np.testing.assert_array_equal(result, np.stack([first, second]))
    assert "series tracks" not in viewer.layers


@pytest.mark.parametrize(("axis", "n_done"), [("t", 3), ("zt", 6), ("z", 3)])
def test_link_cancel_keeps_the_planes_done_linked(make_napari_viewer, qtbot, truth, axis,
                                                  n_done):  # fmt: skip
    """Cancel: the planes done (the one running at Cancel included) stay, linked as
    link_stack links the stack with empty planes after them; for zt a time point cut
    short too; for z the last plane done too (held back until the next is linked). The
    tracks layer shows the tracks so far."""
    if axis == "t":
        sample = cell_time_series(8, (64, 64), seed=2)
    elif axis == "z":
        sample = cells_3d((8, 64, 64), seed=2)
    else:
        sample = cell_time_series(3, (4, 48, 48), seed=0)
    planes = per_plane(sample.labels)
    gate, entered = truth(planes, gate=True)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="cells")
    w = _widget(viewer, "cells", axis)
    w.run()
    gate.release(n_done - 1)
    qtbot.waitUntil(lambda: len(entered) == n_done, timeout=WAIT)
    w.cancel()
    gate.release(1)
    idle(qtbot, w)
    assert len(entered) == n_done  # no later plane ran
    cut = planes.copy().reshape(-1, *planes.shape[-2:])
    cut[n_done:] = 0
    expected, table = link_stack(cut.reshape(planes.shape), axis)
    result = viewer.layers["cells everything"].data
    np.testing.assert_array_equal(result, expected)
    assert (
        result.reshape(cut.shape)[n_done - 1].any() and not result.reshape(cut.shape)[n_done:].any()
    )
    if axis != "z":
        np.testing.assert_allclose(viewer.layers["cells tracks"].data, table.tracks_data())
    assert w.status.text() == f"cancelled; the {n_done} planes done are kept, linked,"
    assert w.run_button.isEnabled()


def test_object_table_and_commit_keep_the_linked_ids(make_napari_viewer, qtbot, truth):
    """The object table lists the linked ids per plane with their scores; Commit to
    labels gives each linked object one new id through all its planes."""
    from napari_mobilesam._widgets import ObjectsWidget

    sample = cell_time_series(5, (64, 64), seed=6)  # a division: more tracks than cells per frame
    planes = per_plane(sample.labels)
    truth(planes)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="movie")
    w = _widget(viewer, "movie", "t")
    _run(qtbot, w)
    result = viewer.layers["movie everything"]
    table = ObjectsWidget(viewer)
    viewer.window.add_dock_widget(table)
    table.labels_combo.setCurrentText(result.name)
    qtbot.waitUntil(lambda: not table.timer.isActive() and not table.runner.busy, timeout=WAIT)
    rows = [table.model.row(r) for r in range(table.model.rowCount())]
    expected = {(t, int(i)) for t in range(5) for i in np.unique(result.data[t]) if i}
    assert {(int(r["plane_0"]), int(r["id"])) for r in rows} == expected
    assert max(int(r["id"]) for r in rows) > max(int(p.max()) for p in planes)  # linked
    scores = scores_from(result.features, 1)
    for r in rows:
        assert r["predicted_iou"] == pytest.approx(scores[((int(r["plane_0"]),), int(r["id"]))][0])

    labels = viewer.add_labels(np.zeros(sample.labels.shape, np.uint32), name="movie_labels")
    y, x = np.argwhere(result.data[0] == 0)[0]  # on the background: no linked object there
    labels.data[0, y, x] = 7  # the user's object stays, new ids come after it
    ids = w.commit_to_labels()
    assert ids == list(range(8, 8 + int(result.data.max())))
    linked = result.data > 0
    pairs = np.unique(np.stack([result.data[linked], labels.data[linked]]), axis=1)
    assert len(pairs.T) == len(ids) and len(np.unique(pairs[1])) == len(ids)  # one to one
    carried = scores_from(labels.features, 1)
    assert len(carried) == len(scores)


def test_link_a_fresh_run_clears_the_earlier_per_plane_ids(make_napari_viewer, qtbot, truth):
    sample = cells_3d((6, 64, 64), seed=5)
    planes = per_plane(sample.labels)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="cells")
    w = _widget(viewer, "cells", "")
    w.scope.setCurrentIndex(1)
    truth(planes)
    _run(qtbot, w)
    np.testing.assert_array_equal(viewer.layers["cells everything"].data, planes)
    w.link.axis.setCurrentIndex(w.link.axis.findData("z"))
    truth(planes)
    _run(qtbot, w)
    result = viewer.layers["cells everything"]
    np.testing.assert_array_equal(result.data, link_stack(planes, "z")[0])
    assert len(scores_from(result.features, 1)) == sum(int(p.max()) for p in planes)


def test_tracks_layer_conflicts_stop_the_run(make_napari_viewer, qtbot, truth):
    from napari_mobilesam._widgets._layers import LayerConflict

    sample = cell_time_series(3, (48, 48), seed=0)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="movie")
    viewer.add_points(np.zeros((1, 3)), name="movie tracks")
    w = _widget(viewer, "movie", "t")
    truth(per_plane(sample.labels))
    with pytest.raises(LayerConflict, match="'movie tracks' is not the tracks of image 'movie'"):
        w.run()
    assert not w.runner.busy and "movie everything" not in viewer.layers
    # a Tracks layer of that name the plugin did not make for this image: the same
    del viewer.layers["movie tracks"]
    viewer.add_tracks(np.array([[1, 0, 5, 5], [1, 1, 6, 6]], float), name="movie tracks")
    with pytest.raises(LayerConflict, match="rename or remove it"):
        w.run()
    assert not w.runner.busy


@pytest.mark.slow
def test_link_the_tiny_models_planes_equals_link_stack(make_napari_viewer, qtbot,
                                                      tiny_predictor):  # fmt: skip
    """The model's own per-plane labels (no stand-in): the linked run equals link_stack
    on what an unlinked run of the same planes gives."""
    sample = cells_3d((4, 64, 64), seed=0)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="cells")
    w = _widget(viewer, "cells", "")
    w.points_per_side.setValue(4)
    w.pred_iou_thresh.setValue(0.0)  # random weights: keep every mask
    w.stability_score_thresh.setValue(0.0)
    w.scope.setCurrentIndex(1)
    _run(qtbot, w)
    unlinked = np.array(viewer.layers["cells everything"].data)
    assert unlinked.max() > 0
    w.link.axis.setCurrentIndex(w.link.axis.findData("z"))
    _run(qtbot, w)
    np.testing.assert_array_equal(viewer.layers["cells everything"].data,
                                  link_stack(unlinked, "z")[0])  # fmt: skip


def test_status_counts_read_in_the_singular_for_one():
    from napari_mobilesam._widgets._everything import counted

    assert counted(1, "3D objects") == "1 3D object"
    assert counted(2, "3D objects") == "2 3D objects"
    assert counted(0, "tracks") == "0 tracks"
    assert counted(1, "objects") == "1 object"


def _extend_widget(make_napari_viewer, truth, monkeypatch, predict):
    """A viewer whose everything widget links through z with *extend objects*, its
    segmentation the truth less each cell's end sections, its prompts ``predict``."""
    from napari_mobilesam._widgets import _extend

    sample = cells_3d((10, 96, 96), seed=3, radius=(8, 16), z_radius=(2, 4))
    monkeypatch.setattr(_extend, "prompter", lambda predictor, model_input: predict)
    planes = per_plane(without_ends(sample.labels))
    truth(planes)
    viewer = make_napari_viewer()
    viewer.add_image(sample.image, name="cells")
    w = _widget(viewer, "cells", "z")
    assert w.link.extend.isEnabled() and not w.link.extend.isChecked()
    w.link.extend.setChecked(True)
    linked, _ = link_stack(planes, "z")
    return viewer, w, sample, planes, linked


def test_link_extend_adds_the_missed_sections_as_the_library_does(
    make_napari_viewer, qtbot, truth, monkeypatch
):
    """With *extend objects*, the linked 3D objects are prompted into the planes next to
    them where they were missed, as ``linking.extend.extend_objects`` does (the model
    here: an oracle giving the true section under each box's centre, score 0.9); the
    added sections' scores join the object table."""
    from napari_mobilesam.linking.extend import THRESHOLDS, extend_objects

    labels = cells_3d((10, 96, 96), seed=3, radius=(8, 16), z_radius=(2, 4)).labels
    model = oracle(labels)
    viewer, w, _, planes, linked = _extend_widget(make_napari_viewer, truth, monkeypatch, model)
    _run(qtbot, w)
    expected = extend_objects(linked, model, **THRESHOLDS)
    assert expected.added
    result = viewer.layers["cells everything"]
    np.testing.assert_array_equal(result.data, expected.labels)
    objects = len({i for _, i, _, _ in expected.added})
    assert w.status.text().endswith(
        f"; {len(expected.added)} sections added to {objects} objects in planes where they "
        "were missed"
    )
    scores = scores_from(result.features, 1)
    for z, i, _, score in expected.added:
        assert scores[((z,), i)][0] == pytest.approx(score)
    assert len(scores) == sum(int(p.max()) for p in planes) + len(expected.added)
    # t links 2D frames: nothing to extend through z
    w.link.axis.setCurrentIndex(w.link.axis.findData("t"))
    assert not w.link.extend.isEnabled()


def test_link_extend_cancel_keeps_the_sections_added(make_napari_viewer, qtbot, truth, monkeypatch):
    """Cancel during the extension: the plane being prompted is finished and written,
    no other plane is prompted, and the status line says what is kept."""
    from napari_mobilesam.linking.extend import THRESHOLDS, sweep_stack

    labels = cells_3d((10, 96, 96), seed=3, radius=(8, 16), z_radius=(2, 4)).labels
    model, gate, calls = oracle(labels), threading.Semaphore(0), []

    def predict(z, boxes):
        calls.append(z)
        assert gate.acquire(timeout=WAIT / 1000)  # a hang guard only
        return model(z, boxes)

    viewer, w, _, _, linked = _extend_widget(make_napari_viewer, truth, monkeypatch, predict)
    w.run()
    qtbot.waitUntil(lambda: len(calls) == 1, timeout=WAIT)
    expected = linked.copy()  # the library's sweep, stopped after its first prompt
    sweep = sweep_stack(len(expected), lambda z: expected[z], None, model, **THRESHOLDS)
    z, new = next((z, new) for z, new in sweep if new is not None)
    assert new and z == calls[0]
    # meanwhile the user paints over part of where the extension is adding a section
    added = expected[z] != linked[z]
    rows = np.nonzero(added)[0]
    mine = added & (np.arange(added.shape[0])[:, None] <= np.median(rows))
    layer = viewer.layers["cells everything"]
    layer.data[z][mine] = 999
    w.cancel()
    gate.release(100)
    idle(qtbot, w)
    assert len(calls) == 1
    expected[z][mine] = 999  # the user's pixels stay; the section fills the rest
    np.testing.assert_array_equal(layer.data, expected)
    noun = "section" if len(new) == 1 else "sections"
    assert w.status.text() == (
        f"cancelled; the 10 planes done are kept, linked, and the {len(new)} {noun} added"
    )
    assert w.run_button.isEnabled()
