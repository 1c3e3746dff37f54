"""Resize and coordinate conversions (the only (row, col) <-> (x, y) code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from napari_mobilesam import transforms as T
from napari_mobilesam.accel import resize as R
from napari_mobilesam.accel.resize import PillowResize, pil_bilinear_matrix


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((770, 769), (1024, 1023)),
        ((660, 550), (1024, 853)),
        ((1024, 1024), (1024, 1024)),
        ((3, 2000), (2, 1024)),
        ((1, 1), (1024, 1024)),
    ],
)
def test_preprocess_shape(size, expected):
    assert T.preprocess_shape(*size, 1024) == expected


def test_preprocess_shape_rejects_empty():
    with pytest.raises(ValueError, match="image size must be positive"):
        T.preprocess_shape(0, 10, 1024)


def test_resize_is_pil_bilinear(rng):
    img = rng.integers(0, 256, size=(50, 30, 3), dtype=np.uint8)
    out = T.resize_longest_side(img, 64)
    assert out.shape == (64, 38, 3)
    np.testing.assert_array_equal(
        out, np.asarray(Image.fromarray(img).resize((38, 64), Image.BILINEAR))
    )
    same = rng.integers(0, 256, size=(64, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.resize_longest_side(same, 64), same)


@pytest.mark.parametrize("bad", [np.zeros((5, 5), np.uint8), np.zeros((5, 5, 3), np.uint16)])
def test_resize_needs_rgb_uint8(bad):
    with pytest.raises(ValueError, match="RGB uint8"):
        T.resize_longest_side(bad, 64)


def test_coords_and_boxes(rng):
    coords = rng.uniform(0, 500, size=(7, 2))
    out = T.apply_coords(coords, (500, 250), 1024)
    np.testing.assert_allclose(out, coords * [512 / 250, 1024 / 500])
    box = np.array([10.0, 20.0, 30.0, 40.0])
    np.testing.assert_allclose(T.apply_boxes(box, (500, 250), 1024), [20.48, 40.96, 61.44, 81.92])
    tc = T.apply_coords_torch(torch.as_tensor(coords), (500, 250), 1024)
    np.testing.assert_allclose(tc.numpy(), out)
    tb = T.apply_boxes_torch(torch.as_tensor(box[None]), (500, 250), 1024)
    np.testing.assert_allclose(tb.numpy()[0], [20.48, 40.96, 61.44, 81.92])
    tr = T.ResizeLongestSide(1024)
    np.testing.assert_allclose(tr.apply_coords(coords, (500, 250)), out)
    assert tr.get_preprocess_shape(500, 250, 1024) == (1024, 512)


def test_rc_xy_round_trip(rng):
    rc = rng.uniform(0, 100, size=(6, 2))
    xy = T.rc_to_xy(rc)
    np.testing.assert_array_equal(xy[:, 0], rc[:, 1])
    np.testing.assert_array_equal(T.xy_to_rc(xy), rc)
    with pytest.raises(ValueError, match=r"\(N, 2\) as \(row, col\)"):
        T.rc_to_xy(np.zeros(3))
    with pytest.raises(ValueError, match=r"\(N, 2\) as \(x, y\)"):
        T.xy_to_rc(np.zeros((2, 3)))


def test_napari_rectangle_to_box():
    corners = np.array([[40, 10], [40, 30], [5, 30], [5, 10]])  # (row, col), any order
    box = T.corners_rc_to_xyxy(corners)
    np.testing.assert_array_equal(box, [10, 5, 30, 40])
    np.testing.assert_array_equal(T.corners_rc_to_xyxy(T.xyxy_to_corners_rc(box)), box)
    with pytest.raises(ValueError, match="box corners"):
        T.corners_rc_to_xyxy(np.zeros((1, 2)))


# --- resize on the device ------------------------------------------------------------

# upscaling, shrinking (antialiased), one axis unchanged, tall images (which recent
# Pillow shrinks vertical pass first), the exact-2:1 edge, tiny and identity sizes
RESIZE_SIZES = [(770, 769), (512, 300), (2048, 1536), (3000, 200), (1677, 7), (2001, 1000),
                (2002, 1001), (200, 3000), (1023, 3), (5, 7), (1, 3), (1024, 700),
                (97, 1203)]  # fmt: skip


def _both_calls_equal_pillow(img, long_side):
    """The first call of a size learns Pillow's pass order, the second uses it."""
    expected = T.resize_longest_side(img, long_side)
    tensor = torch.from_numpy(img).permute(2, 0, 1)
    resize = PillowResize(long_side)
    for _ in range(2):
        ours = resize(tensor)
        assert ours.dtype == torch.uint8
        np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), expected,
                                      err_msg=f"{img.shape} -> {long_side}")  # fmt: skip


@pytest.mark.parametrize("size", RESIZE_SIZES)
def test_torch_resize_is_pillow_byte_for_byte(size, rng):
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    smooth = np.ascontiguousarray(np.sort(image, axis=0))  # gradients as well as noise
    for img in (image, smooth):
        _both_calls_equal_pillow(img, 1024)


def test_torch_resize_random_sizes_and_targets(rng):
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 900, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        _both_calls_equal_pillow(img, int(rng.integers(8, 700)))


def test_torch_resize_learns_pillows_pass_order_once_per_size(monkeypatch, rng):
    calls = []
    real = T.resize_longest_side
    monkeypatch.setattr(R, "resize_longest_side", lambda *a: calls.append(1) or real(*a))
    resize = PillowResize(128)
    for shape in ((300, 100), (100, 300)):  # tall: vertical first in recent Pillow
        img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        first = resize(torch.from_numpy(img).permute(2, 0, 1))
        second = resize(torch.from_numpy(img).permute(2, 0, 1))
        assert torch.equal(first, second)
    assert len(calls) == 2 and set(resize.pass_order) == {(300, 100), (100, 300)}
    # an image that cannot tell the orders apart (constant) teaches nothing
    flat = torch.full((3, 50, 20), 7, dtype=torch.uint8)
    expected = torch.full((3, 32, 13), 7, dtype=torch.uint8)
    small = PillowResize(32)
    assert torch.equal(small(flat), expected)
    assert (50, 20) not in small.pass_order
    assert PillowResize(32).pass_order == {}  # each object learns for itself


def test_torch_resize_stays_with_pillow_where_no_order_matches(rng):
    def wrong(image, h, w, vertical_first):
        return torch.zeros(3, h, w, dtype=torch.uint8)

    resize = PillowResize(40, passes=wrong)
    img = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    for _ in range(2):
        ours = resize(torch.from_numpy(img).permute(2, 0, 1))
        np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), T.resize_longest_side(img, 40))
    assert resize.pass_order == {(60, 90): None}


def test_torch_resize_forgets_beyond_max_sizes(rng):
    resize = PillowResize(16, max_sizes=2)
    for size in ((30, 20), (20, 30), (40, 20)):
        img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        resize(torch.from_numpy(img).permute(2, 0, 1))
    assert list(resize.pass_order) == [(40, 20)]


def test_pil_bilinear_matrix_rows_are_normalised():
    for n_in, n_out in ((770, 1024), (3000, 1024), (7, 4), (1, 5)):
        m = pil_bilinear_matrix(n_in, n_out)
        assert m.shape == (n_out, n_in) and np.all(m == np.round(m))
        assert np.all(np.abs(m.sum(1) - 2**22) <= m.shape[1])  # rounding of each weight


@pytest.mark.parametrize("sizes", [(0, 4), (4, 0), (-1, 3)])
def test_pil_bilinear_matrix_rejects_empty(sizes):
    with pytest.raises(ValueError, match="sizes must be positive"):
        pil_bilinear_matrix(*sizes)


@pytest.mark.parametrize(
    "bad", [torch.zeros(4, 4, 3, dtype=torch.uint8), torch.zeros(3, 4, 4), torch.zeros(4, 4)]
)
def test_torch_resize_needs_chw_uint8(bad):
    with pytest.raises(ValueError, match=r"needs a \(3, H, W\) uint8 tensor"):
        PillowResize(64)(bad)
