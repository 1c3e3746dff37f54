"""Tests for napari_mobilesam.normalize: any 2-D plane -> RGB uint8 (H, W, 3)."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from skimage.draw import disk

from napari_mobilesam import normalize
from napari_mobilesam.normalize import auto_contrast_limits, to_rgb_uint8

ALL_DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_]


def _disk_image(dtype, shape=(32, 40), value=200):
    """Background 0 with a bright disk of ``value`` (True for bool)."""
    img = np.zeros(shape, dtype=dtype)
    rr, cc = disk((16, 20), 8, shape=shape)
    img[rr, cc] = True if dtype == np.bool_ else value
    return img


def _check_rgb(out, shape):
    assert out.shape == (*shape, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


# ----------------------------------------------------------------------- dtypes, layout


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_gray_gives_gray_rgb(dtype):
    img = _disk_image(dtype)
    out = to_rgb_uint8(img)
    _check_rgb(out, img.shape)
    assert np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 0], out[..., 2])
    inside = img.astype(bool)
    # uint8 keeps its values; everything else spans the full range (two-level image)
    expected_max = 200 if dtype == np.uint8 else 255
    assert (out[inside] == expected_max).all()
    assert (out[~inside] == 0).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_channels_first(dtype):
    img = np.stack([_disk_image(dtype), np.zeros((32, 40), dtype), _disk_image(dtype)])
    out = to_rgb_uint8(img, channel_axis=0)
    _check_rgb(out, (32, 40))
    inside = img[0].astype(bool)
    assert (out[inside, 0] > 0).all()
    assert (out[..., 1] == 0).all()
    assert np.array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("channel_axis", [0, 1, 2, -1, -3])
def test_channel_axis_any_position(channel_axis):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    moved = np.moveaxis(rgb, -1, channel_axis)
    assert np.array_equal(to_rgb_uint8(moved, channel_axis=channel_axis), rgb)


def test_rgb_uint8_pass_through_bit_identical():
    rgb = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    out = to_rgb_uint8(rgb)
    assert out.dtype == np.uint8
    assert out.tobytes() == rgb.tobytes()
    assert np.shares_memory(out, rgb)  # no copy of a contiguous RGB uint8 image
    # a non-contiguous RGB view comes back contiguous with the same values
    view = rgb[::2, ::-1]
    out = to_rgb_uint8(view)
    assert out.flags.c_contiguous
    assert np.array_equal(out, view)


def test_rgba_uint8_drops_alpha():
    rgba = np.random.default_rng(2).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    out = to_rgb_uint8(rgba)
    _check_rgb(out, (5, 6))
    assert np.array_equal(out, rgba[..., :3])


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 1)])
def test_uint8_gray_replicated_without_rescaling(shape):
    img = np.arange(42, dtype=np.uint8).reshape(shape) + 10  # 10..51, not rescaled
    out = to_rgb_uint8(img)
    _check_rgb(out, (6, 7))
    for c in range(3):
        assert np.array_equal(out[..., c], img.reshape(6, 7))


def test_bool_maps_to_0_and_255():
    img = np.array([[False, True], [True, False]])
    out = to_rgb_uint8(img)
    assert np.array_equal(out[..., 0], [[0, 255], [255, 0]])


def test_rgb_uint16_percentiles_per_channel():
    i = np.arange(256, dtype=np.uint16).reshape(1, 256)
    img = np.stack([i, 1000 + 100 * i, 3 * i], axis=-1)
    out = to_rgb_uint8(img, percentiles=(0, 100))
    # each channel has its own range (0..255, 1000..26500, 0..765): all become i
    for c in range(3):
        assert np.array_equal(out[..., c], i)


# ------------------------------------------------------------------- contrast limits


def test_explicit_contrast_limits_exact_values():
    img = np.array([[0, 100, 150], [220, 300, 1000]], dtype=np.uint16)
    out = to_rgb_uint8(img, contrast_limits=(100, 300))
    # clip to [100, 300], (v - 100) * 255 / 200, rint: 150 -> 63.75 -> 64, 220 -> 153
    expected = np.array([[0, 0, 64], [153, 255, 255]], dtype=np.uint8)
    assert np.array_equal(out[..., 0], expected)
    assert np.array_equal(out[..., 1], expected)
    assert np.array_equal(out[..., 2], expected)


def test_explicit_contrast_limits_rescale_uint8_and_float():
    img = np.array([[0, 8, 20, 30]], dtype=np.uint8)
    assert np.array_equal(to_rgb_uint8(img, contrast_limits=(0, 20))[0, :, 0], [0, 102, 255, 255])
    flt = np.array([[-1.0, 0.25, 0.6, 2.0]], dtype=np.float32)
    assert np.array_equal(to_rgb_uint8(flt, contrast_limits=[0, 1])[0, :, 0], [0, 64, 153, 255])


def test_bool_with_contrast_limits_treated_as_0_1():
    img = np.array([[False, True]])
    assert np.array_equal(to_rgb_uint8(img, contrast_limits=(0, 2.5))[0, :, 0], [0, 102])


def test_per_channel_contrast_limits():
    img = np.array([[[10.0, 10.0, 10.0], [20.0, 20.0, 20.0]]])  # (1, 2, 3)
    limits = [(10, 20), (0, 25), (0, 50)]
    out = to_rgb_uint8(img, contrast_limits=limits)
    assert np.array_equal(out[0], [[0, 102, 51], [255, 204, 102]])


def test_per_channel_contrast_limits_follow_picked_channels():
    img = np.zeros((2, 2, 5), dtype=np.uint16)
    img[..., 3] = 50
    img[..., 1] = 100
    out = to_rgb_uint8(img, channel_axis=2, channels=[3, 1], contrast_limits=[(0, 50), (0, 250)])
    assert (out[..., 0] == 255).all()
    assert (out[..., 1] == 102).all()
    assert (out[..., 2] == 0).all()


def test_equal_contrast_limits_threshold():
    img = np.array([[1.0, 5.0, 9.0]])
    assert np.array_equal(to_rgb_uint8(img, contrast_limits=(5, 5))[0, :, 0], [0, 0, 255])


# ------------------------------------------------------------------------ percentiles


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
def test_auto_contrast_limits_on_ramp(dtype):
    ramp = np.arange(1001).astype(dtype).reshape(7, 143)
    assert auto_contrast_limits(ramp) == (5.0, 995.0)
    assert auto_contrast_limits(ramp, (10, 90)) == (100.0, 900.0)
    assert auto_contrast_limits(ramp, (0, 100)) == (0.0, 1000.0)


def test_percentile_scaling_known_answer():
    ramp = np.arange(1001, dtype=np.float64).reshape(1, 1001)
    out = to_rgb_uint8(ramp)[0, :, 0]
    # limits (5, 995): <= 5 -> 0, >= 995 -> 255, 600 -> 595 * 255 / 990 = 153.26 -> 153
    assert (out[:6] == 0).all()
    assert (out[995:] == 255).all()
    assert out[600] == 153
    assert (np.diff(out.astype(int)) >= 0).all()


def test_auto_contrast_limits_ignores_nonfinite():
    ramp = np.arange(1001, dtype=np.float64)
    with_bad = np.concatenate([ramp, [np.nan] * 50, [np.inf] * 50, [-np.inf] * 50])
    assert auto_contrast_limits(with_bad) == (5.0, 995.0)


def test_auto_contrast_limits_bool_and_int16():
    assert auto_contrast_limits(np.array([False, True]), (0, 100)) == (0.0, 1.0)
    assert auto_contrast_limits(np.array([-300, 300], dtype=np.int16), (0, 100)) == (-300.0, 300.0)


def test_auto_contrast_limits_subsamples_large_images(monkeypatch):
    monkeypatch.setattr(normalize, "MAX_PERCENTILE_VALUES", 1000)
    img = np.tile(np.arange(100, dtype=np.uint16), (100, 1))  # each row is 0..99
    lo, hi = auto_contrast_limits(img, (0, 100))
    assert (lo, hi) == (0.0, 96.0)  # a 25 x 25 grid: every 4th column, 0, 4, ..., 96
    assert auto_contrast_limits(img, (0, 100)) == (lo, hi)  # deterministic
    # 3 channels of a (3, 100, 100) array are all kept: the long axes are strided
    stack = np.stack([img, img + 1000, img + 2000])
    assert auto_contrast_limits(stack, (0, 100)) == (0.0, 2096.0)


def test_subsample_size_bound(monkeypatch):
    """Large images are sampled on a grid of at most MAX_PERCENTILE_VALUES values (at least
    half of that), every channel kept, starting at the first pixel."""
    monkeypatch.setattr(normalize, "MAX_PERCENTILE_VALUES", 4000)
    seen = []
    percentile = np.percentile
    monkeypatch.setattr(np, "percentile", lambda a, q: seen.append(a.shape) or percentile(a, q))
    a = np.zeros((3, 1000, 777))
    a[2, 0, 0] = 7.0  # on the grid
    a[0, 1, 1] = -1.0  # off the grid (both long axes are strided)
    assert auto_contrast_limits(a, (0, 100)) == (0.0, 7.0)
    (shape,) = seen
    assert 2000 <= math.prod(shape) <= 4000


# ---------------------------------------------------------------------- NaN, inf, flat


def test_nan_and_inf_mapping():
    img = np.array([[0.0, 1.0, np.nan, np.inf, -np.inf, 0.6]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_rgb_uint8(img, percentiles=(0, 100))[0, :, 0]
    assert np.array_equal(out, [0, 255, 0, 255, 0, 153])


def test_nan_does_not_poison_percentiles():
    img = np.arange(1001, dtype=np.float32).reshape(1, 1001)
    img[0, ::7] = np.nan
    img[0, 3::7] = np.inf
    finite = img[np.isfinite(img)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, hi = auto_contrast_limits(img)
        out = to_rgb_uint8(img)[0, :, 0]
    assert (lo, hi) == tuple(np.percentile(finite, [0.5, 99.5]).tolist())
    assert 0 < lo < hi < 1000
    assert (out[::7] == 0).all()
    assert (out[3::7] == 255).all()
    finite_out = out[np.isfinite(img[0])].astype(int)
    assert finite_out[0] == 0
    assert finite_out[-1] == 255
    assert (np.diff(finite_out) >= 0).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_constant_image_no_warning_all_zero(dtype):
    img = np.full((5, 6), 7 if dtype != np.bool_ else True, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_rgb_uint8(img)
    _check_rgb(out, (5, 6))
    if dtype == np.uint8:
        assert (out == 7).all()  # uint8 is never rescaled without contrast limits
    elif dtype == np.bool_:
        assert (out == 255).all()  # bool: True -> 255
    else:
        assert (out == 0).all()


def test_constant_multichannel_no_warning():
    img = np.full((3, 4, 5), 1000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_rgb_uint8(img, channel_axis=0)
    assert (out == 0).all()


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_all_nonfinite_image_no_warning(fill):
    img = np.full((4, 5), fill, dtype=np.float32)
    img[0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto_contrast_limits(img) == (0.0, 0.0)
        out = to_rgb_uint8(img)
    _check_rgb(out, (4, 5))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert (out.reshape(-1, 3)[1:] == (0 if np.isnan(fill) else 255)).all()


def test_huge_float_range_no_warning():
    img = np.array([[-3e38, 1e38, 3e38]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_rgb_uint8(img, percentiles=(0, 100))
    assert out[0, :, 0].tolist() == [0, 170, 255]


# --------------------------------------------------------------------- channel mapping


def _three_channel_uint16():
    img = np.zeros((4, 4, 6), dtype=np.uint16)
    for c in range(6):
        img[..., c] = c * 100
        img[0, 0, c] = 0  # give every channel a range: 0 and c * 100
    return img


def test_channels_one_is_gray():
    img = _three_channel_uint16()
    out = to_rgb_uint8(img, channel_axis=-1, channels=[4], contrast_limits=(0, 400))
    assert (out[1:, 1:] == 255).all()
    assert (out[0, 0] == 0).all()


def test_channels_two_fill_red_green():
    img = _three_channel_uint16()
    out = to_rgb_uint8(img, channel_axis=-1, channels=(2, 4), contrast_limits=(0, 500))
    assert (out[1:, 1:, 0] == 102).all()
    assert (out[1:, 1:, 1] == 204).all()
    assert (out[..., 2] == 0).all()


def test_channels_three_rgb_order_and_negative_index():
    img = _three_channel_uint16()
    out = to_rgb_uint8(
        img, channel_axis=-1, channels=np.array([5, 0, -2]), contrast_limits=(0, 500)
    )
    assert out[1, 1].tolist() == [255, 0, 204]


def test_channels_repeats_allowed():
    img = _three_channel_uint16()
    out = to_rgb_uint8(img, channel_axis=-1, channels=(3, 3), contrast_limits=(0, 300))
    assert out[1, 1].tolist() == [255, 255, 0]


def test_channels_with_uint8_not_rescaled():
    img = np.stack([np.full((3, 3), v, dtype=np.uint8) for v in (10, 20, 30, 40, 50)], axis=0)
    out = to_rgb_uint8(img, channel_axis=0, channels=(4, 1))
    assert out[0, 0].tolist() == [50, 20, 0]


def test_multichannel_percentiles_per_picked_channel():
    rng = np.random.default_rng(3)
    img = np.stack([rng.random((20, 20)) * s for s in (1, 100, 1e4, 1e6, 1e8)])
    out = to_rgb_uint8(img, channel_axis=0, channels=(4, 2, 0), percentiles=(0, 100))
    for c in range(3):
        assert out[..., c].min() == 0
        assert out[..., c].max() == 255


# --------------------------------------------------------------------------- raising


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4, 5), (1, 2, 3, 4, 5)])
def test_wrong_ndim_raises_naming_shape(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        to_rgb_uint8(np.zeros(shape))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (4, 5, 0), (0, 4, 3)])
def test_empty_raises(shape):
    with pytest.raises(ValueError, match="empty"):
        to_rgb_uint8(np.zeros(shape))


def test_empty_auto_contrast_limits_raises():
    with pytest.raises(ValueError, match="empty"):
        auto_contrast_limits(np.zeros((0,)))


@pytest.mark.parametrize(
    "image",
    [
        np.array([[object(), 1], [2, 3]], dtype=object),
        np.array([["a", "b"], ["c", "d"]]),
        np.ones((3, 3), dtype=np.complex64),
        np.zeros((3, 3), dtype="datetime64[s]"),
    ],
)
def test_non_numeric_dtype_raises_naming_dtype(image):
    with pytest.raises(TypeError, match=re.escape(str(image.dtype))):
        to_rgb_uint8(image)
    with pytest.raises(TypeError, match=re.escape(str(image.dtype))):
        auto_contrast_limits(image)


@pytest.mark.parametrize("shape", [(5, 6, 2), (5, 6, 5), (3, 6, 7)])
def test_ambiguous_3d_raises_asking_for_channel_axis(shape):
    with pytest.raises(ValueError, match="channel_axis") as info:
        to_rgb_uint8(np.zeros(shape))
    assert str(shape) in str(info.value)


@pytest.mark.parametrize("channel_axis", [3, -4])
def test_channel_axis_out_of_range_raises(channel_axis):
    with pytest.raises(ValueError, match=f"channel_axis={channel_axis}"):
        to_rgb_uint8(np.zeros((3, 4, 5)), channel_axis=channel_axis)


def test_channel_axis_on_2d_raises():
    with pytest.raises(ValueError, match=r"channel_axis=0.*\(4, 5\)"):
        to_rgb_uint8(np.zeros((4, 5)), channel_axis=0)


def test_channel_axis_not_int_raises():
    with pytest.raises(TypeError, match=re.escape("channel_axis must be an int, got 0.5")):
        to_rgb_uint8(np.zeros((3, 4, 5)), channel_axis=0.5)


@pytest.mark.parametrize("n_channels", [2, 5, 7])
def test_unpicked_multichannel_raises_asking_for_channels(n_channels):
    with pytest.raises(ValueError, match=f"{n_channels} channels.*channels="):
        to_rgb_uint8(np.zeros((n_channels, 4, 5)), channel_axis=0)


@pytest.mark.parametrize("channels", [(5,), (0, -6), (0, 1, 99)])
def test_channels_out_of_range_raises(channels):
    with pytest.raises(ValueError, match=re.escape(f"channels={channels!r}")):
        to_rgb_uint8(np.zeros((4, 5, 5)), channel_axis=2, channels=channels)


@pytest.mark.parametrize("channels", [(), [], (0, 1, 2, 3)])
def test_channels_wrong_count_raises(channels):
    with pytest.raises(
        ValueError, match=re.escape(f"channels must hold 1 to 3 channel indices, got {channels!r}")
    ):
        to_rgb_uint8(np.zeros((4, 5, 5)), channel_axis=2, channels=channels)


@pytest.mark.parametrize("channels", [1, "01", (0.0, 1.0), {0, 1}])
def test_channels_not_int_sequence_raises(channels):
    with pytest.raises(
        TypeError, match=re.escape(f"channels must be a sequence of ints, got {channels!r}")
    ):
        to_rgb_uint8(np.zeros((4, 5, 3)), channels=channels)


@pytest.mark.parametrize(
    "contrast_limits",
    [
        (1,),
        (1, 2, 3),
        ("a", "b"),
        (0, np.nan),
        (-np.inf, 1),
        (5, 1),
        [(0, 1), (0, 1)],  # 2 pairs for 3 channels
        [(0, 1), (1, 0), (0, 1)],  # one pair reversed
        [[0, 1], [0]],  # ragged
        "01",
    ],
)
def test_bad_contrast_limits_raise(contrast_limits):
    with pytest.raises(ValueError, match="contrast_limits") as info:
        to_rgb_uint8(np.zeros((4, 5, 3), dtype=np.float32), contrast_limits=contrast_limits)
    assert repr(contrast_limits) in str(info.value)


@pytest.mark.parametrize(
    "percentiles", [(50, 50), (60, 40), (-1, 50), (1, 101), (np.nan, 50), (1,), (1, 2, 3), None]
)
def test_bad_percentiles_raise(percentiles):
    with pytest.raises(ValueError, match="percentiles") as info:
        to_rgb_uint8(np.zeros((4, 5)), percentiles=percentiles)
    assert repr(percentiles) in str(info.value)
    with pytest.raises(ValueError, match="percentiles"):
        auto_contrast_limits(np.zeros((4, 5)), percentiles)
