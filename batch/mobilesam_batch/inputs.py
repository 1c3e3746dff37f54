"""Read the inputs of ``mobilesam-everything`` lazily, one 2-D plane at a time.

:func:`discover_inputs` (from :mod:`.discover`) expands files, folders and glob
patterns into a list of input paths. :func:`open_source` opens one input and reads only
its metadata; the returned :class:`ImageSource` knows the shape, dtype and axes of the
data and reads one plane at a time with :meth:`ImageSource.read_plane`, so a 20 GB
stack is never loaded whole:

- TIFF (multi-page, ImageJ hyperstacks, OME-TIFF; level 0 of a pyramid) through
  ``tifffile`` ``series[0].aszarr()`` opened with zarr;
- ``.npy`` through ``np.load(mmap_mode="r")``;
- zarr arrays, and OME-Zarr (OME-NGFF v0.4 / v0.5) groups, by indexing;
- PNG / JPEG through Pillow (small images: decoded whole when the plane is read).

Axes are upper-case letters, one per dimension: ``Y`` and ``X`` are the image rows and
columns, ``C`` or ``S`` (at most one) the channels, and every other letter (``T``, ``Z``,
``Q``, ``I``, ...) a *plane axis*: each combination of plane-axis indices is one 2-D
plane to segment. A plane is returned as ``(H, W)``, or ``(H, W, C)`` channels-last.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from PIL import Image

from .discover import (
    _FILE_SUFFIXES,
    SUPPORTED_SUFFIXES,
    InputError,
    _is_zarr_dir,
    _short,
    discover_inputs,
)

__all__ = ["SUPPORTED_SUFFIXES", "ImageSource", "InputError", "discover_inputs", "open_source"]

_OVERRIDE_LETTERS = "TZCSYXQI"
_CHANNEL_LETTERS = "CS"
_OME_NAMES = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}
# Pillow mode -> (mode to convert to, numpy dtype of the result, number of channels or 0)
_PIL_MODES = {
    "1": ("1", np.dtype(bool), 0),
    "L": ("L", np.dtype(np.uint8), 0),
    "I;16": ("I;16", np.dtype("<u2"), 0),
    "I;16L": ("I;16L", np.dtype("<u2"), 0),
    "I;16B": ("I;16B", np.dtype(">u2"), 0),
    "I": ("I", np.dtype(np.int32), 0),
    "F": ("F", np.dtype(np.float32), 0),
    "LA": ("LA", np.dtype(np.uint8), 2),
    "RGB": ("RGB", np.dtype(np.uint8), 3),
    "RGBA": ("RGBA", np.dtype(np.uint8), 4),
}


# ----------------------------------------------------------------------------- axes


def _infer_axes(shape: tuple[int, ...]) -> str | None:
    """Axes of a bare array from its shape (npy, zarr); None when it cannot be told."""
    ndim = len(shape)
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "YXS" if shape[-1] in (3, 4) and shape[0] > 4 else "ZYX"
    if ndim == 4:
        return "ZYXS" if shape[-1] in (3, 4) else "TZYX"
    if ndim == 5:
        return "TZCYX"
    return None


def _check_override(axes: str, shape: tuple[int, ...], path: Path) -> str:
    """Validate the user's ``axes`` for data of ``shape``; return them upper-cased."""
    if not isinstance(axes, str):
        raise ValueError(f"axes must be a string like 'ZYX', got {axes!r} for {path}")
    upper = axes.upper()
    problems = []
    if len(upper) != len(shape):
        problems.append(f"needs {len(shape)} letters, one per dimension")
    if any(a not in _OVERRIDE_LETTERS for a in upper):
        problems.append(f"letters must be from {_OVERRIDE_LETTERS!r}")
    if len(set(upper)) != len(upper):
        problems.append("letters must be unique")
    if "Y" not in upper or "X" not in upper:
        problems.append("must contain Y and X")
    if sum(a in _CHANNEL_LETTERS for a in upper) > 1:
        problems.append("at most one channel letter (C or S)")
    if problems:
        raise ValueError(f"axes {axes!r} do not fit {path} of shape {shape}: {'; '.join(problems)}")
    return upper


def _resolve_file_axes(axes: str, shape: tuple[int, ...], path: Path) -> str:
    """Check axes read from a file; a size-1 C or S beside the other becomes plane axis 'Q'."""
    hint = "; pass --axes"
    if len(axes) != len(shape):
        raise InputError(path, f"axes {axes!r} do not match shape {shape}{hint}")
    if axes.count("Y") != 1 or axes.count("X") != 1:
        raise InputError(path, f"cannot tell the Y and X axes (axes {axes!r}){hint}")
    chans = [i for i, a in enumerate(axes) if a in _CHANNEL_LETTERS]
    if len(chans) > 2 or (len(chans) == 2 and min(shape[i] for i in chans) > 1):
        sizes = ", ".join(f"{axes[i]}={shape[i]}" for i in chans)
        raise InputError(path, f"more than one channel axis ({sizes}){hint}")
    repeated = sorted({a for a in axes if axes.count(a) > 1})
    if repeated:  # e.g. tifffile's 'QQYX' for a 4-D TIFF without axes metadata
        raise InputError(
            path,
            f"the file does not say what its axes are (read as {axes!r}, {', '.join(repeated)} "
            f"repeated){hint}, e.g. --axes {_example_axes(len(shape))}",
        )
    if len(chans) == 2:  # the size-1 one (C when both are 1) becomes a plane axis
        ones = [i for i in chans if shape[i] == 1]
        drop = next((i for i in ones if axes[i] == "C"), ones[0])
        axes = axes[:drop] + "Q" + axes[drop + 1 :]
    return axes


def _example_axes(ndim: int) -> str:
    """Plausible axes for an ``ndim``-D stack, for a hint: ``ZYX``, ``TZYX``, ``TZCYX``."""
    return {3: "ZYX", 4: "TZYX", 5: "TZCYX"}.get(ndim, "TZYX")


# ----------------------------------------------------------------------------- readers


class _PillowArray:
    """Array-like over a PNG/JPEG: metadata at creation, decoded whole when indexed."""

    def __init__(self, path: Path):
        with Image.open(path) as im:
            mode, (width, height), info = im.mode, im.size, im.info
        if mode in ("P", "PA"):
            mode = "RGBA" if mode == "PA" or "transparency" in info else "RGB"
        elif mode in ("CMYK", "YCbCr"):
            mode = "RGB"
        if mode not in _PIL_MODES:
            raise InputError(path, f"unsupported image mode {mode!r}")
        self.path = path
        self.mode, self.dtype, n_channels = _PIL_MODES[mode]
        self.shape = (height, width, n_channels) if n_channels else (height, width)

    def __getitem__(self, selection):
        with Image.open(self.path) as im:
            im.load()
            data = np.asarray(im if im.mode == self.mode else im.convert(self.mode))
        return data[selection]


def _open_pillow(path: Path):
    array = _PillowArray(path)
    return None, array, "YXS" if len(array.shape) == 3 else "YX", ()


def _open_npy(path: Path):
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return "npy", array, _infer_axes(array.shape), ()


def _open_tiff(path: Path):
    tif = tifffile.TiffFile(path)
    try:
        if not tif.series:
            raise InputError(path, "TIFF file holds no image")
        series = tif.series[0]
        store = series.aszarr(level=0)
        array = zarr.open(store, mode="r")
        fmt = "ome-tiff" if tif.is_ome else "imagej-tiff" if tif.is_imagej else "tiff"
        return fmt, array, series.axes.upper(), (store, tif)
    except BaseException:
        tif.close()
        raise


def _ome_multiscales(attrs) -> dict | None:
    """The first OME-NGFF ``multiscales`` entry of group attributes (v0.4 or v0.5)."""
    found = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    return found[0] if isinstance(found, list) and found else None


def _open_zarr(path: Path):
    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return "zarr", node, _infer_axes(node.shape), ()
    multiscales = _ome_multiscales(node.attrs.asdict())
    if multiscales is not None:
        try:
            array = node[multiscales["datasets"][0]["path"]]
            names = multiscales.get("axes")
            if names is None:  # OME-NGFF v0.1 / v0.2: always 5-D
                axes = "TCZYX" if array.ndim == 5 else _infer_axes(array.shape)
            else:
                names = [a["name"] if isinstance(a, dict) else a for a in names]
                axes = "".join(_OME_NAMES.get(str(n).lower(), "Q") for n in names)
        except (KeyError, IndexError, TypeError) as exc:
            raise InputError(path, f"malformed OME-NGFF multiscales metadata: {exc!r}") from exc
        return "ome-zarr", array, axes, ()
    arrays = [a for _, a in node.arrays()]
    if len(arrays) != 1:
        reason = (
            f"zarr group holds {len(arrays)} arrays and no OME-NGFF multiscales metadata; "
            "give the path of one array inside it"
        )
        raise InputError(path, reason)
    return "zarr", arrays[0], _infer_axes(arrays[0].shape), ()


# ----------------------------------------------------------------------------- sources


@dataclass
class ImageSource:
    """One opened input, read lazily plane by plane.

    Attributes
    ----------
    path : Path
        The file or zarr folder.
    format : str
        ``"png"``, ``"jpeg"``, ``"tiff"``, ``"ome-tiff"``, ``"imagej-tiff"``, ``"npy"``,
        ``"zarr"`` or ``"ome-zarr"``.
    shape : tuple of int
        Shape of the whole data, in the order of ``axes``.
    dtype : numpy.dtype
        Data type of the pixels (bool, integer or float).
    axes : str
        One upper-case letter per dimension of ``shape``: ``Y`` and ``X`` once each, at
        most one channel letter (``C`` or ``S``), any others are plane axes.

    Build it with :func:`open_source`; the private fields hold the lazily indexed array
    (zarr array, memmap or Pillow reader) and the file handles that :meth:`close` closes.
    """

    path: Path
    format: str
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: str
    _array: Any = field(default=None, repr=False, compare=False)
    _handles: tuple = field(default=(), repr=False, compare=False)

    @property
    def channel_axis(self) -> int | None:
        """Index in ``axes`` of the channel axis (``C`` or ``S``), or None."""
        found = [i for i, a in enumerate(self.axes) if a in _CHANNEL_LETTERS]
        return found[0] if found else None

    @property
    def _plane_dims(self) -> list[int]:
        return [i for i, a in enumerate(self.axes) if a not in "YX" and i != self.channel_axis]

    @property
    def plane_axes(self) -> str:
        """Axes that are neither Y, X nor the channel axis, in input order (e.g. ``"TZ"``)."""
        return "".join(self.axes[i] for i in self._plane_dims)

    @property
    def plane_shape(self) -> tuple[int, ...]:
        """Sizes of ``plane_axes``; ``()`` for a single 2-D image."""
        return tuple(self.shape[i] for i in self._plane_dims)

    @property
    def n_planes(self) -> int:
        """Number of 2-D planes, ``prod(plane_shape)`` (1 for a 2-D image)."""
        return math.prod(self.plane_shape)

    @property
    def height(self) -> int:
        """Size of the Y axis."""
        return self.shape[self.axes.index("Y")]

    @property
    def width(self) -> int:
        """Size of the X axis."""
        return self.shape[self.axes.index("X")]

    @property
    def n_channels(self) -> int:
        """Size of the channel axis, 1 without one."""
        c = self.channel_axis
        return 1 if c is None else self.shape[c]

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Layout of the label output: ``plane_shape + (height, width)``."""
        return (*self.plane_shape, self.height, self.width)

    @property
    def out_axes(self) -> str:
        """Axes of the label output: ``plane_axes + "YX"``."""
        return self.plane_axes + "YX"

    def plane_indices(self) -> list[tuple[int, ...]]:
        """Indices of all planes into ``plane_shape``, in C order; ``[()]`` for 2-D."""
        return list(np.ndindex(*self.plane_shape))

    def read_plane(self, index: tuple[int, ...]) -> np.ndarray:
        """Read one 2-D plane from disk.

        Parameters
        ----------
        index : tuple of int
            Position along ``plane_axes`` (``()`` for a 2-D image), as from
            :meth:`plane_indices`.

        Returns
        -------
        numpy.ndarray
            In-memory ``(H, W)``, or ``(H, W, C)`` channels-last when there is a channel
            axis, in the file's dtype.

        Raises
        ------
        ValueError
            ``index`` is not a tuple of in-range integers, or the source is closed.
        InputError
            The data cannot be decoded (corrupt or truncated file).
        """
        try:
            idx = tuple(operator.index(i) for i in index)
        except TypeError:
            idx = None
        plane_shape = self.plane_shape
        if (
            idx is None
            or len(idx) != len(plane_shape)
            or any(not 0 <= i < n for i, n in zip(idx, plane_shape, strict=True))
        ):
            raise ValueError(
                f"{self.path}: plane index {index!r} is out of range for plane shape "
                f"{plane_shape} (axes {self.plane_axes!r})"
            )
        if self._array is None:
            raise ValueError(f"{self.path}: source is closed")
        selection: list[Any] = [slice(None)] * len(self.shape)
        for dim, i in zip(self._plane_dims, idx, strict=True):
            selection[dim] = i
        try:
            raw = np.asarray(self._array[tuple(selection)])
        except (MemoryError, InputError):
            raise
        except Exception as exc:
            reason = f"cannot read plane {idx} as {self.format}: {_short(exc)}"
            raise InputError(self.path, reason) from exc
        kept = [a for i, a in enumerate(self.axes) if i not in self._plane_dims]
        order = [kept.index("Y"), kept.index("X")]
        if self.channel_axis is not None:
            order.append(kept.index(self.axes[self.channel_axis]))
        return np.array(raw.transpose(order), dtype=self.dtype, order="C")

    def close(self) -> None:
        """Release the file handles; :meth:`read_plane` fails afterwards."""
        _close_all(self._handles)
        self._handles = ()
        self._array = None

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def describe(self) -> dict:
        """JSON-able summary: format, shape, dtype, axes, channel_axis, plane_axes, n_planes."""
        return {
            "format": self.format,
            "shape": list(self.shape),
            "dtype": str(self.dtype),
            "axes": self.axes,
            "channel_axis": self.channel_axis,
            "plane_axes": self.plane_axes,
            "n_planes": self.n_planes,
        }


_OPENERS = {"png": _open_pillow, "jpeg": _open_pillow, "tiff": _open_tiff, "npy": _open_npy}
_LABELS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "npy": "npy", "zarr": "zarr"}


def _close_all(handles: tuple) -> None:
    for handle in handles:
        handle.close()


def open_source(path: str | Path, axes: str | None = None) -> ImageSource:
    """Open an input lazily: read its metadata only.

    Parameters
    ----------
    path : str or Path
        An image file (PNG, JPEG, TIFF, npy) or a zarr store folder.
    axes : str, optional
        The user's ``--axes``: overrides the axes from the file. One letter per
        dimension from ``"TZCSYXQI"`` (case-insensitive), unique, with Y and X and at
        most one of C / S, e.g. ``"ZYX"``, ``"YXC"``, ``"TZCYX"``.

    Returns
    -------
    ImageSource
        Close it (or use it as a context manager) to release the file.

    Raises
    ------
    InputError
        Missing, unsupported, empty, corrupt or pixel-less input, unsupported dtype, or
        axes that cannot be read from the file nor inferred.
    ValueError
        ``axes`` does not fit the data.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    if path.is_dir():
        if not _is_zarr_dir(path):
            raise InputError(path, "is a folder, not a zarr store or an image")
        kind = "zarr"
    else:
        suffix = path.suffix.lower()
        if suffix not in _FILE_SUFFIXES:
            supported = ", ".join(SUPPORTED_SUFFIXES)
            raise InputError(path, f"unsupported file type {suffix!r} (supported: {supported})")
        if path.stat().st_size == 0:
            raise InputError(path, "empty file (0 bytes)")
        kind = _FILE_SUFFIXES[suffix]
    opener = _open_zarr if kind == "zarr" else _OPENERS[kind]
    try:
        fmt, array, file_axes, handles = opener(path)
    except (MemoryError, InputError):
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read as {_LABELS[kind]}: {_short(exc)}") from exc
    try:
        shape = tuple(int(n) for n in array.shape)
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "biuf":
            raise InputError(path, f"unsupported data type {dtype} (need bool, int or float)")
        if 0 in shape:
            raise InputError(path, f"image has no pixels (shape {shape})")
        if axes is not None:
            axes = _check_override(axes, shape, path)
        elif file_axes is None:
            reason = f"cannot infer the axes of a {len(shape)}-D array of shape {shape}"
            raise InputError(path, reason + "; pass --axes")
        else:
            axes = _resolve_file_axes(file_axes, shape, path)
    except BaseException:
        _close_all(handles)
        raise
    return ImageSource(path, fmt or kind, shape, dtype, axes, array, handles)
