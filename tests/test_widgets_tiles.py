"""Headless napari: the prompt widget on large (tiled) images and multiscale layers.

Tiles are made small (a 300 x 340 image, 128 px tiles) so that the tests stay fast; the
widget's sessions get those sizes through a patched ``PromptSession``. The model's masks
are made non-empty by a disk around each point (the tiny model's own point masks are
empty), so that previews and commits have pixels."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from napari_mobilesam.interactive import PromptSession

from .widget_support import disk_masks, idle  # skips the module without napari or a display

TILES = {"tile_threshold": 256, "tile_size": 128, "tile_overlap": 32}
RADIUS = 6


@pytest.fixture
def tiled(monkeypatch, tiny_predictor):
    """Small tiles in the widget's sessions, and point masks with a disk at each point."""
    from napari_mobilesam._widgets import _prompt

    monkeypatch.setattr(_prompt, "PromptSession", functools.partial(PromptSession, **TILES))
    return disk_masks(monkeypatch, tiny_predictor, RADIUS)


def _image(shape=(300, 340)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(500, 3000, shape).astype(np.uint16)


def _widget(viewer, layer):
    from napari_mobilesam._widgets import PromptWidget

    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image_combo.setCurrentText(layer.name)
    return w


def _texts(w) -> list[str]:
    """Every text the status line gets from now on."""
    out: list[str] = []
    real = w.status.setText
    w.status.setText = lambda text: (out.append(text), real(text))[1]
    return out


def _disk(shape, rc) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - rc[0]) ** 2 + (xx - rc[1]) ** 2 <= RADIUS**2


def _canvas(viewer) -> np.ndarray:
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))
    assert shot[..., :3].std() > 0  # something is drawn
    return shot


def _refreshes(layer, monkeypatch) -> list[int]:
    """Counts the full refreshes of ``layer``."""
    calls: list[int] = []
    real = layer.refresh
    monkeypatch.setattr(layer, "refresh", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def test_tiled_image_status_preview_and_commit(make_napari_viewer, qtbot, tiled, monkeypatch):
    viewer = make_napari_viewer(show=True)  # (a hidden viewer's screenshots are black)
    layer = viewer.add_image(_image(), name="big")
    w = _widget(viewer, layer)
    w.start()
    idle(qtbot, w)
    session, state = w.session, w.state
    assert session.tiles is not None and len(session.tiles) == 12
    assert w.status.text() == (
        "tiled: 12 tiles of 128 px; a tile is embedded at your first click in it"
    )
    _canvas(viewer)  # drawn once: the layers' textures have the planes' shape
    assert tuple(state.preview.colormap.map(1)) == (0.0, 1.0, 1.0, 1.0)  # cyan, no object's
    texts = _texts(w)
    preview_refreshes = _refreshes(state.preview, monkeypatch)
    labels_refreshes = _refreshes(state.labels, monkeypatch)

    first = (40, 50)
    tile = session.tile_for([first])
    state.points.add(np.array([first], float))
    idle(qtbot, w)
    assert f"embedding tile {tile + 1} of 12…" in texts
    assert session.is_tile_cached((), tile)
    prediction = w.prediction
    assert prediction.window == session.tiles.window(tile)
    assert np.array_equal(prediction.mask, _disk((300, 340), first))  # full-plane mask
    assert np.array_equal(state.preview.data, prediction.mask.astype(np.uint8))

    texts.clear()  # a point in the same tile: no embedding to wait for
    w.clear()
    second = (60, 45)
    assert session.tile_for([second]) == tile
    state.points.add(np.array([second], float))
    idle(qtbot, w)
    assert not any("embedding" in t for t in texts)
    assert np.array_equal(state.preview.data, _disk((300, 340), second).astype(np.uint8))

    w.clear()  # another tile: the old preview is gone, the new one is there
    third = (250, 300)
    other = session.tile_for([third])
    assert other != tile
    state.points.add(np.array([third], float))
    idle(qtbot, w)
    assert f"embedding tile {other + 1} of 12…" in texts
    assert np.array_equal(state.preview.data, _disk((300, 340), third).astype(np.uint8))
    assert preview_refreshes == []  # only the regions that changed were redrawn
    viewer.camera.center, viewer.camera.zoom = third, 8.0  # the object fills the canvas
    shown = _canvas(viewer)
    state.preview.refresh()  # what a full redraw shows: the same
    assert np.array_equal(_canvas(viewer), shown)

    new_id = w.commit()
    assert new_id == 1
    expected = np.where(_disk((300, 340), third), 1, 0)
    assert np.array_equal(state.labels.data, expected)
    assert not state.preview.data.any()
    assert labels_refreshes == []
    shown = _canvas(viewer)
    state.labels.refresh()
    assert np.array_equal(_canvas(viewer), shown)
    labels_refreshes.clear()
    w.undo()
    assert not state.labels.data.any()
    assert labels_refreshes == []  # the object's region only
    shown = _canvas(viewer)
    state.labels.refresh()
    assert np.array_equal(_canvas(viewer), shown)


def test_tiled_stack_commits_into_its_plane(make_napari_viewer, qtbot, tiled, monkeypatch):
    viewer = make_napari_viewer(show=True)
    layer = viewer.add_image(np.stack([_image(), _image()]), name="stack")
    viewer.dims.current_step = (1, 0, 0)
    w = _widget(viewer, layer)
    w.start()
    idle(qtbot, w)
    state = w.state
    assert w.status.text().startswith("plane (1,): tiled: 12 tiles of 128 px")
    _canvas(viewer)
    refreshes = _refreshes(state.labels, monkeypatch)
    state.points.add(np.array([[1, 150.0, 170.0]]))
    idle(qtbot, w)
    viewer.camera.center, viewer.camera.zoom = (150, 170), 8.0
    assert w.commit() == 1
    assert np.array_equal(state.labels.data[1], _disk((300, 340), (150, 170)))
    assert not state.labels.data[0].any() and refreshes == []
    shown = _canvas(viewer)
    state.labels.refresh()
    assert np.array_equal(_canvas(viewer), shown)
    w.precompute()
    assert w.progress.maximum() == 24  # 12 tiles on each of 2 planes
    idle(qtbot, w)
    assert w.status.text() == "all 24 tiles embedded"


def test_prompt_across_tiles_says_which_tiles(make_napari_viewer, qtbot, tiled):
    viewer = make_napari_viewer()
    layer = viewer.add_image(_image(), name="big")
    w = _widget(viewer, layer)
    w.start()
    idle(qtbot, w)
    texts = _texts(w)
    points = np.array([[20.0, 20.0], [280.0, 320.0]])  # far apart: stitched
    assert w.session.tile_for(points) is None
    with w.state.points.events.data.blocker():
        w.state.points.add(points[:1])
    w.state.points.add(points[1:])
    idle(qtbot, w)
    [message] = [t for t in texts if t.startswith("embedding tiles")]
    assert message.endswith("of 12 (the prompt crosses them)…")
    mask = w.prediction.mask
    assert mask[20, 20] and mask[280, 320] and mask.shape == (300, 340)


def test_precompute_counts_tiles_and_cancel_keeps_them(make_napari_viewer, qtbot, tiled):
    viewer = make_napari_viewer()
    layer = viewer.add_image(_image(), name="big")
    w = _widget(viewer, layer)
    w.start()
    idle(qtbot, w)
    w.precompute()
    assert w.progress.maximum() == 12 and w.progress.format() == "%v / %m tiles"
    idle(qtbot, w)
    assert w.status.text() == "all 12 tiles embedded"
    assert all(w.session.is_tile_cached((), t) for t in range(12))


def test_precompute_lets_a_click_go_first(make_napari_viewer, qtbot, tiled, monkeypatch):
    from .widget_support import Gate

    viewer = make_napari_viewer()
    layer = viewer.add_image(_image(), name="big")
    w = _widget(viewer, layer)
    w.start()
    idle(qtbot, w)
    gate = Gate(monkeypatch, tiled, "set_image")
    w.precompute()
    qtbot.waitUntil(lambda: gate.entered == 1)  # tile 1 embeds
    w.state.points.add(np.array([[250.0, 300.0]]))  # tile 12: waits for tile 1 only
    gate.release(1)
    qtbot.waitUntil(lambda: gate.entered == 2)
    gate.release(1)  # the click's tile
    qtbot.waitUntil(lambda: w.prediction is not None)
    assert w.prediction.mask[250, 300]
    assert 1 <= w.progress.value() <= 2  # precompute resumed after the click
    w.cancel()
    gate.release(100)
    idle(qtbot, w)
    assert w.status.text().startswith("precompute cancelled:")
    assert w.status.text().endswith("of 12 tiles embedded (kept)")


def _pyramid(level0: np.ndarray, reads: list):
    """Two dask levels; ``reads`` gets the (row, col) block of every level-0 chunk read."""
    da = pytest.importorskip("dask.array")

    def record(block, block_info=None):
        reads.append(tuple(block_info[0]["chunk-location"]))
        return block

    base = da.from_array(level0, chunks=64).map_blocks(record, dtype=level0.dtype)
    return [base, da.from_array(level0[::2, ::2], chunks=64)]


def test_multiscale_layer_works_on_full_resolution(make_napari_viewer, qtbot, tiled):
    level0 = _image()
    reads: list = []
    viewer = make_napari_viewer()
    layer = viewer.add_image(
        _pyramid(level0, reads), multiscale=True, name="pyr", scale=(0.5, 0.25),
        translate=(10.0, -4.0), contrast_limits=(0, 4000),
    )  # fmt: skip
    w = _widget(viewer, layer)
    w.start()
    idle(qtbot, w)
    state, session = w.state, w.session
    assert session.shape_hw == (300, 340) and len(session.tiles) == 12
    assert not isinstance(session.planes.image, np.ndarray)  # level 0, lazy
    for new in (state.points, state.box, state.preview, state.labels):
        assert tuple(new.scale) == (0.5, 0.25) and tuple(new.translate) == (10.0, -4.0)
    assert state.labels.data.shape == (300, 340)

    reads.clear()
    world = np.array([10.0 + 0.5 * 120, -4.0 + 0.25 * 200])  # pixel (120, 200) of level 0
    rc = np.asarray(state.points.world_to_data(world))
    assert np.allclose(rc, [120, 200])
    state.points.add(rc[None])  # where a click at ``world`` puts it
    idle(qtbot, w)
    mask = w.prediction.mask
    assert mask.shape == (300, 340)  # full resolution
    assert np.array_equal(mask, _disk((300, 340), (120, 200)))
    blocks = set(reads)
    assert blocks and len(blocks) < 5 * 6  # one tile's chunks, never the whole level
    assert w.commit() == 1
    assert np.array_equal(state.labels.data > 0, mask)


def test_scaled_stack_plane_follows_the_sliders(make_napari_viewer, qtbot, tiny_predictor):
    from napari_mobilesam._widgets._common import current_plane

    viewer = make_napari_viewer()
    stack = np.zeros((5, 40, 40), np.uint16)
    layer = viewer.add_image(stack, scale=(3.0, 1.0, 1.0), translate=(6.0, 0.0, 0.0))
    viewer.dims.set_point(0, 6.0 + 3.0 * 2)  # world z of plane 2
    assert current_plane(viewer, layer) == (2,)
    viewer.add_image(np.zeros((20, 40, 40)), name="deep")  # sliders before the stack
    viewer.dims.set_point(0, 2.0)
    assert current_plane(viewer, layer) is None


def test_point_outside_the_plane_embeds_nothing(make_napari_viewer, qtbot, tiled):
    viewer = make_napari_viewer()
    layer = viewer.add_image(_image(), name="big")
    w = _widget(viewer, layer)
    w.start()
    idle(qtbot, w)
    texts = _texts(w)
    w.state.points.add(np.array([[-40.0, 500.0]]))  # napari lets a click land off the image
    idle(qtbot, w)
    assert not any("embedding" in t for t in texts)
    assert w.status.text().startswith("failed: ValueError")
    assert not any(w.session.is_tile_cached((), t) for t in range(12))
