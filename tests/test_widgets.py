"""Headless napari (Xvfb via pytest-xvfb): the widgets on a real viewer with a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from napari_mobilesam.normalize import to_rgb_uint8
from napari_mobilesam.predictor import Predictor

from .widget_support import (  # skips the module without napari or a display
    WAIT,
    idle,
)


def _blobs(shape=(96, 120), centers=((40, 50),), value=3000):
    img = np.full(shape, 300, np.uint16)
    for c in centers:
        img[disk(c, 14, shape=shape)] = value
    return img


def _prompt_widget(viewer, qtbot, image_layer):
    from napari_mobilesam._widgets import PromptWidget

    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image_combo.setCurrentText(image_layer.name)
    w.start()
    idle(qtbot, w)
    assert w.session is not None
    return w


def _clicked(viewer, qtbot, predictor):
    """The prompt widget on two blobs after a click at (40, 50), and the predictor's own
    masks and scores for that point (converted (row, col) -> (x, y))."""
    img = _blobs(centers=((40, 50), (70, 95)))
    layer = viewer.add_image(img, contrast_limits=(0, 4000))
    w = _prompt_widget(viewer, qtbot, layer)
    w.state.points.add(np.array([[40.0, 50.0]]))
    idle(qtbot, w)
    ref = Predictor(predictor.model)
    ref.set_image(to_rgb_uint8(img, contrast_limits=(0, 4000)))
    masks, scores, _ = ref.predict(np.array([[50.0, 40.0]]), np.array([1]))
    return w, masks, scores


def test_point_prompt_preview_commit_undo(make_napari_viewer, qtbot, golden_predictor):
    viewer = make_napari_viewer()
    w, masks, scores = _clicked(viewer, qtbot, golden_predictor)
    # the preview is the predictor's best mask for that point
    expected = masks[int(np.argmax(scores))]
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(w.state.preview.data.astype(bool), expected)
    assert "predicted IoU" in w.status.text()

    target = w.state.labels
    assert w.commit() == 1
    assert target.data.max() == 1 and len(w.state.points.data) == 0
    w.state.points.add(np.array([[70.0, 95.0]]))
    idle(qtbot, w)
    # (the random model's masks cover much of the image: mostly inside object 1)
    w.overlap.setCurrentText("overwrite")
    assert w.commit() == 2
    w.undo()
    assert target.data.max() == 1
    w.start()  # Start again (e.g. after choosing another model): a new session, same undo
    idle(qtbot, w)
    assert w.state.labels is target and target.data.max() == 1
    w.undo()
    assert target.data.max() == 0


def test_negative_points_and_cycle(make_napari_viewer, qtbot, golden_predictor):
    viewer = make_napari_viewer()
    layer = viewer.add_image(_blobs())
    w = _prompt_widget(viewer, qtbot, layer)
    w.state.points.add(np.array([[40.0, 50.0]]))
    idle(qtbot, w)
    w.toggle_negative()
    w.state.points.add(np.array([[10.0, 10.0]]))
    idle(qtbot, w)
    points, labels, box = w.prompts()
    assert labels.tolist() == [1, 0] and box is None
    np.testing.assert_allclose(points, [[40, 50], [10, 10]])
    w.clear()
    w.state.points.add(np.array([[40.0, 50.0]]))  # negative again until toggled
    idle(qtbot, w)
    w.toggle_negative()
    w.state.points.add(np.array([[41.0, 50.0]]))
    idle(qtbot, w)
    choices = set()
    for _ in range(3):
        w.next_mask()
        idle(qtbot, w)
        choices.add(w.prediction.choice)
    assert len(choices) >= 1 and w.multimask.currentIndex() == 0  # X keeps best of 3


def test_next_mask_shows_each_candidate_whole(make_napari_viewer, qtbot, golden_predictor):
    """X steps through a click's three candidates; each preview is that candidate exactly
    (they are upsampled when first shown, and the redraw region holds all of them)."""
    w, masks, _ = _clicked(make_napari_viewer(), qtbot, golden_predictor)
    assert w.prediction.masks.upsampled == 1  # only the one shown
    shown = []
    for _ in range(3):
        w.next_mask()
        idle(qtbot, w)
        k = w.prediction.choice
        shown.append(k)
        np.testing.assert_array_equal(w.state.preview.data.astype(bool), masks[k])
    assert sorted(shown) == [0, 1, 2] and w.prediction.masks.upsampled == 3


def test_changing_masks_mode_answers_the_shown_prompt_again(
    make_napari_viewer, qtbot, golden_predictor
):
    w, masks, scores = _clicked(make_napari_viewer(), qtbot, golden_predictor)
    assert len(w.prediction.scores) == 3
    w.multimask.setCurrentText("single")  # no new click: the point shown is answered again
    idle(qtbot, w)
    assert len(w.prediction.scores) == 1
    w.multimask.setCurrentText("best of 3")
    idle(qtbot, w)
    assert len(w.prediction.scores) == 3
    expected = masks[int(np.argmax(scores))]
    np.testing.assert_array_equal(w.state.preview.data.astype(bool), expected)


def test_box_prompt(make_napari_viewer, qtbot, tiny_predictor):
    viewer = make_napari_viewer()
    img = _blobs()
    layer = viewer.add_image(img, contrast_limits=(0, 4000))
    w = _prompt_widget(viewer, qtbot, layer)
    w.state.box.add_rectangles(np.array([[60.0, 70.0], [20.0, 30.0]]))
    idle(qtbot, w)
    ref = Predictor(tiny_predictor.model)
    ref.set_image(to_rgb_uint8(img, contrast_limits=(0, 4000)))
    masks, _, _ = ref.predict(box=np.array([30.0, 20.0, 70.0, 60.0]), multimask_output=False)
    np.testing.assert_array_equal(w.state.preview.data.astype(bool), masks[0])


def test_plane_change_recomputes_then_caches(make_napari_viewer, qtbot, tiny_predictor,
                                            monkeypatch):  # fmt: skip
    stack = np.stack([_blobs(centers=((30 + 5 * z, 40 + 5 * z),)) for z in range(4)])
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack)
    calls = []
    real = tiny_predictor.set_image
    monkeypatch.setattr(
        tiny_predictor, "set_image", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )
    viewer.dims.current_step = (0, 0, 0)
    w = _prompt_widget(viewer, qtbot, layer)
    assert len(calls) == 1 and w.session.current == (0,)
    viewer.dims.current_step = (2, 0, 0)
    idle(qtbot, w)
    assert len(calls) == 2 and w.session.current == (2,)
    viewer.dims.current_step = (0, 0, 0)
    idle(qtbot, w)
    assert len(calls) == 2 and w.session.current == (0,)  # from the cache


@pytest.mark.slow  # ~8 s: the golden model on 3 planes
def test_propagate_fills_neighbouring_planes(make_napari_viewer, qtbot, golden_predictor):
    stack = np.stack([_blobs(centers=((40 + z, 50 + z),)) for z in range(5)])
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack, contrast_limits=(0, 4000))
    viewer.dims.current_step = (2, 0, 0)
    w = _prompt_widget(viewer, qtbot, layer)
    w.state.points.add(np.array([[2.0, 42.0, 52.0]]))
    idle(qtbot, w)
    w.prop_min_score.setValue(0.0)  # random weights: accept any score
    w.propagate()
    idle(qtbot, w)
    target = w.state.labels.data
    filled = [z for z in range(5) if (target[z] == 1).any()]
    assert 2 in filled and len(filled) >= 2
    assert set(np.unique(target)) <= {0, 1}
    assert "propagated" in w.status.text()
    # every plane of the object has its predicted IoU and stability for the object table
    features = w.state.labels.features
    assert sorted(np.asarray(features["plane_0"]).tolist()) == filled
    assert np.isfinite(np.asarray(features["predicted_iou"], dtype=float)).all()
    stability = np.asarray(features["stability_score"], dtype=float)
    assert np.isfinite(stability).all() and ((stability >= 0) & (stability <= 1)).all()
    # a new object on another plane gets the next id of the whole layer
    viewer.dims.current_step = (4, 0, 0)
    idle(qtbot, w)
    w.state.points.add(np.array([[4.0, 44.0, 54.0]]))
    idle(qtbot, w)
    w.overlap.setCurrentText("overwrite")  # (the random model's mask may lie on object 1)
    assert w.commit() == 2


def test_everything_widget_plane_and_stack(make_napari_viewer, qtbot, tiny_predictor):
    from napari_mobilesam._widgets import EverythingWidget

    stack = np.stack([_blobs(centers=((40, 50), (70, 95))) for _ in range(2)])
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="cells")
    w = EverythingWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.points_per_side.setValue(4)
    w.pred_iou_thresh.setValue(0.0)
    w.stability_score_thresh.setValue(0.0)
    w.run()
    idle(qtbot, w)
    out = viewer.layers["cells everything"]
    assert out.data.shape == stack.shape and out.data.dtype == np.uint32
    assert out.data[0].max() > 0 and out.data[1].max() == 0  # the shown plane only
    w.scope.setCurrentIndex(1)
    w.run()
    idle(qtbot, w)
    assert viewer.layers["cells everything"].data[1].max() > 0
    assert "objects in 2 planes; cpu: torch, " in w.status.text()  # and what ran them


def test_everything_widget_passes_every_parameter(make_napari_viewer):
    import inspect

    from napari_mobilesam._widgets import EverythingWidget, _everything

    viewer = make_napari_viewer()
    w = EverythingWidget(viewer)
    accepted = inspect.signature(_everything.MaskGenerator).parameters
    for name, value in w.parameters().items():  # the generator's defaults
        assert value == pytest.approx(accepted[name].default), name
    w.min_visible_fraction.setValue(0.2)
    w.min_mask_region_area.setValue(30)
    assert w.parameters()["refine_rounds"] == 0  # off, as the generator's default
    w.refine_rounds.setValue(1)
    w.max_covered_fraction.setValue(1.0)
    params = w.parameters()
    assert params["min_visible_fraction"] == pytest.approx(0.2)
    assert params["refine_rounds"] == 1
    assert params["max_covered_fraction"] == 1.0
    assert set(params) <= set(accepted)  # every key is a MaskGenerator argument


def test_precompute_all_planes_on_disk(make_napari_viewer, qtbot, tiny_predictor, tmp_path,
                                      monkeypatch):  # fmt: skip
    monkeypatch.setenv("MOBILESAM_EMBEDDINGS", str(tmp_path / "emb"))
    stack = np.stack([_blobs(centers=((30 + 5 * z, 40),)) for z in range(3)])
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack)
    from napari_mobilesam._widgets import PromptWidget

    w = PromptWidget(viewer)
    w.image_combo.setCurrentText(layer.name)
    w.disk_cache.setChecked(True)
    w.start()
    qtbot.waitUntil(lambda: len(list((tmp_path / "emb").glob("emb-*.pt"))) == 3, timeout=WAIT)
    idle(qtbot, w)
    assert w.progress.value() == w.progress.maximum()
    # a new widget (a later session) finds every plane on disk: the encoder does not run
    calls = []
    real = tiny_predictor.set_image
    monkeypatch.setattr(
        tiny_predictor, "set_image", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    w2 = PromptWidget(viewer)
    w2.image_combo.setCurrentText(layer.name)
    w2.disk_cache.setChecked(True)
    w2.start()
    idle(qtbot, w2)
    assert calls == [] and w2.session.current == w2.current_plane()


def test_everything_cancel(make_napari_viewer, qtbot, tiny_predictor):
    from napari_mobilesam._widgets import EverythingWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_blobs() for _ in range(30)]), name="cells")
    w = EverythingWidget(viewer)
    w.scope.setCurrentIndex(1)
    w.points_per_side.setValue(4)
    w.pred_iou_thresh.setValue(0.0)  # random weights: keep every mask
    w.stability_score_thresh.setValue(0.0)
    w.run()
    qtbot.waitUntil(lambda: w.progress.value() >= 1, timeout=WAIT)
    w.cancel()
    idle(qtbot, w)
    # the planes done (the one running at Cancel included) are kept, no later one ran
    out = viewer.layers["cells everything"].data
    done = [z for z in range(30) if out[z].any()]
    assert 1 <= len(done) < 30 and done == list(range(len(done)))
    kept = "the 1 plane done is" if len(done) == 1 else f"the {len(done)} planes done are"
    assert w.status.text() == f"cancelled; {kept} kept"
    assert w.run_button.isEnabled()


def test_errors_become_notifications(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    from napari_mobilesam._widgets import PromptWidget, _common

    shown = []
    monkeypatch.setattr(_common, "show_error", shown.append)
    viewer = make_napari_viewer()
    viewer.add_image(_blobs())
    w = PromptWidget(viewer)
    w.model.weights.setText(str(tmp_path / "missing.pt"))
    w.start()
    idle(qtbot, w)
    assert shown and "missing.pt" in shown[0] and w.session is None


def test_sample_data_and_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    for key in ("cells", "cell_stack", "cell_movie", "coins"):
        viewer.open_sample("napari-mobilesam", key)
    assert len(viewer.layers) == 4
    assert viewer.layers["synthetic cell stack"].data.shape == (12, 256, 256)
    assert viewer.layers["synthetic cells"].data.dtype == np.uint16


def test_npe2_validate():
    import subprocess
    import sys
    from pathlib import Path

    npe2 = Path(sys.executable).with_name("npe2")
    out = subprocess.run([str(npe2), "validate", "napari-mobilesam"], capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_model_picker_passes_backend_and_precision(qtbot, monkeypatch, tmp_path):
    from napari_mobilesam._widgets import _common, _model

    calls = []
    monkeypatch.setattr(_common, "get_predictor", lambda *a: calls.append(a) or "predictor")
    picker = _model.ModelPicker()
    qtbot.addWidget(picker)
    assert picker.precision.currentText() == "fp32"  # the reference's numbers by default
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"stand-in")
    picker.weights.setText(str(weights))
    picker.backend.setCurrentText("auto")
    picker.precision.setCurrentText("auto")
    assert picker.predictor() == "predictor"
    assert calls == [("vit_t", str(weights), "auto", "auto", "auto", None)]
    assert picker.max_upscale.currentText() == "model default"  # vit_t's: SAM's resize
    picker.max_upscale.setCurrentText("1.5")
    picker.predictor()
    assert calls[-1] == ("vit_t", str(weights), "auto", "auto", "auto", 1.5)
    picker.max_upscale.setCurrentText("model default")
    picker.name.setCurrentText("vit_t_synthetic_cells")  # trained at 2x for 256 px planes
    picker.predictor()
    assert calls[-1][0] == "vit_t_synthetic_cells" and calls[-1][-1] == 2.0
    picker.max_upscale.setCurrentText("none")
    picker.predictor()
    assert calls[-1][-1] is None


def test_get_predictor_shares_engines_per_upscale_limit(monkeypatch, tiny_model):
    """One engine per (model, ..., max upscale): the limit reaches the predictor."""
    from napari_mobilesam._widgets import _common

    monkeypatch.setattr(_common, "load_model", lambda *a, **k: tiny_model)
    monkeypatch.setattr(_common, "_ENGINES", {})
    a = _common.get_predictor("vit_t", None, "cpu", max_upscale=2.0)
    b = _common.get_predictor("vit_t", None, "cpu", max_upscale=2.0)
    c = _common.get_predictor("vit_t", None, "cpu")
    assert a.engine is b.engine and a.engine is not c.engine
    assert a.engine.frames.max_upscale == 2.0 and c.engine.frames.max_upscale is None


def test_both_widgets_at_once_on_one_predictor(make_napari_viewer, qtbot, tiny_predictor):
    """Segment-everything on one image and prompts on another, in their own workers on the
    shared predictor: every preview equals a single-threaded prediction (before the
    predictor lock, some came back with the other image's shape or raised)."""
    from napari_mobilesam._widgets import EverythingWidget

    viewer = make_napari_viewer()
    img = _blobs(centers=((40, 50), (70, 95)))
    layer = viewer.add_image(img, contrast_limits=(0, 4000))
    stack = np.random.default_rng(0).integers(0, 4000, (6, 64, 80), dtype=np.uint16)
    viewer.add_image(stack, name="stack")
    w = _prompt_widget(viewer, qtbot, layer)
    e = EverythingWidget(viewer)
    viewer.window.add_dock_widget(e)
    e.image_combo.setCurrentText("stack")
    e.scope.setCurrentIndex(1)
    e.points_per_side.setValue(16)
    ref = Predictor(tiny_predictor.model)
    ref.set_image(img, contrast_limits=(0, 4000))

    e.run()
    overlapped = 0
    for i in range(8):
        r, c = 20.0 + 7 * i, 30.0 + 9 * i
        w.state.points.data = np.array([[r, c]])
        overlapped += e.runner.busy
        idle(qtbot, w)
        masks, _, low_res = ref.predict(np.array([[c, r]]), np.array([1]))
        assert w.prediction is not None
        np.testing.assert_array_equal(w.prediction.masks, masks)
        np.testing.assert_array_equal(w.prediction.low_res, low_res)
    idle(qtbot, e)
    assert overlapped >= 1  # the prompts really ran beside segment-everything
    assert viewer.layers["stack everything"].data.shape == stack.shape


def test_a_short_dock_scrolls_instead_of_clipping(make_napari_viewer, qtbot):
    """Both widgets stacked in a window shorter than their controls: each dock scrolls,
    and no button is squeezed below its natural height (it was clipped before)."""
    from napari_mobilesam._widgets import EverythingWidget, PromptWidget
    from napari_mobilesam._widgets._scroll import MIN_HEIGHT

    viewer = make_napari_viewer(show=True)
    w, e = PromptWidget(viewer), EverythingWidget(viewer)
    viewer.window.add_dock_widget(w, area="right")
    viewer.window.add_dock_widget(e, area="right")
    viewer.window.resize(1100, 600)
    qtbot.waitUntil(lambda: w.scroll_area.verticalScrollBar().maximum() > 0, timeout=WAIT)
    qtbot.waitUntil(lambda: e.scroll_area.verticalScrollBar().maximum() > 0, timeout=WAIT)
    for button in (w.start_button, w.prop_button, w.prop_all_button, e.run_button):
        assert button.height() >= button.sizeHint().height(), button.text()
    for dock in (w, e):  # the docks share the height: neither shrinks to its title
        assert dock.scroll_area.viewport().height() >= MIN_HEIGHT - 20
    # with room, a dock asks for its controls' full height (no scroll bar at opening)
    hint = w.scroll_area.sizeHint().height()
    assert hint >= w.scroll_area.widget().sizeHint().height() > 400


def test_one_model_setting_for_both_widgets(make_napari_viewer, qtbot, tmp_path):
    """Weights entered in one widget are the other's too; backend and precision are
    under a collapsed 'advanced' group."""
    from napari_mobilesam._widgets import EverythingWidget, PromptWidget

    viewer = make_napari_viewer()
    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    weights = tmp_path / "w.pt"
    w.model.weights.setText(str(weights))  # entered once, before the other widget exists
    e = EverythingWidget(viewer)
    viewer.window.add_dock_widget(e)
    spec = ("vit_t", str(weights), "auto", "torch", "fp32", None)
    assert e.model.spec() == w.model.spec() == spec
    e.model.name.setCurrentText("vit_t_synthetic_cells")
    e.model.precision.setCurrentText("bf16")
    e.model.max_upscale.setCurrentText("2")
    spec = ("vit_t_synthetic_cells", str(weights), "auto", "torch", "bf16", 2.0)
    assert w.model.spec() == spec
    w.model.weights.setText("")
    assert e.model.spec()[1] is None
    # an empty weights field says where the weights come from, in both widgets
    for picker in (w.model, e.model):
        assert picker.weights.placeholderText().startswith("bundled weights")
    w.model.name.setCurrentText("vit_t")
    for picker in (w.model, e.model):
        assert picker.weights.placeholderText() == "registry weights (downloaded once)"
    # advanced: hidden until opened, in each widget on its own
    for picker in (w.model, e.model):
        assert not picker.advanced.isChecked() and picker.advanced_box.isHidden()
        assert picker.advanced_box.isAncestorOf(picker.backend)
        assert picker.advanced_box.isAncestorOf(picker.precision)
        assert picker.advanced_box.isAncestorOf(picker.max_upscale)
    w.model.advanced.click()
    assert not w.model.advanced_box.isHidden() and e.model.advanced_box.isHidden()
    # another viewer has a setting of its own
    other = PromptWidget(make_napari_viewer())
    qtbot.addWidget(other)
    assert other.model.spec()[0] == "vit_t"
