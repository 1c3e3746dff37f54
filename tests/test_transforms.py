"""Resize and coordinate conversions (the only (row, col) <-> (x, y) code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from napari_mobilesam import transforms as T


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
