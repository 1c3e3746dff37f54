"""napari reader, writer and sample data (npe2 contributions; no napari import needed).

- :func:`get_reader`: ``*_labels.tif`` files -> a Labels layer, with the JSON provenance
  sidecar ``*_labels.json`` that ``mobilesam-everything`` and :func:`write_labels` write
  beside them in its ``metadata["mobilesam"]`` (a ``*_labels.tif`` holding non-integer
  values opens as an image). Stacks larger than :data:`LAZY_BYTES` are opened lazily and
  stay editable: a :class:`~.chunked_labels.ChunkedLabels` over tifffile's zarr view
  copies a chunk only when it is first written. The widgets make this reader napari's preferred one
  for such names (``_widgets/_reader_preference.py``), so napari does not ask which
  reader to use.
- :func:`write_labels`: a Labels layer -> a zlib-compressed TIFF (uint16 when the ids
  fit, else uint32; ImageJ hyperstack for up to 3 plane axes when uint16), written
  atomically, with a provenance sidecar when the name ends in ``_labels.tif``.
- :func:`sample_cells`, :func:`sample_cell_stack`, :func:`sample_coins`: images that
  need no download.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .label_stack import labels_dtype, write_labels_tiff

LayerData = tuple[Any, dict[str, Any], str]

# label images above this size are opened lazily
LAZY_BYTES = 512 * 2**20


# ---------------------------------------------------------------------------------- reader


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: a reader for existing ``*_labels.tif`` / ``*_labels.tiff`` files,
    None for anything else."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(_is_labels_tif(p) for p in paths):
        return None
    return read_labels


def _is_labels_tif(path) -> bool:
    path = Path(path)
    return path.name.lower().endswith(("_labels.tif", "_labels.tiff")) and path.is_file()


def read_labels(path: str | list[str]) -> list[LayerData]:
    """Read label images as napari Labels layer data.

    Parameters
    ----------
    path : str or list of str
        One or more ``*_labels.tif`` files.

    Returns
    -------
    list of (data, kwargs, layer_type)
        ``data`` is a numpy array of the file's shape (plane axes, then Y, X); for a
        stack over :data:`LAZY_BYTES` a :class:`~.chunked_labels.ChunkedLabels` over the
        file (a dask array if its values are not integers). ``kwargs`` holds ``name`` (the file
        stem) and ``metadata``: ``{"axes": ..., "path": ...}``, plus ``"mobilesam"``: the
        provenance sidecar's record where there is one. ``layer_type`` is ``"labels"``,
        or ``"image"`` for a file of non-integer values (not a label image despite its
        name).
    """
    import tifffile

    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    layers = []
    for p in paths:
        p = Path(p)
        with tifffile.TiffFile(p) as tif:
            series = tif.series[0]
            axes = series.axes
            data = _labels_data(p, series)
        metadata: dict[str, Any] = {"path": str(p), "axes": axes}
        sidecar = p.with_suffix(".json")
        if sidecar.is_file():
            try:
                metadata["mobilesam"] = json.loads(sidecar.read_text(encoding="utf-8"))
            except ValueError:
                pass  # a broken sidecar does not stop the image from opening
        integer = np.issubdtype(data.dtype, np.integer) or data.dtype == bool
        layers.append(
            (data, {"name": p.stem, "metadata": metadata}, "labels" if integer else "image")
        )
    return layers


def _labels_data(path: Path, series):
    """A TIFF series' data: numpy up to :data:`LAZY_BYTES` and for one plane; a larger
    integer stack as :class:`~.chunked_labels.ChunkedLabels` over the file (editable,
    read lazily); other large data as a read-only dask array."""
    import tifffile

    nbytes = int(np.prod(series.shape)) * series.dtype.itemsize
    planes = int(np.prod(series.shape[:-2]))  # 1 for a 2D file
    if nbytes <= LAZY_BYTES or planes == 1:
        return series.asarray()
    import zarr

    source = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    if np.dtype(source.dtype).kind in "iu":
        from .chunked_labels import ChunkedLabels

        return ChunkedLabels.from_array(source)
    import dask.array as da

    return da.from_zarr(source)


# ---------------------------------------------------------------------------------- writer


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: a Labels layer to a TIFF file, atomically.

    The file is what ``mobilesam-everything`` writes
    (:func:`~napari_mobilesam.label_stack.write_labels_tiff`): deflate-compressed,
    uint16 (uint32 above 65535 labels), an ImageJ hyperstack where ImageJ can hold
    the axes, else a plain (Big)TIFF with the axes in its JSON description.

    Parameters
    ----------
    path : str
        Destination; ``.tif`` is appended when it has no ``.tif``/``.tiff`` suffix.
    data : array-like
        The label image, (..., H, W) integer; written plane by plane, so lazy arrays
        (dask) and chunked labels (:class:`~napari_mobilesam.chunked_labels.ChunkedLabels`,
        whose smallest and largest ids are known without reading them) are never read
        whole.
    meta : dict
        The layer's attributes (napari passes ``name``, ``axis_labels``, ...). Axis
        labels that are distinct single letters ending in y, x name the axes
        (``("z", "y", "x")`` -> ``"ZYX"``); otherwise the plane axes are, from the
        last, Z, T, then other letters.

    Returns
    -------
    list of str
        The TIFF written. For a ``*_labels.tif`` name its provenance ``*_labels.json``
        is written beside it (what the plugin's reader recognises).

    Raises
    ------
    TypeError
        If the labels are not integers (or bool).
    ValueError
        If they have fewer than 2 dimensions, an empty one, negative values or
        values above 2**32 - 1.
    """
    dest = Path(path)
    if dest.suffix.lower() not in (".tif", ".tiff"):
        dest = dest.with_name(dest.name + ".tif")
    if not np.issubdtype(np.dtype(data.dtype), np.integer) and data.dtype != bool:
        raise TypeError(f"labels must be integers to save as TIFF, got dtype {data.dtype}")
    if data.ndim < 2:
        raise ValueError(f"labels must have at least 2 dimensions (Y, X), got shape {data.shape}")
    if 0 in data.shape:
        raise ValueError(f"labels have an empty dimension, shape {data.shape}: nothing to save")
    if int(np.min(data)) < 0:
        raise ValueError("labels must not be negative to save as TIFF")
    max_id = int(np.max(data))
    if max_id > np.iinfo(np.uint32).max:
        raise ValueError(f"labels up to {max_id} do not fit a TIFF's uint32 (max 2**32 - 1)")
    dtype = labels_dtype(max_id)
    shape = tuple(int(s) for s in data.shape)

    def planes():  # one plane in memory at a time (dask, zarr and chunked labels too)
        for index in np.ndindex(*shape[:-2]):
            yield np.asarray(data[index]).astype(dtype, copy=False)

    dest.parent.mkdir(parents=True, exist_ok=True)
    axes = _axes(meta.get("axis_labels"), len(shape))
    write_labels_tiff(dest, planes(), shape, axes, dtype)
    if not dest.name.lower().endswith(("_labels.tif", "_labels.tiff")):
        return [str(dest)]
    from . import __version__
    from .atomic import write_json_atomic

    sidecar = dest.with_suffix(".json")
    record = {
        "tool": "napari-mobilesam",
        "version": __version__,
        "writer": "napari plugin (Save Selected Layers)",
        "layer": meta.get("name"),
        "shape": list(shape),
        "axes": axes,
        "dtype": str(np.dtype(dtype)),
        "max_id": max_id,
        "read_from": (meta.get("metadata") or {}).get("mobilesam"),
    }
    write_json_atomic(sidecar, record)
    return [str(dest)]


def _axes(labels, ndim: int) -> str:
    """TIFF axes letters of an ``ndim``-dimensional labels layer (see :func:`write_labels`)."""
    if labels is not None and len(labels) == ndim:
        letters = "".join(str(a) for a in labels).upper()
        if len(letters) == ndim and letters.isascii() and letters.isalpha():
            if letters.endswith("YX") and len(set(letters)) == ndim:
                return letters
    return _PLANE_AXES[len(_PLANE_AXES) - (ndim - 2) :] + "YX"


#: default letters of a layer's plane axes, taken from the end (no C, X or Y)
_PLANE_AXES = "ABDEFGHIJKLMNOPQRSUVWTZ"


# ----------------------------------------------------------------------------- sample data


def _limits(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, (0.5, 99.8))
    return float(lo), float(hi)


def sample_cells() -> list[LayerData]:
    """A 2D uint16 image of synthetic fluorescent cells (512 x 512, seed 0).

    Made by :func:`napari_mobilesam.synthetic.cells_2d`: round and elongated cells,
    some touching, with texture, uneven illumination and noise.
    """
    from .synthetic import cells_2d

    img = cells_2d((512, 512), seed=0).image
    return [(img, {"name": "synthetic cells", "contrast_limits": _limits(img)}, "image")]


def sample_cell_stack() -> list[LayerData]:
    """A (12, 256, 256) uint16 z-stack of synthetic cells with a z extent (seed 1)."""
    from .synthetic import cells_3d

    stack = cells_3d((12, 256, 256), seed=1, z_radius=(2.5, 5.0)).image
    meta = {"name": "synthetic cell stack", "contrast_limits": _limits(stack)}
    return [(stack, meta, "image")]


def sample_cell_movie() -> list[LayerData]:
    """A (20, 256, 256) uint16 time series of moving, dividing synthetic cells (seed 2)."""
    from .synthetic import cell_time_series

    movie = cell_time_series(20, (256, 256), seed=2).image
    meta = {"name": "synthetic cell movie", "contrast_limits": _limits(movie)}
    return [(movie, meta, "image")]


def sample_coins() -> list[LayerData]:
    """scikit-image's bundled ``coins`` photograph (303 x 384, uint8)."""
    from skimage import data

    return [(data.coins(), {"name": "coins"}, "image")]
