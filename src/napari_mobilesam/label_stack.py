"""Label stacks: their checks, and TIFF files that Fiji, napari and tifffile open.

Used by the napari writer (:func:`napari_mobilesam.napari_io.write_labels`) and by
``mobilesam-everything`` (``mobilesam_batch.outputs``, which also writes zarr).

Conventions: a *stack* has ``shape = plane dims + (H, W)`` and ``axes``, one
upper-case letter per dimension ending in ``"YX"`` (``"YX"``, ``"ZYX"``, ``"TZYX"``,
``"QYX"``, ...); its planes are given as an iterable of (H, W) arrays in C order of
the plane dimensions (the last plane axis varies fastest) and written one at a time,
so memory does not grow with the number of planes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, to_json

__all__ = ["CheckedPlanes", "check_stack", "imagej_axes", "labels_dtype", "write_labels_tiff"]

# dtypes a label stack may be written as (Fiji reads all three)
_LABEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
# classic TIFF offsets are 32-bit; tifffile switches to BigTIFF above this size
_CLASSIC_TIFF_LIMIT = 2**32 - 2**25


def labels_dtype(max_id: int) -> np.dtype:
    """Smallest label dtype for ids up to ``max_id``: uint16 up to 65535, else uint32.

    Raises
    ------
    TypeError
        If ``max_id`` is not an integer.
    ValueError
        If ``max_id`` is negative or above 2**32 - 1.
    """
    if isinstance(max_id, bool | np.bool_) or not isinstance(max_id, int | np.integer):
        raise TypeError(f"max_id must be an integer, got {max_id!r}")
    max_id = int(max_id)
    if max_id < 0 or max_id > np.iinfo(np.uint32).max:
        raise ValueError(f"max_id must be in 0..{np.iinfo(np.uint32).max}, got {max_id}")
    return np.dtype(np.uint16) if max_id <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def check_stack(shape: tuple[int, ...], axes: str, dtype: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Validated ``(shape, dtype)`` of a label stack described by ``shape``/``axes``/``dtype``.

    Returns
    -------
    shape : tuple of int
        ``plane dims + (H, W)``, all sizes >= 1.
    dtype : np.dtype
        uint8, uint16 or uint32.

    Raises
    ------
    ValueError
        For a shape that is not (..., H, W) of positive ints, ``axes`` that are not
        one distinct upper-case letter per dimension ending in ``"YX"``, or another dtype.
    """
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as err:
        raise ValueError(f"shape must be a tuple of ints, got {shape!r}") from err
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (..., H, W) with all sizes >= 1, got {shape}")
    if (
        not isinstance(axes, str)
        or len(axes) != len(shape)
        or not axes.endswith("YX")
        or not (axes.isascii() and axes.isalpha() and axes.isupper())
        or len(set(axes)) != len(axes)
    ):
        raise ValueError(
            f"axes must be {len(shape)} distinct upper-case letters ending in 'YX' "
            f"(one per dimension of shape {shape}), got {axes!r}"
        )
    try:
        dtype = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype must be uint8, uint16 or uint32, got {dtype!r}") from err
    if dtype not in _LABEL_DTYPES:
        raise ValueError(f"dtype must be uint8, uint16 or uint32, got {dtype}")
    return shape, dtype


class CheckedPlanes:
    """Iterator over the planes of a stack, checked and cast to C-contiguous ``dtype``.

    It stops after ``prod(shape[:-2])`` planes without pulling more from ``planes``;
    call :meth:`finish` once the consumer is done to check that nothing is left.
    (A class, not a generator: a consumer that wraps a generator in ``yield from``
    would close it, and a closed generator could no longer check for extra planes.)

    Raises
    ------
    ValueError
        (From ``next`` or :meth:`finish`.) If ``planes`` gives fewer or more than
        ``prod(shape[:-2])`` planes, a plane whose shape is not ``shape[-2:]``, or
        values outside ``dtype``'s range.
    TypeError
        If a plane is not of an integer dtype.
    """

    def __init__(self, planes: Iterable[np.ndarray], shape: tuple[int, ...], dtype: np.dtype):
        self._planes = iter(planes)
        self._shape = shape
        self._dtype = dtype
        self._expected = math.prod(shape[:-2])
        self.count = 0

    def __iter__(self) -> CheckedPlanes:
        return self

    def __next__(self) -> np.ndarray:
        if self.count == self._expected:
            raise StopIteration
        try:
            plane = np.asarray(next(self._planes))
        except StopIteration:
            raise ValueError(
                f"planes gave {self.count} planes, expected {self._expected} "
                f"for shape {self._shape}"
            ) from None
        index, plane_shape, top = self.count, self._shape[-2:], int(np.iinfo(self._dtype).max)
        if plane.shape != plane_shape:
            raise ValueError(f"plane {index} has shape {plane.shape}, expected {plane_shape}")
        if plane.dtype.kind not in "ui":
            raise TypeError(f"plane {index} must be of an integer dtype, got {plane.dtype}")
        if plane.dtype.kind == "i" and plane.size and int(plane.min()) < 0:
            raise ValueError(f"plane {index} has negative values (min {int(plane.min())})")
        if np.iinfo(plane.dtype).max > top and int(plane.max()) > top:
            raise ValueError(
                f"plane {index} has values up to {int(plane.max())}, which do not fit "
                f"dtype {self._dtype} (max {top})"
            )
        self.count += 1
        return np.ascontiguousarray(plane, dtype=self._dtype)

    def finish(self) -> None:
        """Check that all planes were taken and ``planes`` has no more."""
        assert self.count == self._expected, "the consumer took fewer planes than the stack has"
        if next(self._planes, _END) is not _END:
            raise ValueError(
                f"planes gave more than the {self._expected} planes of shape {self._shape}"
            )


_END = object()


def imagej_axes(axes: str) -> str | None:
    """Axes under which a stack of ``axes`` can be an ImageJ hyperstack, or None.

    ImageJ knows the plane axes T, Z, C, in that order. T and Z keep their letters;
    every other plane axis is renamed to an unused one of T, Z, C, preferring to
    keep C as C and otherwise taking them in the order T, Z, C. None if there are
    more than 3 plane axes or no renaming respects ImageJ's order.

    Parameters
    ----------
    axes : str
        Upper-case letters ending in ``"YX"``, e.g. ``"ZYX"``, ``"QYX"``.

    Returns
    -------
    str or None
        E.g. ``"ZYX"`` -> ``"ZYX"``, ``"QYX"`` -> ``"TYX"``, ``"CZYX"`` -> ``"TZYX"``,
        ``"ZQYX"`` -> ``"ZCYX"``, ``"ZTYX"`` -> None.
    """
    plane = axes[:-2]
    best: tuple[int, str] | None = None
    for letters in ("".join(c) for c in combinations("TZC", len(plane))):
        if any(a in "TZ" and a != b for a, b in zip(plane, letters, strict=True)):
            continue  # T and Z must keep their letters
        kept = sum(a == b == "C" for a, b in zip(plane, letters, strict=True))
        if best is None or kept > best[0]:
            best = (kept, letters)
    return None if best is None else best[1] + "YX"


def write_labels_tiff(
    dest: Path,
    planes: Iterable[np.ndarray],
    shape: tuple[int, ...],
    axes: str,
    dtype: Any,
    *,
    tmp_dir: Path | None = None,
    description: dict | None = None,
) -> None:
    """Stream a label stack into one deflate-compressed TIFF, atomically.

    Parameters
    ----------
    dest : path
        The ``.tif`` file to write.
    planes : iterable of (H, W) integer arrays
        The ``prod(shape[:-2])`` planes in C order of the plane axes; consumed one
        at a time (tifffile encodes a bounded buffer of them in worker threads).
    shape : tuple of int
        ``plane dims + (H, W)``.
    axes : str
        One upper-case letter per dimension, ending in ``"YX"`` (``"ZYX"``, ``"QYX"``).
    dtype : uint8, uint16 or uint32
        The stored dtype; plane values are checked to fit, then cast.
    tmp_dir : path, optional
        Folder for the temporary file (see :func:`atomic_path`).
    description : dict, optional
        Small JSON-able provenance, stored as ``{"axes": axes, "mobilesam": description}``
        in the ImageJ ``Info`` property of an ImageJ file, or under ``"mobilesam"``
        in tifffile's JSON description of a plain file.

    Notes
    -----
    uint8/uint16 stacks whose axes :func:`imagej_axes` can map are written as an
    ImageJ hyperstack (classic TIFF, so the *compressed* data must stay under 4 GB),
    with the mapped axes; the original axes are in the ``Info`` JSON. Others (uint32,
    which ImageJ hyperstacks do not support, or unmappable axes) are written as a
    plain tifffile "shaped" TIFF with ``{"axes": axes}`` (BigTIFF when the
    uncompressed data exceed 4 GB), which Fiji opens through Bio-Formats.
    Either way ``tifffile.imread(dest)`` gives exactly ``shape`` and ``dtype``.

    Raises
    ------
    ValueError
        For a bad ``shape``/``axes``/``dtype``, or planes of the wrong number,
        shape or range; nothing is written then.
    TypeError
        If a plane is not of an integer dtype, or ``description`` is not JSON-able.
    """
    import tifffile

    shape, dtype = check_stack(shape, axes, dtype)
    ij_axes = imagej_axes(axes) if dtype.itemsize <= 2 else None
    info = {"axes": axes} if description is None else {"axes": axes, "mobilesam": description}
    info_json = to_json(info)  # also validates description before any work
    if ij_axes is not None:
        metadata: dict[str, Any] = {"axes": ij_axes, "Info": info_json}
        bigtiff = False
    else:
        metadata = json.loads(info_json)
        bigtiff = math.prod(shape) * dtype.itemsize > _CLASSIC_TIFF_LIMIT
    plane_bytes = shape[-2] * shape[-1] * dtype.itemsize
    checked = CheckedPlanes(planes, shape, dtype)
    with atomic_path(dest, tmp_dir) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, imagej=ij_axes is not None) as tif:
            tif.write(
                checked,
                shape=shape,
                dtype=dtype,
                photometric="minisblack",
                compression="zlib",
                metadata=metadata,
                maxworkers=min(4, os.cpu_count() or 1),
                # bounds the planes tifffile holds for its encoder threads
                buffersize=max(2 * plane_bytes, 2**24),
            )
        checked.finish()
