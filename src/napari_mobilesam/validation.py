"""Argument checks shared by the public APIs.

Each check takes the value and the argument's name, and either returns the value in a
normal form or raises an error that names the argument and shows the value:
``TypeError`` for a value of the wrong kind, ``ValueError`` for a value of the right
kind out of range. Modules call these instead of keeping their own copies.
"""

from __future__ import annotations

import math
import operator

import numpy as np

__all__ = [
    "as_float",
    "check_bool_mask",
    "check_boxes",
    "check_contrast_limits",
    "check_int",
    "check_mask_input",
    "check_points",
    "finite_array",
]


def as_float(value, name: str, *, allow_nan: bool = False) -> float:
    """``value`` as a Python float.

    Parameters
    ----------
    value : int, float or numpy scalar
        Not a bool or a string.
    name : str
        The argument's name, for the error message.
    allow_nan : bool
        Accept NaN (infinities are always accepted).

    Raises
    ------
    TypeError
        When ``value`` is not a number.
    ValueError
        When ``value`` is NaN and ``allow_nan`` is False.
    """
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(out) and not allow_nan:
        raise ValueError(f"{name} must be a number, got {value!r}")
    return out


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int within ``[minimum, maximum]``.

    Parameters
    ----------
    value : int or numpy integer
        Not a bool, and not a float even when it is whole.
    name : str
        The argument's name, for the error message.
    minimum, maximum : int, optional
        Inclusive bounds.

    Raises
    ------
    TypeError
        When ``value`` is not an integer.
    ValueError
        When ``value`` is out of range.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        if maximum is None:
            bounds = f">= {minimum}"
        elif minimum is None:
            bounds = f"<= {maximum}"
        else:
            bounds = f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bounds}, got {out}")
    return out


def finite_array(value, name: str) -> np.ndarray:
    """``value`` as a float64 array without NaN or infinities.

    Raises
    ------
    ValueError
        When ``value`` is not numeric, or holds NaN or an infinity.
    """
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got {value!r}") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values: {value!r}")
    return arr


def check_points(
    coords,
    labels,
    *,
    coords_name: str = "point_coords",
    labels_name: str = "point_labels",
    order: str = "(x, y)",
    batched: bool = False,
    default_label: int | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Point prompts checked and in a normal form.

    Parameters
    ----------
    coords : (N, 2) or, ``batched``, (B, N, 2) array_like, or None
        Point coordinates in the ``order`` the caller documents; N >= 1.
    labels : (N,) or (B, N) array_like, or None
        1 = foreground, 0 = background.
    coords_name, labels_name : str
        The arguments' names, for error messages.
    order : str
        The coordinate order, for error messages: ``"(x, y)"`` or ``"(row, col)"``.
    batched : bool
        Expect a leading prompt axis B.
    default_label : {None, 0, 1}
        The label of every point when ``labels`` is None; None makes labels required.

    Returns
    -------
    coords : np.ndarray or None
        float64, the shape given.
    labels : np.ndarray or None
        int64, ``coords.shape[:-1]``.

    Raises
    ------
    ValueError
        For labels without points, points without labels (when required), wrong shapes,
        non-numeric or non-finite values, and labels other than 0 and 1.
    """
    if coords is None:
        if labels is not None:
            raise ValueError(f"{labels_name} given without {coords_name}")
        return None, None
    pts = finite_array(coords, coords_name)
    want, ndim = ("(B, N, 2)", 3) if batched else ("(N, 2)", 2)
    if pts.ndim != ndim or pts.shape[-1] != 2 or pts.shape[-2] == 0:
        raise ValueError(f"{coords_name} must have shape {want} as {order}, got {pts.shape}")
    if labels is None:
        if default_label is None:
            raise ValueError(
                f"{coords_name} given without {labels_name} (1 foreground, 0 background)"
            )
        return pts, np.full(pts.shape[:-1], default_label, dtype=np.int64)
    lab = finite_array(labels, labels_name)
    if lab.shape != pts.shape[:-1]:
        raise ValueError(
            f"{labels_name} must have shape {pts.shape[:-1]} to match {coords_name} "
            f"{pts.shape}, got {lab.shape}"
        )
    bad = ~np.isin(lab, (0, 1))
    if bad.any():
        raise ValueError(
            f"{labels_name} must be 1 (foreground) or 0 (background), got "
            f"{np.unique(lab[bad]).tolist()}"
        )
    return pts, lab.astype(np.int64)


def check_boxes(boxes, *, batched: bool) -> np.ndarray | None:
    """XYXY boxes checked and as (B, 4) float64, or None.

    Parameters
    ----------
    boxes : (B, 4) or, not ``batched``, (4,) array_like, or None
        Named ``boxes`` / ``box`` in messages; finite, ``x1 >= x0`` and ``y1 >= y0``.
    batched : bool
        Expect a leading box axis B (B may be 0).

    Raises
    ------
    ValueError
        For a wrong shape, non-numeric or non-finite values, or inverted corners.
    """
    if boxes is None:
        return None
    name = "boxes" if batched else "box"
    arr = finite_array(boxes, name)
    if batched and (arr.ndim != 2 or arr.shape[1] != 4):
        raise ValueError(f"boxes must have shape (B, 4) as XYXY, got {arr.shape}")
    if not batched:
        if arr.size != 4:
            raise ValueError(f"box must have shape (4,) as XYXY, got {arr.shape}")
        arr = arr.reshape(1, 4)
    inverted = (arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])
    if inverted.any():
        raise ValueError(
            f"{name} must be XYXY with x1 >= x0 and y1 >= y0, got {arr[inverted][0].tolist()}"
        )
    return arr


def check_mask_input(mask_input, size: tuple[int, int], *, batched: bool) -> np.ndarray | None:
    """Low-res mask logits checked and as (B, 1, h, w) float32, or None.

    Parameters
    ----------
    mask_input : (B, 1, h, w) or, not ``batched``, (1, h, w) array_like, or None
        Finite; B >= 1.
    size : (int, int)
        (h, w) the model's decoder takes (256 x 256 for SAM).
    batched : bool
        Expect a leading prompt axis B.

    Raises
    ------
    ValueError
        For a wrong shape, or non-numeric or non-finite values.
    """
    if mask_input is None:
        return None
    arr = finite_array(mask_input, "mask_input")
    want = (arr.shape[0] if arr.ndim else -1, 1, *size) if batched else (1, *size)
    if arr.shape != want or (batched and arr.shape[0] == 0):
        shape = f"(B, 1, {size[0]}, {size[1]})" if batched else f"(1, {size[0]}, {size[1]})"
        raise ValueError(f"mask_input must have shape {shape}, got {arr.shape}")
    return arr.astype(np.float32) if batched else arr.astype(np.float32)[None]


def check_bool_mask(mask, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    """A bool mask of the given shape, not empty.

    Parameters
    ----------
    mask : np.ndarray
        bool; other dtypes are refused rather than thresholded.
    shape : tuple of int
        The shape it must have, e.g. (H, W).
    name : str
        The argument's name, for error messages.

    Raises
    ------
    TypeError
        When ``mask`` is not a bool array.
    ValueError
        When its shape differs or no pixel is set.
    """
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    if not arr.any():
        raise ValueError(f"{name} is empty: no pixel is set")
    return arr


def check_contrast_limits(contrast_limits, n_channels: int) -> list[tuple[float, float]] | None:
    """One ``(lo, hi)`` pair per channel, or None.

    Parameters
    ----------
    contrast_limits : (2,) or (n_channels, 2) array_like, or None
        One pair for every channel, or one pair per channel; finite, ``lo <= hi``.
    n_channels : int
        How many channels the limits apply to.

    Returns
    -------
    list of (float, float) or None
        ``n_channels`` pairs of Python floats.

    Raises
    ------
    ValueError
        When the limits are not numbers of that shape, not finite, or ``lo > hi``.
    """
    if contrast_limits is None:
        return None
    message = (
        "contrast_limits must be (lo, hi) with finite lo <= hi, or one such pair per "
        f"picked channel ({n_channels}), got {contrast_limits!r}"
    )
    try:
        pairs = np.asarray(contrast_limits, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if pairs.shape == (2,):
        pairs = np.broadcast_to(pairs, (n_channels, 2))
    if pairs.shape != (n_channels, 2) or not np.isfinite(pairs).all():
        raise ValueError(message)
    if (pairs[:, 1] < pairs[:, 0]).any():
        raise ValueError(message)
    return [(float(lo), float(hi)) for lo, hi in pairs]
