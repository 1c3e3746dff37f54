"""Turn any single 2-D image plane into the RGB uint8 array that MobileSAM consumes.

MobileSAM's predictor takes an ``(H, W, 3)`` ``uint8`` RGB image. Microscopy data is
rarely that: it is 16-bit, float, single-channel, multichannel with channels first, or
it contains NaN. :func:`to_rgb_uint8` applies these rules, in this order:

1. **Layout.** ``(H, W)`` is grayscale. ``(H, W, C)`` is channels-last when ``C`` is
   1, 3 or 4 (4 is RGBA; alpha is dropped). Any other 3-D shape needs
   ``channel_axis`` (e.g. ``channel_axis=0`` for ``(C, H, W)``). 0-D, 1-D, 4-D and
   larger, or empty arrays are rejected.
2. **Channels.** ``channels`` picks up to three source channels, in R, G, B order.
   Without it: 1 channel is replicated to gray, 3 are used as they are, 4 (RGBA) give
   the first 3; 2 or more than 4 channels must be chosen with ``channels=``. One
   picked channel is replicated to gray, two fill R and G (B is 0), three fill RGB.
3. **Intensities.** ``uint8`` is used as it is, with no rescaling, and an RGB
   ``uint8`` image comes back bit-identical. ``bool`` maps False -> 0, True -> 255.
   Every other dtype (other integers, floats) is scaled with contrast limits
   ``(lo, hi)``: values are clipped to ``[lo, hi]``, mapped linearly ``lo -> 0``,
   ``hi -> 255`` and rounded with :func:`numpy.rint`. The limits are
   ``contrast_limits`` when given (one ``(lo, hi)`` pair for all channels, as a napari
   layer gives it, or one pair per picked channel; this also rescales ``uint8`` and
   ``bool``), else the ``percentiles`` of each picked channel's finite values
   (:func:`auto_contrast_limits`).
4. **Non-finite values.** NaN -> 0, +inf -> 255, -inf -> 0. They never enter the
   percentiles.
5. **Degenerate limits.** When ``lo == hi`` (a constant image, or an image with no
   finite values, whose limits are ``(0.0, 0.0)``) the mapping is the limit of a steep
   ramp, a threshold: values ``> hi`` -> 255, everything else (NaN included) -> 0. A
   constant or all-NaN image therefore gives all zeros, with no warnings.

Only numpy is used; nothing here imports torch or napari.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

from .validation import check_contrast_limits

__all__ = ["auto_contrast_limits", "to_rgb_uint8"]

#: Largest number of values :func:`auto_contrast_limits` reads; bigger arrays are
#: subsampled on a regular grid.
MAX_PERCENTILE_VALUES = 4_000_000


def to_rgb_uint8(
    image,
    *,
    contrast_limits=None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    channels: Sequence[int] | None = None,
    channel_axis: int | None = None,
) -> np.ndarray:
    """Convert one 2-D image plane to RGB ``uint8`` for MobileSAM.

    Parameters
    ----------
    image : array_like
        ``(H, W)`` grayscale, ``(H, W, C)`` channels-last with ``C`` in {1, 3, 4}, or
        any 3-D array with its channels on ``channel_axis``. Axis order is
        (row, col) = (y, x). Dtype bool, integer or floating; NaN and +-inf allowed.
    contrast_limits : (float, float) or sequence of (float, float), optional
        ``(lo, hi)`` with ``lo <= hi``, both finite, used for every picked channel, or
        one such pair per picked channel (R, G, B order of ``channels``). Defaults to
        the ``percentiles`` of each picked channel (``uint8`` and ``bool`` are then
        not rescaled).
    percentiles : (float, float), optional
        Lower and upper percentile, ``0 <= lo < hi <= 100``, of the finite values
        used as contrast limits when ``contrast_limits`` is None.
    channels : sequence of int, optional
        Up to three indices of source channels (negative counts from the end), in
        R, G, B order. Repeats are allowed.
    channel_axis : int, optional
        Axis of a 3-D ``image`` that holds the channels, e.g. ``0`` for ``(C, H, W)``.

    Returns
    -------
    rgb : numpy.ndarray
        ``(H, W, 3)`` ``uint8``, C-contiguous, channels R, G, B. For an RGB ``uint8``
        input with neither ``contrast_limits`` nor ``channels`` it holds the input's
        exact values and shares memory with a C-contiguous input (no copy).

    Raises
    ------
    TypeError
        If the dtype is not bool, integer or floating, or ``channels`` /
        ``channel_axis`` hold non-integers.
    ValueError
        If the shape, ``channel_axis``, ``channels``, ``contrast_limits`` or
        ``percentiles`` are invalid, or channels must be chosen with ``channels=``.
    """
    image = _check_image(image)
    percentiles = _check_percentiles(percentiles)
    stack = _channels_last(image, channel_axis)  # (H, W, C), a view
    sources = _pick_channels(stack.shape[-1], channels)
    limits = check_contrast_limits(contrast_limits, len(sources))

    if stack.dtype == np.bool_:
        stack = stack.view(np.uint8)  # 0 / 1
        if limits is None:
            limits = [(0.0, 1.0)] * len(sources)

    if limits is None and stack.dtype == np.uint8:
        if sources == [0, 1, 2]:
            return np.ascontiguousarray(stack[..., :3])
        planes = [stack[..., c] for c in sources]
    else:
        if limits is None:
            cache: dict[int, tuple[float, float]] = {}
            for c in sources:
                if c not in cache:
                    cache[c] = auto_contrast_limits(stack[..., c], percentiles)
            limits = [cache[c] for c in sources]
        planes = [
            _rescale(stack[..., c], lo, hi) for c, (lo, hi) in zip(sources, limits, strict=True)
        ]

    rgb = np.empty((*stack.shape[:2], 3), dtype=np.uint8)
    if len(planes) == 1:
        rgb[...] = planes[0][..., np.newaxis]
    else:
        for i, plane in enumerate(planes):
            rgb[..., i] = plane
        if len(planes) == 2:
            rgb[..., 2] = 0
    return rgb


def auto_contrast_limits(
    image, percentiles: tuple[float, float] = (0.5, 99.5)
) -> tuple[float, float]:
    """Contrast limits from percentiles of the finite values of an image.

    Parameters
    ----------
    image : array_like
        Any non-empty array of dtype bool, integer or floating (NaN and +-inf are
        ignored). Arrays with more than ``MAX_PERCENTILE_VALUES`` (4 million) values
        are subsampled deterministically on a regular grid (every k-th element along
        the longest axes).
    percentiles : (float, float), optional
        Lower and upper percentile, ``0 <= lo < hi <= 100``; linear interpolation.

    Returns
    -------
    lo, hi : float
        ``lo <= hi``. ``(0.0, 0.0)`` when the image has no finite values.

    Raises
    ------
    TypeError
        If the dtype is not bool, integer or floating.
    ValueError
        If the image is empty or ``percentiles`` is invalid.
    """
    image = _check_image(image, check_ndim=False)
    p_lo, p_hi = _check_percentiles(percentiles)
    if image.dtype == np.bool_:
        image = image.view(np.uint8)
    sample = _grid_subsample(image, MAX_PERCENTILE_VALUES)
    if np.issubdtype(sample.dtype, np.floating):
        # float64 so that interpolating between extreme float32 values cannot overflow
        sample = sample[np.isfinite(sample)].astype(np.float64, copy=False)
        if sample.size == 0:
            return 0.0, 0.0
    lo, hi = np.percentile(sample, [p_lo, p_hi])
    lo, hi = float(lo), float(hi)
    return lo, max(lo, hi)


# --------------------------------------------------------------------------- helpers


def _check_image(image, *, check_ndim: bool = True) -> np.ndarray:
    image = np.asarray(image)
    kind = image.dtype.kind
    if kind not in "biuf":
        raise TypeError(
            f"image must have a bool, integer or floating dtype, got dtype {image.dtype}"
        )
    if check_ndim and image.ndim not in (2, 3):
        raise ValueError(f"image must be 2-D (H, W) or 3-D with channels, got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    return image


def _check_percentiles(percentiles) -> tuple[float, float]:
    try:
        lo, hi = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi <= 100):
        raise ValueError(
            f"percentiles must be two numbers with 0 <= lo < hi <= 100, got {percentiles!r}"
        )
    return lo, hi


def _channels_last(image: np.ndarray, channel_axis) -> np.ndarray:
    """Return an ``(H, W, C)`` view of ``image``."""
    if channel_axis is not None:
        try:
            axis = operator.index(channel_axis)
        except TypeError:
            raise TypeError(f"channel_axis must be an int, got {channel_axis!r}") from None
        if image.ndim != 3 or not -3 <= axis < 3:
            raise ValueError(
                f"channel_axis={channel_axis!r} needs a 3-D image with that axis, "
                f"got shape {image.shape}"
            )
        return np.moveaxis(image, axis, -1)
    if image.ndim == 2:
        return image[:, :, np.newaxis]
    if image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"cannot tell the channel axis of an image of shape {image.shape}: a trailing "
            "axis of 1, 3 or 4 is taken as channels; otherwise pass channel_axis "
            "(e.g. channel_axis=0 for (C, H, W))"
        )
    return image


def _pick_channels(n_channels: int, channels) -> list[int]:
    """Source channel index for each output channel (1 -> gray, 2 -> RG, 3 -> RGB)."""
    if channels is None:
        if n_channels == 1:
            return [0]
        if n_channels in (3, 4):
            return [0, 1, 2]
        raise ValueError(
            f"image has {n_channels} channels; choose up to 3 of them with channels=, "
            "e.g. channels=(0, 1)"
        )
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence | np.ndarray):
        raise TypeError(f"channels must be a sequence of ints, got {channels!r}")
    try:
        picked = [operator.index(c) for c in channels]
    except TypeError:
        raise TypeError(f"channels must be a sequence of ints, got {channels!r}") from None
    if not 1 <= len(picked) <= 3:
        raise ValueError(f"channels must hold 1 to 3 channel indices, got {channels!r}")
    for c in picked:
        if not -n_channels <= c < n_channels:
            raise ValueError(
                f"channels={channels!r} holds {c}, out of range for an image with "
                f"{n_channels} channels"
            )
    return [c % n_channels for c in picked]


def _rescale(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``plane`` (H, W) linearly ``lo -> 0``, ``hi -> 255``; uint8 out."""
    scale = 255.0 / (hi - lo) if hi > lo else math.inf
    if not math.isfinite(scale):  # lo == hi (or a subnormal range): threshold
        return np.where(plane > hi, np.uint8(255), np.uint8(0))
    work = np.result_type(plane.dtype, np.float32)  # float32 for <= 16-bit and float32
    if hi - lo > float(np.finfo(work).max):  # x - lo would overflow for in-range values
        work = np.float64
    x = plane.astype(work)
    with np.errstate(over="ignore", invalid="ignore"):
        x -= lo
        x *= scale
    np.clip(x, 0, 255, out=x)
    if np.issubdtype(plane.dtype, np.floating):
        x[np.isnan(x)] = 0
    np.rint(x, out=x)
    return x.astype(np.uint8)


def _grid_subsample(a: np.ndarray, max_values: int) -> np.ndarray:
    """A view keeping every k-th element along the longest axes, <= ``max_values``."""
    steps = [1] * a.ndim
    counts = list(a.shape)
    while math.prod(counts) > max_values:
        axis = counts.index(max(counts))
        steps[axis] *= 2
        counts[axis] = -(-a.shape[axis] // steps[axis])
    return a[tuple(slice(None, None, s) for s in steps)]
