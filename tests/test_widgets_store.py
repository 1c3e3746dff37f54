"""Headless napari: the prompt widget opens an embedding store made by ``mobilesam embed``'s
API for its image (chosen, or found beside the image file at Start), predicts without the
encoder, and names a store that does not fit without losing the session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_mobilesam.interactive import ImagePlanes, PromptSession
from napari_mobilesam.predictor import Predictor
from napari_mobilesam.store import StoreCache, embed_planes, open_for

from .widget_support import idle  # skips the module without napari or a display


@pytest.fixture
def shown(monkeypatch) -> list[str]:
    """The notifications of the store module (and of the widget), in order."""
    from napari_mobilesam._widgets import _common, _prompt, _store

    out: list[str] = []
    for module in (_store, _prompt, _common):
        monkeypatch.setattr(module, "show_info", out.append)
    return out


def _stack() -> np.ndarray:
    """(4, 48, 64) uint16 with a bright square moving through the planes."""
    rng = np.random.default_rng(1)
    data = rng.integers(300, 600, (4, 48, 64)).astype(np.uint16)
    for z in range(4):
        data[z, 10 + 2 * z : 26 + 2 * z, 20:38] += 2500
    return data


def _embed(stack, path: Path, model, limits) -> Path:
    """What ``mobilesam embed`` does (with ``--contrast-limits``), for ``model``."""
    planes = ImagePlanes(stack, contrast_limits=limits)
    predictor = Predictor(model)
    embed_planes(open_for(path, planes, predictor), planes, predictor)
    return path


def _widget(viewer, layer):
    from napari_mobilesam._widgets import PromptWidget

    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image_combo.setCurrentText(layer.name)
    return w


def _click(qtbot, w, plane, rc):
    w.state.points.add(np.array([[*plane, *rc]], dtype=float))
    idle(qtbot, w)
    return w.prediction


def test_chosen_store_predicts_without_the_encoder(make_napari_viewer, qtbot, tiny_predictor,
                                                   encoder_calls, shown, tmp_path,
                                                   monkeypatch):  # fmt: skip
    from napari_mobilesam._widgets import _store

    stack = _stack()
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack, name="stack")
    limits = tuple(float(v) for v in layer.contrast_limits)
    store = _embed(stack, tmp_path / "stack.embeddings.zarr", tiny_predictor.model, limits)
    encoder_calls.clear()

    w = _widget(viewer, layer)
    monkeypatch.setattr(
        _store.QFileDialog, "getExistingDirectory", staticmethod(lambda *a: str(store))
    )
    w.store_button().click()  # (a second button, as the dock's, for the test)
    assert "checked at Start" in w.status.text()
    viewer.dims.current_step = (0, 0, 0)
    w.start()
    idle(qtbot, w)
    assert w.status.text() == "embeddings from stack.embeddings.zarr: 4 planes"
    assert isinstance(w.session.cache, StoreCache) and w.state.store == store
    assert w.session.cache.loads == 1 and encoder_calls == []  # plane 0 from the store

    first = _click(qtbot, w, (0,), (15, 28))
    viewer.dims.current_step = (2, 0, 0)
    idle(qtbot, w)
    second = _click(qtbot, w, (2,), (20, 28))
    assert first is not None and second is not None
    assert encoder_calls == [] and w.session.cache.loads == 2  # the click: no encoder run
    assert shown == []

    ref = PromptSession(Predictor(tiny_predictor.model), stack, contrast_limits=limits)
    ref.embed((2,))
    expected = ref.predict([[20, 28]], [1])
    assert np.array_equal(second.low_res, expected.low_res)  # same embedding, same logits
    assert np.array_equal(second.masks, expected.masks)


def test_mismatching_store_is_named_and_the_session_works(make_napari_viewer, qtbot,
                                                          tiny_predictor, encoder_calls,
                                                          shown, tmp_path):  # fmt: skip
    stack = _stack()
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack, name="stack")
    viewer.dims.current_step = (1, 0, 0)
    w = _widget(viewer, layer)
    w.start()
    idle(qtbot, w)
    assert encoder_calls == [1]  # the shown plane, computed
    cache = w.session.cache

    other = _embed(stack, tmp_path / "other.zarr", tiny_predictor.model, (0.0, 1000.0))
    encoder_calls.clear()
    w.open_store(other)
    idle(qtbot, w)
    assert len(shown) == 1
    assert "other.zarr" in shown[0] and "contrast_limits" in shown[0]
    assert "(normalisation)" in shown[0] and str(tmp_path) not in shown[0]  # short: the name
    assert shown[0] == f"MobileSAM: {w.status.text()}"
    assert w.session.cache is cache and w.state.store is None  # unchanged

    (tmp_path / "plain").mkdir()
    w.open_store(tmp_path / "plain")
    idle(qtbot, w)
    assert "plain is not an embedding store" in shown[1]
    w.open_store(tmp_path / "missing.zarr")
    idle(qtbot, w)
    assert shown[2] == "MobileSAM: no embedding store at missing.zarr"

    assert _click(qtbot, w, (1,), (17, 28)) is not None  # the session still answers
    assert encoder_calls == []  # the shown plane: from its own cache


def test_store_beside_the_file_is_used_at_start(make_napari_viewer, qtbot, tiny_predictor,
                                                encoder_calls, shown, tmp_path):  # fmt: skip
    stack = _stack()
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, stack)
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari")
    assert layer.source.path == str(path)
    limits = tuple(float(v) for v in layer.contrast_limits)
    _embed(stack, tmp_path / "cells.embeddings.zarr", tiny_predictor.model, limits)
    encoder_calls.clear()
    viewer.dims.current_step = (3, 0, 0)
    w = _widget(viewer, layer)
    w.start()
    idle(qtbot, w)
    assert w.status.text() == "embeddings from cells.embeddings.zarr: 4 planes"
    assert _click(qtbot, w, (3,), (22, 28)) is not None
    assert encoder_calls == [] and shown == []


def test_store_beside_that_does_not_fit_is_a_quiet_status(make_napari_viewer, qtbot,
                                                          tiny_predictor, encoder_calls,
                                                          shown, tmp_path):  # fmt: skip
    stack = _stack()
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, stack)
    _embed(stack[:2], tmp_path / "cells.embeddings.zarr", tiny_predictor.model, (0.0, 9.0))
    encoder_calls.clear()
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari")
    w = _widget(viewer, layer)
    viewer.dims.current_step = (0, 0, 0)
    w.start()
    idle(qtbot, w)
    assert shown == []  # no dialog for a store nobody chose
    text = w.status.text()
    assert "cells.embeddings.zarr" in text and "plane_shape [2] != [4] (image)" in text
    assert text.endswith("computing the embeddings instead")
    assert encoder_calls == [1] and w.state.store is None
    assert _click(qtbot, w, (0,), (15, 28)) is not None


def test_store_beside_names():
    from napari_mobilesam._widgets._store import brief, store_beside

    assert store_beside(None) is None
    assert store_beside("/nowhere/x.tif") is None  # no such store
    assert brief(PermissionError("denied"), "/data/x.embeddings.zarr") == (
        "cannot read the embedding store x.embeddings.zarr: denied"
    )


def test_store_beside_finds_the_convention(tmp_path):
    from napari_mobilesam._widgets._store import store_beside

    (tmp_path / "a.embeddings.zarr").mkdir()
    assert store_beside(tmp_path / "a.tif") == tmp_path / "a.embeddings.zarr"
    assert store_beside(tmp_path / "a.ome.tif") == tmp_path / "a.embeddings.zarr"
    assert store_beside(tmp_path / "a.ome.zarr") == tmp_path / "a.embeddings.zarr"
    assert store_beside(tmp_path / "a.embeddings.zarr") is None  # the store itself
    assert store_beside(tmp_path / "b.tif") is None


def test_a_tiled_image_does_not_use_a_whole_plane_store(make_napari_viewer, qtbot,
                                                        tiny_predictor, shown,
                                                        tmp_path):  # fmt: skip
    image = np.random.default_rng(2).integers(0, 4000, (64, 2100)).astype(np.uint16)
    viewer = make_napari_viewer()
    layer = viewer.add_image(image, name="wide")
    limits = tuple(float(v) for v in layer.contrast_limits)
    store = _embed(image, tmp_path / "wide.embeddings.zarr", tiny_predictor.model, limits)
    w = _widget(viewer, layer)
    w.start()
    idle(qtbot, w)
    assert w.session.tiles is not None
    w.open_store(store)
    idle(qtbot, w)
    assert len(shown) == 1 and "wide.embeddings.zarr holds whole-plane embeddings" in shown[0]
    assert "'wide' are tiled" in shown[0] and not isinstance(w.session.cache, StoreCache)
