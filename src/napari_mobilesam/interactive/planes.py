"""The planes of an image or a stack: layout, plane indices, reading one plane.

An image in napari's layout has *plane axes* (z, t, ...) in front of each 2-D plane,
and optionally a channel axis or trailing RGB(A) colour. :class:`ImagePlanes` checks
such an image once and then reads any plane as the (H, W) or (H, W, C) array that
:func:`~napari_mobilesam.normalize.to_rgb_uint8` takes, with the normalisation settings
that go with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from ..validation import check_contrast_limits, check_int

__all__ = ["ImagePlanes"]


class ImagePlanes:
    """An image or a stack of planes, checked, with its normalisation settings.

    Parameters
    ----------
    image : array_like
        Anything with ``.shape``, ``.dtype`` and numpy indexing (numpy, dask, zarr), in
        napari layout, any bool, integer or float dtype:

        - ``(..., H, W)`` grayscale;
        - ``(..., H, W, 3 | 4)`` when ``rgb`` is True;
        - a channel axis anywhere before (H, W) when ``channel_axis`` is given, e.g.
          ``(C, Z, H, W)`` with ``channel_axis=0``.

        The *plane axes* are the leading axes other than the channel axis.
    rgb : bool
        The last axis holds RGB(A) colour (as napari's ``rgb=True``).
    channel_axis : int, optional
        Index into ``image.shape`` of the channel axis (not one of the last two).
    channels : sequence of int, optional
        Up to three channels to show the model as R, G, B (one is replicated to gray,
        two fill R and G). Default: the first three (``channel_axis``) or the colour
        channels (``rgb``). Not allowed for a grayscale image.
    contrast_limits : (float, float), optional
        ``(lo, hi)`` as a napari layer has them, or one pair per picked channel, used
        for every plane. Default: each plane's 0.5 / 99.5 percentiles (uint8 and bool
        unscaled); see :func:`~napari_mobilesam.normalize.to_rgb_uint8`.

    Notes
    -----
    Immutable after construction, so safe to share between threads. Reading a plane
    reads the image, which must not change while it is read.
    """

    def __init__(
        self,
        image,
        *,
        rgb: bool = False,
        channel_axis: int | None = None,
        channels: Sequence[int] | None = None,
        contrast_limits=None,
    ):
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):
            raise TypeError(
                f"image must be an array (numpy, dask, ...) with .shape and .dtype, "
                f"got {type(image)}"
            )
        if np.dtype(image.dtype).kind not in "biuf":
            raise TypeError(f"image must have a bool, integer or float dtype, got {image.dtype}")
        self.image = image
        self.rgb = bool(rgb)
        self._shape = tuple(int(s) for s in image.shape)
        self._channel_axis = self._check_channel_axis(channel_axis)
        n_trailing = 3 if self.rgb else 2
        ndim = len(self._shape)
        hw = self._shape[ndim - n_trailing : ndim - n_trailing + 2]
        if min(hw) <= 0:
            raise ValueError(f"image planes must not be empty, got image shape {self._shape}")
        self._hw = (hw[0], hw[1])
        self._plane_axes = tuple(a for a in range(ndim - n_trailing) if a != self._channel_axis)
        self.channels = self._check_channels(channels)
        n_picked = len(self.channels) if self.channels is not None else (3 if self.rgb else 1)
        self.contrast_limits = _check_contrast_limits(contrast_limits, n_picked)

    # -- checks -------------------------------------------------------------------------

    def _check_channel_axis(self, channel_axis) -> int | None:
        shape, ndim = self._shape, len(self._shape)
        if self.rgb and channel_axis is not None:
            raise ValueError("rgb=True and channel_axis cannot be used together")
        need = 3 if (self.rgb or channel_axis is not None) else 2
        if ndim < need:
            raise ValueError(
                f"image must have at least {need} dimensions for rgb={self.rgb}, "
                f"channel_axis={channel_axis!r}, got shape {shape}"
            )
        if self.rgb and shape[-1] not in (3, 4):
            raise ValueError(f"rgb=True needs a last axis of 3 or 4, got image shape {shape}")
        if channel_axis is None:
            return None
        axis = check_int(channel_axis, "channel_axis")
        if not -ndim <= axis < ndim or axis % ndim >= ndim - 2:
            raise ValueError(
                f"channel_axis={channel_axis!r} must index an axis before (H, W) of the "
                f"image of shape {shape}"
            )
        return axis % ndim

    def _check_channels(self, channels) -> tuple[int, ...] | None:
        if self._channel_axis is not None:
            n = self._shape[self._channel_axis]
        elif self.rgb:
            n = self._shape[-1]
        else:
            if channels is not None:
                raise ValueError(
                    f"channels={channels!r} needs rgb=True or a channel_axis; the image is "
                    "grayscale"
                )
            return None
        if channels is None:
            return tuple(range(min(n, 3))) if self._channel_axis is not None else None
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Iterable):
            raise TypeError(f"channels must be a sequence of ints, got {channels!r}")
        try:
            picked = tuple(check_int(c, "channels") for c in channels)
        except TypeError:
            raise TypeError(f"channels must be a sequence of ints, got {channels!r}") from None
        if not 1 <= len(picked) <= 3 or any(not 0 <= c < n for c in picked):
            raise ValueError(
                f"channels must hold 1 to 3 indices in [0, {n}) for an image with {n} "
                f"channels, got {channels!r}"
            )
        return picked

    # -- layout -------------------------------------------------------------------------

    @property
    def plane_shape(self) -> tuple[int, ...]:
        """Sizes of the plane axes (``()`` for a single 2-D image)."""
        return tuple(self._shape[a] for a in self._plane_axes)

    @property
    def n_planes(self) -> int:
        """Number of planes (1 for a single 2-D image)."""
        return math.prod(self.plane_shape)

    @property
    def shape_hw(self) -> tuple[int, int]:
        """(H, W) of every plane."""
        return self._hw

    @property
    def mode(self) -> str:
        """``"gray"``, ``"rgb"`` or ``"channels"``: how a plane becomes the model's RGB."""
        if self.rgb:
            return "rgb"
        return "channels" if self._channel_axis is not None else "gray"

    def indices(self) -> Iterator[tuple[int, ...]]:
        """Every plane index, in C order."""
        for idx in np.ndindex(*self.plane_shape):
            yield tuple(int(i) for i in idx)

    def check_index(self, index) -> tuple[int, ...]:
        """Validate a plane index and return it as a tuple of ints.

        Parameters
        ----------
        index : int or sequence of int
            One non-negative int per plane axis (an int alone for one plane axis,
            ``()`` for a 2-D image).

        Raises
        ------
        TypeError
            When ``index`` is not an int or a sequence of ints.
        ValueError
            When it has the wrong length or lies outside :attr:`plane_shape`.
        """
        shape = self.plane_shape
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            index = (index,)
        if isinstance(index, (str, bytes)) or not isinstance(index, Iterable):
            raise TypeError(f"index must be a tuple of ints, got {index!r}")
        try:
            idx = tuple(check_int(i, "index") for i in index)
        except TypeError:
            raise TypeError(f"index must be a tuple of ints, got {index!r}") from None
        if len(idx) != len(shape) or any(not 0 <= i < n for i, n in zip(idx, shape, strict=True)):
            raise ValueError(f"index must be a plane index within {shape}, got {index!r}")
        return idx

    def plane(self, index) -> np.ndarray:
        """The pixels of one plane, read into memory.

        Parameters
        ----------
        index : tuple of int
            Plane index (see :meth:`check_index`).

        Returns
        -------
        np.ndarray
            (H, W) grayscale, or (H, W, C) for ``rgb`` (C = 3 or 4) and for a channel
            axis (C = channels, moved last), in the image's dtype.
        """
        return self._read(self.check_index(index), slice(None), slice(None))

    def _read(self, idx: tuple[int, ...], rows: slice, cols: slice) -> np.ndarray:
        """Read ``[rows, cols]`` of plane ``idx`` (checked), channels moved last."""
        key: list = [slice(None)] * len(self._shape)
        for axis, i in zip(self._plane_axes, idx, strict=True):
            key[axis] = i
        h_axis = len(self._shape) - (3 if self.rgb else 2)
        key[h_axis], key[h_axis + 1] = rows, cols
        out = np.asarray(self.image[tuple(key)])
        if self._channel_axis is not None:
            out = np.moveaxis(out, 0, -1)  # the only axis left before (H, W)
        return out

    def window(self, index, window: tuple[int, int, int, int]) -> np.ndarray:
        """The pixels of a window of one plane, read without reading the rest of the plane
        (for dask and zarr images only the chunks under the window are read).

        Parameters
        ----------
        index : tuple of int
            Plane index (see :meth:`check_index`).
        window : (r0, c0, r1, c1)
            Plane pixels, exclusive ends, ``0 <= r0 < r1 <= H`` and ``0 <= c0 < c1 <= W``.

        Returns
        -------
        np.ndarray
            (r1 - r0, c1 - c0) or (r1 - r0, c1 - c0, C), as :meth:`plane` lays it out.

        Raises
        ------
        ValueError
            When the window is empty or leaves the plane.
        """
        idx = self.check_index(index)
        r0, c0, r1, c1 = (check_int(v, "window") for v in window)
        h, w = self._hw
        if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
            raise ValueError(
                f"window must be (r0, c0, r1, c1) with 0 <= r0 < r1 <= {h} and "
                f"0 <= c0 < c1 <= {w}, got {tuple(window)!r}"
            )
        return self._read(idx, slice(r0, r1), slice(c0, c1))

    def sample(self, index, max_pixels: int = 4_000_000) -> np.ndarray:
        """Every k-th row and column of one plane, at most about ``max_pixels`` pixels
        (for percentiles of a plane too large to read whole); the plane itself when it is
        small enough. Layout as :meth:`plane`."""
        idx = self.check_index(index)
        max_pixels = check_int(max_pixels, "max_pixels", minimum=1)
        h, w = self._hw
        step = max(1, math.ceil(math.sqrt(h * w / max_pixels)))
        return self._read(idx, slice(None, None, step), slice(None, None, step))

    def normalize_kwargs(self) -> dict:
        """Keyword arguments for ``Predictor.set_image`` / ``embed_images`` with a plane
        from :meth:`plane`."""
        kwargs = {"contrast_limits": self.contrast_limits, "channels": self.channels}
        if self._channel_axis is not None:
            kwargs["channel_axis"] = -1
        return kwargs

    def settings(self) -> tuple:
        """A hashable summary of how planes become the model's input (for cache keys)."""
        return (self.mode, self.channels, self.contrast_limits)


def _check_contrast_limits(contrast_limits, n_picked: int):
    """Limits validated as :func:`~napari_mobilesam.normalize.to_rgb_uint8` will use them,
    as a hashable tuple of Python floats (one pair, or one pair per picked channel)."""
    pairs = check_contrast_limits(contrast_limits, n_picked)
    if pairs is None or np.shape(contrast_limits) != (2,):
        return None if pairs is None else tuple(pairs)
    return pairs[0]
