"""napari_mobilesam.validation: the shared argument checks and their messages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_mobilesam.validation import (
    as_float,
    check_bool_mask,
    check_contrast_limits,
    check_int,
    check_points,
    finite_array,
)


def test_as_float():
    assert as_float(3, "x") == 3.0 and isinstance(as_float(np.float32(0.5), "x"), float)
    assert as_float(math.inf, "x") == math.inf
    assert math.isnan(as_float(math.nan, "x", allow_nan=True))
    for bad in ("1", b"1", True, None, [1.0]):
        with pytest.raises(TypeError, match="x must be a number"):
            as_float(bad, "x")
    with pytest.raises(ValueError, match="x must be a number, got nan"):
        as_float(math.nan, "x")


def test_check_int():
    assert check_int(np.int16(4), "n") == 4 and type(check_int(np.int16(4), "n")) is int
    assert check_int(-3, "n") == -3 and check_int(5, "n", minimum=5, maximum=5) == 5
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int(bad, "n")
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int(0, "n", minimum=1)
    with pytest.raises(ValueError, match="n must be <= 3, got 4"):
        check_int(4, "n", maximum=3)
    with pytest.raises(ValueError, match=r"n must be in \[1, 3\], got 9"):
        check_int(9, "n", minimum=1, maximum=3)


def test_finite_array():
    arr = finite_array([[1, 2]], "a")
    assert arr.dtype == np.float64 and arr.shape == (1, 2)
    with pytest.raises(ValueError, match="a must be numeric"):
        finite_array([["x", "y"]], "a")
    with pytest.raises(ValueError, match="a contains NaN or infinite values"):
        finite_array([1, np.inf], "a")


def test_check_points():
    pts, lab = check_points([[1, 2], [3, 4]], [1, 0])
    assert pts.dtype == np.float64 and lab.dtype == np.int64 and lab.tolist() == [1, 0]
    assert check_points(None, None) == (None, None)
    pts, lab = check_points([[1, 2]], None, default_label=1)
    assert lab.tolist() == [1]
    pts, lab = check_points(np.zeros((3, 2, 2)), np.ones((3, 2)), batched=True)
    assert pts.shape == (3, 2, 2) and lab.shape == (3, 2)


@pytest.mark.parametrize(
    ("coords", "labels", "kwargs", "match"),
    [
        (None, [1], {}, "point_labels given without point_coords"),
        ([[1, 2]], None, {}, r"point_coords given without point_labels \(1 foreground"),
        ([1, 2], [1], {}, r"point_coords must have shape \(N, 2\) as \(x, y\)"),
        (np.zeros((0, 2)), [], {}, r"must have shape \(N, 2\)"),
        ([[1, 2]], [1], {"batched": True}, r"must have shape \(B, N, 2\)"),
        ([[1, 2]], [1, 1], {}, r"point_labels must have shape \(1,\) to match"),
        ([[1, 2]], [2], {}, r"point_labels must be 1 \(foreground\) or 0 \(background\), got \[2"),
        ([[1, np.nan]], [1], {}, "point_coords contains NaN"),
        ([[1, 2]], ["a"], {}, "point_labels must be numeric"),
        (
            [[1, 2, 3]], None,
            {"coords_name": "points_rc", "order": "(row, col)", "default_label": 1},
            r"points_rc must have shape \(N, 2\) as \(row, col\)",
        ),
    ],
)  # fmt: skip
def test_check_points_errors(coords, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_points(coords, labels, **kwargs)


def test_check_bool_mask():
    m = np.ones((2, 3), bool)
    assert check_bool_mask(m, (2, 3)) is not None
    with pytest.raises(TypeError, match="m must be a bool array, got dtype float64"):
        check_bool_mask(m.astype(float), (2, 3), "m")
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 2\), got \(2, 3\)"):
        check_bool_mask(m, (3, 2))
    with pytest.raises(ValueError, match="mask is empty"):
        check_bool_mask(~m, (2, 3))


def test_check_contrast_limits():
    assert check_contrast_limits(None, 2) is None
    assert check_contrast_limits((0, 10), 2) == [(0.0, 10.0), (0.0, 10.0)]
    assert check_contrast_limits([(0, 1), (2, 2)], 2) == [(0.0, 1.0), (2.0, 2.0)]
    for bad in ((5, 1), (0, np.nan), "ab", (1, 2, 3), [(0, 1)] * 3):
        with pytest.raises(ValueError, match=r"contrast_limits must be \(lo, hi\)"):
            check_contrast_limits(bad, 2)
