"""Final output files of ``mobilesam-everything``, each written atomically.

Per input ``<stem>`` the runner writes ``<stem>_labels.tif`` (:func:`write_labels_tiff`),
optionally ``<stem>_labels.zarr`` (:func:`write_labels_zarr`), ``<stem>_coco.json``
(:func:`coco_annotations`, :func:`write_coco_json`, :func:`write_json_atomic`),
``<stem>_objects.csv`` (:func:`object_table`, :func:`write_objects_csv`) and the
``<stem>_labels.json`` provenance (:func:`write_json_atomic`).

Conventions:

- a *label image* is an (H, W) array of non-negative integers, 0 = background;
- a *stack* has ``shape = plane dims + (H, W)`` and ``axes``, one upper-case letter
  per dimension ending in ``"YX"`` (``"YX"``, ``"ZYX"``, ``"TZYX"``, ``"QYX"``, ...);
  its planes are given as an iterable of (H, W) arrays in C order of the plane
  dimensions (the last plane axis varies fastest) and written one at a time, so
  memory does not grow with the number of planes;
- boxes are pixel boxes: XYWH with an inclusive start (``width = x1 - x0 + 1``);
- every file is first written to a hidden temporary ``.<name>.<random>.tmp`` in
  ``tmp_dir`` (default: the destination's folder; it must be on the destination's
  filesystem) and then renamed onto the destination with :func:`os.replace`.
  On any error the temporary is removed and an existing destination is untouched.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from napari_mobilesam.atomic import atomic_path, to_json, write_json_atomic, write_text_atomic
from napari_mobilesam.everything.masks import crop_to_rle
from napari_mobilesam.everything.rle import rle_to_coco
from napari_mobilesam.label_stack import (
    CheckedPlanes,
    check_stack,
    imagej_axes,
    labels_dtype,
    write_labels_tiff,
)

__all__ = [
    "OBJECT_COLUMNS",
    "atomic_path",
    "coco_annotations",
    "imagej_axes",
    "labels_dtype",
    "ngff_attrs",
    "object_table",
    "write_coco_json",
    "write_json_atomic",
    "write_labels_tiff",
    "write_labels_zarr",
    "write_objects_csv",
    "write_text_atomic",
]

OBJECT_COLUMNS: tuple[str, ...] = (
    "plane",
    "label",
    "area",
    "bbox_x",
    "bbox_y",
    "bbox_width",
    "bbox_height",
    "centroid_y",
    "centroid_x",
    "predicted_iou",
    "stability_score",
)

COCO_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "object", "supercategory": "object"},
)

_NGFF_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


# --------------------------------------------------------------------------- label stacks
# (checks and TIFF: napari_mobilesam.label_stack, shared with the napari writer)


def ngff_attrs(axes: str, name: str | None = None) -> dict[str, Any]:
    """OME-NGFF 0.4 root attributes of a single-scale label image with ``axes``.

    Parameters
    ----------
    axes : str
        Upper-case letters ending in ``"YX"``; NGFF 0.4 allows 2 to 5 axes.
    name : str, optional
        The multiscale's name.

    Returns
    -------
    dict
        ``{"multiscales": [...], "image-label": {"version": "0.4"}}``; axis names are
        the lower-case letters, types ``t`` time, ``c`` channel, ``z``/``y``/``x``
        space, none for other letters; one dataset ``"0"`` with unit scale.

    Raises
    ------
    ValueError
        If ``axes`` has fewer than 2 or more than 5 letters.
    """
    if not 2 <= len(axes) <= 5:
        raise ValueError(f"OME-NGFF 0.4 images have 2 to 5 axes, got {axes!r}")
    ngff_axes = []
    for letter in axes.lower():
        axis = {"name": letter}
        if letter in _NGFF_AXIS_TYPES:
            axis["type"] = _NGFF_AXIS_TYPES[letter]
        ngff_axes.append(axis)
    multiscale: dict[str, Any] = {
        "version": "0.4",
        "axes": ngff_axes,
        "datasets": [
            {
                "path": "0",
                "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(axes)}],
            }
        ],
    }
    if name is not None:
        multiscale["name"] = name
    return {"multiscales": [multiscale], "image-label": {"version": "0.4"}}


def write_labels_zarr(
    dest: Path,
    planes: Iterable[np.ndarray],
    shape: tuple[int, ...],
    axes: str,
    dtype: Any,
    *,
    tmp_dir: Path | None = None,
    chunk_yx: int = 1024,
    attrs: dict | None = None,
) -> None:
    """Stream a label stack into an OME-Zarr (NGFF 0.4, zarr format 2) folder, atomically.

    Parameters
    ----------
    dest : path
        The ``.zarr`` folder; an existing one is replaced as a whole.
    planes, shape, axes, dtype
        As for :func:`write_labels_tiff`; ``axes`` has 2 to 5 letters.
    tmp_dir : path, optional
        Folder for the temporary folder (see :func:`atomic_path`).
    chunk_yx : int
        Chunks are ``(1, ..., 1, min(H, chunk_yx), min(W, chunk_yx))``.
    attrs : dict, optional
        JSON-able provenance, stored in the root attributes under ``"mobilesam"``.

    Notes
    -----
    The root group carries :func:`ngff_attrs`; array ``"0"`` holds the labels,
    Blosc-LZ4 compressed (zarr's v2 default, read by every zarr v2 reader) with
    ``"/"`` as the chunk key separator, as NGFF 0.4 requires. Read it back with
    ``zarr.open_group(dest)["0"]``.

    Raises
    ------
    ValueError
        For a bad ``shape``/``axes``/``dtype``/``chunk_yx``, or planes of the wrong
        number, shape or range; ``dest`` is then left as it was.
    TypeError
        If a plane is not of an integer dtype, or ``attrs`` is not JSON-able.
    """
    import numcodecs
    import zarr

    shape, dtype = check_stack(shape, axes, dtype)
    if isinstance(chunk_yx, bool) or not isinstance(chunk_yx, int | np.integer) or chunk_yx < 1:
        raise ValueError(f"chunk_yx must be a positive int, got {chunk_yx!r}")
    dest = Path(dest)
    root_attrs = ngff_attrs(axes, name=dest.name.removesuffix(".zarr"))
    if attrs is not None:
        root_attrs["mobilesam"] = json.loads(to_json(attrs))
    chunks = (1,) * (len(shape) - 2) + (min(shape[-2], chunk_yx), min(shape[-1], chunk_yx))
    checked = CheckedPlanes(planes, shape, dtype)
    with atomic_path(dest, tmp_dir, is_dir=True) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        root.attrs.update(root_attrs)
        arr = root.create_array(
            "0",
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=0,
            compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
            chunk_key_encoding={"name": "v2", "separator": "/"},
        )
        for index, plane in zip(np.ndindex(shape[:-2]), checked, strict=False):
            arr[index] = plane
        checked.finish()


# --------------------------------------------------------------------------- object tables


def _check_label_image(labels: np.ndarray) -> np.ndarray:
    """``labels`` as an (H, W) non-negative integer array."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be an (H, W) label image, got shape {labels.shape}")
    if labels.dtype.kind not in "ui":
        raise TypeError(f"labels must be of an integer dtype, got {labels.dtype}")
    if labels.dtype.kind == "i" and labels.size and int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative, got min {int(labels.min())}")
    return labels


def _regions(labels: np.ndarray) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Yield ``(label, y0, x0, mask crop)`` per label present, by increasing label.

    The crop is the (h, w) bool mask ``labels == label`` inside the label's
    bounding box, whose top-left pixel is (y0, x0). Only the boxes are touched.
    """
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        rows, cols = region
        yield index, rows.start, cols.start, labels[region] == index


def _scores_of(scores: Mapping[int, Mapping[str, float]] | None, label: int) -> dict[str, Any]:
    """``predicted_iou`` and ``stability_score`` of ``label`` as floats, None where unknown."""
    entry = scores.get(label) if scores is not None else None
    out = {}
    for key in ("predicted_iou", "stability_score"):
        value = entry.get(key) if entry is not None else None
        out[key] = None if value is None else float(value)
    return out


def object_table(
    labels: np.ndarray, scores: Mapping[int, Mapping[str, float]] | None = None
) -> list[dict[str, Any]]:
    """Measurements of every label in an (H, W) label image.

    Parameters
    ----------
    labels : (H, W) non-negative integer array
        0 is background; absent ids are skipped.
    scores : mapping, optional
        ``{label: {"predicted_iou": float, "stability_score": float}}``.

    Returns
    -------
    list of dict, ordered by label
        ``label``, ``area`` (pixels), ``bbox_x``, ``bbox_y``, ``bbox_width``,
        ``bbox_height`` (XYWH box, inclusive start), ``centroid_y``, ``centroid_x``
        (row, column; mean pixel position rounded to 2 decimals), ``predicted_iou``,
        ``stability_score`` (None where ``scores`` does not give them). Python types.

    Raises
    ------
    ValueError
        If ``labels`` is not 2D or has negative values.
    TypeError
        If ``labels`` is not of an integer dtype.
    """
    labels = _check_label_image(labels)
    rows = []
    for label, y0, x0, crop in _regions(labels):
        per_row = np.count_nonzero(crop, axis=1)
        per_col = np.count_nonzero(crop, axis=0)
        area = int(per_row.sum())
        h, w = crop.shape
        rows.append(
            {
                "label": label,
                "area": area,
                "bbox_x": x0,
                "bbox_y": y0,
                "bbox_width": w,
                "bbox_height": h,
                "centroid_y": round(y0 + float(per_row @ np.arange(h)) / area, 2),
                "centroid_x": round(x0 + float(per_col @ np.arange(w)) / area, 2),
                **_scores_of(scores, label),
            }
        )
    return rows


def write_objects_csv(
    dest: Path,
    rows: Iterable[Mapping[str, Any]],
    tmp_dir: Path | None = None,
    columns: list[str] | None = None,
) -> None:
    """Write object rows as CSV with header ``columns`` (:data:`OBJECT_COLUMNS`), atomically.

    Parameters
    ----------
    dest : path
        The ``.csv`` file.
    rows : iterable of mappings
        Keys from :data:`OBJECT_COLUMNS` (e.g. :func:`object_table` rows plus
        ``"plane"``); written one at a time. Missing keys and None become empty
        cells; floats are written by the csv module (shortest round-trip repr).
    tmp_dir : path, optional
        Folder for the temporary file (see :func:`atomic_path`).
    columns : list of str, optional
        The header, in order (default :data:`OBJECT_COLUMNS`; ``--link`` adds the
        linked id after ``label``).

    Raises
    ------
    ValueError
        If a row has a key that is not in ``columns``.
    """
    fields = list(OBJECT_COLUMNS if columns is None else columns)
    with atomic_path(dest, tmp_dir) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


# --------------------------------------------------------------------------- COCO


def coco_annotations(
    labels: np.ndarray,
    image_id: int,
    first_id: int,
    scores: Mapping[int, Mapping[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """COCO ``annotations`` of every label in an (H, W) label image.

    Parameters
    ----------
    labels : (H, W) non-negative integer array
        0 is background; absent ids are skipped.
    image_id : int
        The ``id`` of this image's entry in the document's ``images``.
    first_id : int
        Annotation ids are ``first_id, first_id + 1, ...`` in label order.
    scores : mapping, optional
        As for :func:`object_table`.

    Returns
    -------
    list of dict
        ``id``, ``image_id``, ``category_id`` (1), ``segmentation`` (COCO compressed
        RLE ``{"size": [H, W], "counts": str}``), ``area`` (int pixels), ``bbox``
        (``[x, y, w, h]`` floats: top-left pixel corner and size in pixels),
        ``iscrowd`` (0), ``label``, ``predicted_iou``, ``stability_score``.
        Each RLE is built from the label's bounding-box crop, not a full mask.

    Raises
    ------
    ValueError, TypeError
        As for :func:`object_table`.
    """
    labels = _check_label_image(labels)
    image_id, next_id = int(image_id), int(first_id)
    out = []
    for label, y0, x0, crop in _regions(labels):
        h, w = crop.shape
        rle = crop_to_rle(crop, (x0, y0, x0 + w - 1, y0 + h - 1), labels.shape)
        out.append(
            {
                "id": next_id,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": rle_to_coco(rle),
                "area": int(np.count_nonzero(crop)),
                "bbox": [float(x0), float(y0), float(w), float(h)],
                "iscrowd": 0,
                "label": label,
                **_scores_of(scores, label),
            }
        )
        next_id += 1
    return out


def write_coco_json(
    dest: Path,
    images: list[dict[str, Any]],
    annotations: Iterable[dict[str, Any]],
    *,
    info: dict[str, Any] | None = None,
    tmp_dir: Path | None = None,
) -> int:
    """Write a COCO instance-segmentation file, streaming the annotations; atomic.

    The document is ``{"info", "images", "categories", "annotations"}`` with the single
    category ``object`` (id 1). Annotations are written one at a time as the iterable
    yields them (e.g. plane by plane from :func:`coco_annotations`), so a long stack
    never holds all of them in memory.

    Parameters
    ----------
    dest : Path
        The ``.json`` file.
    images : list of dict
        ``{"id", "file_name", "height", "width", ...}`` (extra keys such as ``"plane"``
        are kept).
    annotations : iterable of dict
        The annotations, in order.
    info : dict, optional
        The document's ``info``; ``{}`` if not given.
    tmp_dir : Path, optional
        Where the temporary file is written (see :func:`atomic_path`).

    Returns
    -------
    int
        The number of annotations written.
    """
    head = {
        "info": dict(info) if info else {},
        "images": list(images),
        "categories": [dict(c) for c in COCO_CATEGORIES],
    }
    count = 0
    with atomic_path(Path(dest), tmp_dir) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(to_json(head)[:-1] + ', "annotations": [')
        for ann in annotations:
            f.write((", " if count else "") + to_json(ann))
            count += 1
        f.write("]}\n")
    return count
