"""Large planes: the tile grid, windows of planes, and a PromptSession answering prompts
from tile embeddings (each result checked against the same model on the tile's crop)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.interactive import ImagePlanes, ObjectPrompt, PromptSession
from napari_mobilesam.interactive.tiles import TileGrid
from napari_mobilesam.predictor import Predictor

# -- the grid ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, size, overlap",
    [
        ((5000, 3000), 1024, 256),
        ((2049, 1024), 1024, 0),
        ((700, 900), 256, 64),
        ((100, 80), 256, 64),
    ],
)
def test_grid_covers_overlaps_and_owns_every_pixel_once(shape, size, overlap):
    grid = TileGrid(shape, size, overlap)
    h, w = shape
    covered = np.zeros(shape, np.int32)
    owned = np.zeros(shape, np.int32)
    for t in range(len(grid)):
        r0, c0, r1, c1 = grid.window(t)
        assert 0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w
        assert r1 - r0 == min(size, h) and c1 - c0 == min(size, w)
        covered[r0:r1, c0:c1] += 1
        o = grid.owned(t)
        assert r0 <= o[0] < o[2] <= r1 and c0 <= o[1] < o[3] <= c1  # owned inside the tile
        owned[o[0] : o[2], o[1] : o[3]] += 1
    assert covered.min() >= 1 and (owned == 1).all()
    n_rows, n_cols = grid.grid_shape
    windows = grid.windows()
    for i in range(n_rows):  # neighbours overlap by at least `overlap`
        for j in range(n_cols - 1):
            a, b = windows[i * n_cols + j], windows[i * n_cols + j + 1]
            assert a[3] - b[1] >= overlap
    rng = np.random.default_rng(0)
    for r, c in zip(rng.integers(0, h, 50), rng.integers(0, w, 50), strict=True):
        t = grid.owner(r, c)
        o = grid.owned(t)
        assert o[0] <= r < o[2] and o[1] <= c < o[3]


def test_grid_owner_is_the_most_central_tile():
    grid = TileGrid((2048, 2048), 1024, 256)  # starts 0, 512, 1024 on both axes
    assert grid.grid_shape == (3, 3)
    # row 700 lies in tiles starting at 0 (324 px from its end) and 512 (188 px in)
    assert grid.window(grid.owner(700, 10))[0] == 0
    assert grid.window(grid.owner(800, 10))[0] == 512
    assert grid.owner(-5, 99999) == grid.owner(0, 2047)  # clipped into the plane


def test_grid_containing_and_crossing():
    grid = TileGrid((2048, 2048), 1024, 256)
    t = grid.containing((600, 600, 700, 700))
    r0, c0, r1, c1 = grid.window(t)
    assert r0 <= 600 and 700 < r1 and c0 <= 600 and 700 < c1
    assert grid.containing((100, 100, 1500, 200)) is None  # taller than a tile
    # a box in the overlap only: held by a tile although its centre's owner lacks it
    box = (900, 10, 1030, 50)
    t = grid.containing(box)
    assert t is not None and grid.window(t)[0] <= 900 and grid.window(t)[2] > 1030
    crossing = grid.crossing((100, 100, 1500, 200))
    assert [grid.window(t)[1] for t in crossing] == [0, 0, 0]
    assert len(grid.crossing((0, 0, 2047, 2047))) == len(grid)
    near = grid.near(1000, 1000, radius=1)
    assert near[0] == grid.owner(1000, 1000) and len(near) == 9
    assert grid.near(0, 0, radius=0) == [0]


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="overlap must be smaller than tile_size"):
        TileGrid((4000, 4000), 512, 512)
    with pytest.raises(ValueError, match=r"shape_hw must be \(H, W\)"):
        TileGrid((4000,), 512, 0)
    with pytest.raises(ValueError, match="tile_size"):
        TileGrid((4000, 4000), 8, 0)
    with pytest.raises(TypeError, match="overlap"):
        TileGrid((4000, 4000), 512, 1.5)
    grid = TileGrid((1000, 1000), 512, 0)
    with pytest.raises(ValueError, match="below the number of tiles"):
        grid.window(4)
    with pytest.raises(ValueError, match="radius"):
        grid.near(0, 0, radius=-1)


# -- windows of planes ------------------------------------------------------------------


class _Recording:
    """An array that records the keys it is read with (a stand-in for dask or zarr)."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.keys = a, a.shape, a.dtype, []

    def __getitem__(self, key):
        self.keys.append(key)
        return self.a[key]


def test_plane_window_and_sample_read_only_what_they_need():
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 4000, size=(2, 3, 300, 400), dtype=np.uint16)  # (C, Z, H, W)
    image = _Recording(stack)
    planes = ImagePlanes(image, channel_axis=0)
    window = planes.window((1,), (10, 20, 110, 70))
    np.testing.assert_array_equal(window, np.moveaxis(stack[:, 1, 10:110, 20:70], 0, -1))
    assert image.keys[-1] == (slice(None), 1, slice(10, 110), slice(20, 70))
    sample = planes.sample((2,), max_pixels=300 * 400 // 8)  # every 3rd row and column
    np.testing.assert_array_equal(sample, np.moveaxis(stack[:, 2, ::3, ::3], 0, -1))
    rgb = ImagePlanes(rng.integers(0, 255, size=(50, 60, 3), dtype=np.uint8), rgb=True)
    assert rgb.window((), (0, 0, 5, 6)).shape == (5, 6, 3)
    np.testing.assert_array_equal(planes.plane((0,)), np.moveaxis(stack[:, 0], 0, -1))


def test_plane_window_rejects_windows_outside_the_plane():
    planes = ImagePlanes(np.zeros((100, 120), np.uint16))
    for bad in [(0, 0, 101, 10), (5, 5, 5, 10), (-1, 0, 10, 10)]:
        with pytest.raises(ValueError, match="window must be"):
            planes.window((), bad)
    with pytest.raises(TypeError, match="window"):
        planes.window((), (0, 0, 10.5, 10))
    with pytest.raises(ValueError, match="max_pixels"):
        planes.sample((), max_pixels=0)


# -- a tiled session (tiny model: 128 px input; tiles of 128 px) --------------------------

TILES = {"tile_threshold": 256, "tile_size": 128, "tile_overlap": 32}


def _image(shape=(300, 340), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(1000, 100, size=shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for r, c in rng.integers(20, min(shape) - 20, size=(12, 2)):
        image[(yy - r) ** 2 + (xx - c) ** 2 < 100] += 2000
    return image.astype(np.uint16)


def _on_crop(predictor, image, window, limits, points_xy=None, labels=None, box=None, multi=True):
    r0, c0, r1, c1 = window
    predictor.set_image(image[r0:r1, c0:c1], contrast_limits=limits)
    return predictor.predict(points_xy, labels, box, multimask_output=multi)


def test_a_large_plane_is_tiled_and_a_small_one_is_not(tiny_model):
    predictor = Predictor(tiny_model)
    assert PromptSession(predictor, _image((256, 256)), **TILES).tiles is None
    session = PromptSession(predictor, _image(), **TILES)
    assert session.tiles is not None and session.tiles.grid_shape == (3, 4)
    never = PromptSession(predictor, _image(), **{**TILES, "tile_threshold": None})
    assert never.tiles is None
    with pytest.raises(ValueError, match="tile_threshold"):
        PromptSession(predictor, _image(), tile_threshold=0)
    with pytest.raises(ValueError, match="overlap must be smaller"):
        PromptSession(predictor, _image(), tile_size=128, tile_overlap=200)


def test_a_point_is_answered_from_its_tile_exactly_as_on_the_crop(tiny_model, encoder_calls):
    image = _image()
    session = PromptSession(Predictor(tiny_model), image, **TILES)
    assert session.embed(()) is False and encoder_calls == []  # no tile embedded yet
    limits = session.tile_contrast_limits(())
    lo, hi = np.percentile(image[::1, ::1], [0.5, 99.5])
    assert limits == pytest.approx((lo, hi))
    pred = session.predict([[150, 170]])
    assert encoder_calls == [1] and pred.masks.shape == (3, 300, 340)
    tile = session.tiles.owner(150, 170)
    assert pred.window == session.tiles.window(tile)
    r0, c0, r1, c1 = pred.window
    masks, scores, low_res = _on_crop(
        Predictor(tiny_model), image, pred.window, limits, np.array([[170 - c0, 150 - r0]]),
        np.array([1]),
    )  # fmt: skip
    np.testing.assert_array_equal(pred.low_res, low_res)
    np.testing.assert_array_equal(pred.scores, scores)
    np.testing.assert_array_equal(pred.masks[:, r0:r1, c0:c1], masks)
    assert not pred.masks[:, :r0].any() and not pred.masks[:, r1:].any()
    assert encoder_calls == [1, 1]  # the crop
    session.predict([[152, 171]], mask_input=pred.mask_input)  # same tile: cached
    assert encoder_calls == [1, 1]
    assert session.is_cached(()) is False


def test_precompute_embeds_every_tile_once(tiny_model, encoder_calls):
    image = np.stack([_image(seed=0), _image(seed=1)])
    session = PromptSession(Predictor(tiny_model), image, **TILES)
    steps = []
    assert (
        session.precompute([(1,)], progress=lambda done, total: steps.append((done, total))) == 12
    )
    assert steps[-1] == (12, 12) and len(encoder_calls) == 12 and session.is_cached((1,))
    assert session.precompute([(1,)]) == 0 and len(encoder_calls) == 12
    stop = iter([False, False, True])
    assert session.precompute([(0,)], should_stop=lambda: next(stop)) == 2


def test_a_box_across_tiles_is_stitched_from_each_tile(tiny_model):
    image = _image()
    session = PromptSession(Predictor(tiny_model), image, **TILES)
    session.embed(())
    box = (40, 50, 250, 300)  # (r0, c0, r1, c1), larger than a tile
    pred = session.predict(box_rc=box)
    assert pred.masks.shape == (1, 300, 340) and pred.scores.shape == (1,)
    grid, limits = session.tiles, session.tile_contrast_limits(())
    crop = Predictor(tiny_model)
    expected = np.zeros((300, 340), bool)
    for t in grid.crossing(box):
        r0, c0, r1, c1 = w = grid.window(t)
        clipped = [max(50, c0), max(40, r0), min(300, c1 - 1), min(250, r1 - 1)]
        local = np.array(clipped, float) - [c0, r0, c0, r0]
        masks, _, _ = _on_crop(crop, image, w, limits, box=local, multi=False)
        o = grid.owned(t)
        expected[o[0] : o[2], o[1] : o[3]] = masks[0][o[0] - r0 : o[2] - r0, o[1] - c0 : o[3] - c0]
    np.testing.assert_array_equal(pred.mask, expected)


def test_predict_many_on_tiles_equals_one_by_one(tiny_model):
    session = PromptSession(Predictor(tiny_model), _image(), **TILES)
    session.embed(())
    prompts = [
        ObjectPrompt(points_rc=[[30, 40]]),
        ObjectPrompt(points_rc=[[280, 320]]),
        ObjectPrompt(points_rc=[[20, 30]], box_rc=(10, 10, 60, 60)),
        ObjectPrompt(box_rc=(10, 10, 290, 330)),  # stitched
    ]
    many = session.predict_many(prompts)
    for p, got in zip(prompts, many, strict=True):
        one = session.predict(p.points_rc, p.labels, p.box_rc, multimask=False)
        np.testing.assert_allclose(got.scores, one.scores, atol=1e-5)
        assert got.window == one.window
        assert (got.mask != one.mask).mean() < 1e-3


def test_propagation_through_a_tiled_stack_embeds_only_the_tiles_it_needs(
    tiny_model, encoder_calls
):
    stack = np.stack([_image(seed=s) for s in range(3)])
    session = PromptSession(Predictor(tiny_model), stack, **TILES)
    mask = np.zeros((300, 340), bool)
    mask[100:140, 100:150] = True  # inside one tile
    rule = {"min_score": -1.0, "min_area_ratio": 1e-6, "max_planes": 1}
    found = session.propagate((1,), mask, axis=0, **rule)
    # planes 0 and 2, one tile each (the tiny model's masks are empty: the walk stops)
    assert len(encoder_calls) == 2 and set(found) <= {(0,), (2,)}
    labels = np.zeros((300, 340), np.uint32)
    labels[100:140, 100:150], labels[200:230, 250:300] = 1, 2  # two other tiles
    result = session.propagate_all((1,), labels, axis=0, **rule)
    assert len(encoder_calls) == 4 and set(result.masks) <= {1, 2}


def test_uint8_tiles_are_not_rescaled_and_contrast_limits_win(tiny_model):
    predictor = Predictor(tiny_model)
    image8 = (_image() // 16).astype(np.uint8)
    assert PromptSession(predictor, image8, **TILES).tile_contrast_limits(()) is None
    fixed = PromptSession(predictor, _image(), contrast_limits=(900, 3000), **TILES)
    assert fixed.tile_contrast_limits(()) == (900.0, 3000.0)
    rgb = np.stack([_image(seed=s) for s in range(3)], axis=-1)
    limits = PromptSession(predictor, rgb, rgb=True, **TILES).tile_contrast_limits(())
    assert len(limits) == 3 and all(lo < hi for lo, hi in limits)


def test_which_tile_answers_and_whether_it_is_embedded(tiny_model):
    session = PromptSession(Predictor(tiny_model), _image(), **TILES)
    tile = session.tile_for([[150, 170]])
    assert tile == session.tiles.owner(150, 170)
    assert session.tile_for(box_rc=(10, 10, 290, 330)) is None  # stitched
    session.embed(())
    assert not session.is_tile_cached((), tile)
    session.predict([[150, 170]])
    assert session.is_tile_cached((), tile)
    with pytest.raises(ValueError, match="below the number of tiles"):
        session.is_tile_cached((), 99)
    small = PromptSession(Predictor(tiny_model), _image((200, 200)), **TILES)
    assert small.tile_for([[5, 5]]) is None
    with pytest.raises(ValueError, match="needs a tiled session"):
        small.is_tile_cached((), 0)


@pytest.mark.slow
def test_bench_tiles_runs(tiny_model):
    """benchmarks/bench_tiles.py on a small mosaic with the tiny model (numbers unchecked)."""
    from benchmarks import bench_tiles

    result = bench_tiles.run(size=2100, n_cells=3, repeats=1, model=tiny_model)
    assert result["quality"]["n_tiles"] == 9 and len(result["quality"]["cells"]) == 3
    assert "ratio to 1024 px" in bench_tiles.report(result)


@pytest.mark.parametrize(
    "prompt",
    [
        {"points_rc": [[-50, -50]]},
        {"points_rc": [[400, 10]]},
        {"points_rc": [[10, 10], [290, 330]], "labels": [0, 0]},  # background only
    ],
)
def test_prompts_with_nothing_inside_the_plane_are_refused(tiny_model, prompt):
    session = PromptSession(Predictor(tiny_model), _image(), **TILES)
    session.embed(())
    with pytest.raises(ValueError, match="nothing to segment inside the plane"):
        session.predict(**prompt)
    clipped = session.predict(box_rc=(-10, -10, 500, 500))  # clipped to the plane
    assert clipped.masks.shape == (1, 300, 340)
