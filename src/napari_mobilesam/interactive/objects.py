"""The objects of a label image as a table, and edits of them (delete, merge), GUI-free.

A *row* is one label id on one plane: for a 2D label image one row per id, for a stack
(leading plane axes, then (H, W)) one row per id and plane it appears on, so that an
object followed through z by propagation has a row for each of its planes. Tables are
plain dicts of equal-length 1D numpy columns (no pandas), in this column order:

``id``
    The label id (int64).
``plane_0`` ... ``plane_{k-1}``
    The row's indices into the k leading (plane) axes; absent for 2D labels.
``area``
    Pixels of the object on the plane (int64).
``bbox_min_row``, ``bbox_min_col``, ``bbox_max_row``, ``bbox_max_col``
    Its bounding box in the plane, max exclusive (int64).
``centroid_row``, ``centroid_col``
    Its centroid in the plane (float64).
``predicted_iou``, ``stability_score``
    The model's scores for the mask it came from (float64), NaN for objects without
    recorded scores (painted by hand, merged, or propagated).
``mean_intensity``, ``max_intensity``
    Per object over the image's pixels (float64), only when an image is given; for a
    C-channel image ``mean_intensity_0`` ... ``mean_intensity_{C-1}``, then the maxima.

Scores are kept in napari's layer ``features`` with the same column names plus napari's
``index`` (the label id): :func:`record_scores` writes them, :func:`scores_from` reads them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping

import numpy as np
from skimage.measure import regionprops_table

__all__ = [
    "SCORE_COLUMNS",
    "apply_scores",
    "concat_tables",
    "delete_objects",
    "edit_indices",
    "empty_table",
    "features_from",
    "merge_objects",
    "object_table",
    "plane_table",
    "record_scores",
    "scores_from",
    "table_csv",
]

SCORE_COLUMNS = ("predicted_iou", "stability_score")
_BOX = ("bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col")
_PROPS = ("label", "area", "bbox", "centroid")

Scores = Mapping[tuple[tuple[int, ...], int], tuple[float, float]]


def _check_labels(labels):
    """``labels`` itself (not loaded: a dask stack stays lazy), checked."""
    if not all(hasattr(labels, a) for a in ("__array__", "shape", "dtype")):
        raise TypeError(f"labels must be an array, got {type(labels).__name__}")
    if np.dtype(labels.dtype).kind not in "iu":
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.ndim < 2:
        raise ValueError(f"labels must be (..., H, W) with at least 2 axes, got {labels.shape}")
    return labels


def _channels(labels_shape: tuple[int, ...], image) -> int | None:
    """Channels of ``image`` for labels of this shape: None without image, 0 for one
    channel of the labels' shape, C for (..., H, W, C)."""
    if image is None:
        return None
    shape = tuple(image.shape)
    if shape == tuple(labels_shape):
        return 0
    if len(shape) == len(labels_shape) + 1 and shape[:-1] == tuple(labels_shape):
        return int(shape[-1])
    raise ValueError(
        f"image must have the labels' shape {tuple(labels_shape)} or that shape plus a "
        f"trailing channel axis, got {shape}"
    )


def _intensity_names(channels: int | None) -> list[str]:
    if channels is None:
        return []
    if channels == 0:
        return ["mean_intensity", "max_intensity"]
    return [f"mean_intensity_{c}" for c in range(channels)] + [
        f"max_intensity_{c}" for c in range(channels)
    ]


def empty_table(n_plane_axes: int = 0, channels: int | None = None) -> dict[str, np.ndarray]:
    """A table without rows, with the columns of labels with ``n_plane_axes`` leading
    axes and an image of ``channels`` channels (None: no image; 0: one, no channel axis).

    Returns
    -------
    dict of str to np.ndarray
        The columns (see the module docstring), each of length 0.
    """
    ints = ["id", *(f"plane_{i}" for i in range(n_plane_axes)), "area", *_BOX]
    floats = ["centroid_row", "centroid_col", *SCORE_COLUMNS, *_intensity_names(channels)]
    table = {name: np.zeros(0, dtype=np.int64) for name in ints}
    table.update({name: np.zeros(0, dtype=np.float64) for name in floats})
    return table


def plane_table(
    labels: np.ndarray,
    image: np.ndarray | None = None,
    *,
    plane: tuple[int, ...] = (),
    scores: Scores | None = None,
) -> dict[str, np.ndarray]:
    """The objects of one label plane.

    Parameters
    ----------
    labels : np.ndarray
        (H, W) integer labels, 0 = background.
    image : np.ndarray, optional
        (H, W) or (H, W, C) intensities of the same plane (raw values, any numeric dtype).
    plane : tuple of int
        The plane's indices in its stack, written to the ``plane_*`` columns.
    scores : mapping, optional
        ``{(plane, id): (predicted_iou, stability_score)}``; rows not in it get NaN.

    Returns
    -------
    dict of str to np.ndarray
        One row per id present, ascending; columns as in the module docstring.

    Raises
    ------
    TypeError, ValueError
        For labels that are not a 2D integer array, or an image of another shape.
    """
    labels = np.asarray(_check_labels(labels))
    if labels.ndim != 2:
        raise ValueError(f"labels must be one (H, W) plane, got shape {labels.shape}")
    plane = tuple(int(i) for i in plane)
    channels = _channels(labels.shape, image)
    table = empty_table(len(plane), channels)
    if not labels.any():
        return table
    props = _PROPS + (("intensity_mean", "intensity_max") if channels is not None else ())
    intensity = None if image is None else np.asarray(image)
    raw = regionprops_table(labels, intensity, properties=props)
    n = len(raw["label"])
    table["id"] = raw["label"].astype(np.int64)
    for i, index in enumerate(plane):
        table[f"plane_{i}"] = np.full(n, index, dtype=np.int64)
    table["area"] = raw["area"].astype(np.int64)
    for i, name in enumerate(_BOX):
        table[name] = raw[f"bbox-{i}"].astype(np.int64)
    table["centroid_row"] = raw["centroid-0"].astype(np.float64)
    table["centroid_col"] = raw["centroid-1"].astype(np.float64)
    pairs = [(scores or {}).get((plane, int(i)), (np.nan, np.nan)) for i in table["id"]]
    table["predicted_iou"] = np.array([p[0] for p in pairs], dtype=np.float64).reshape(n)
    table["stability_score"] = np.array([p[1] for p in pairs], dtype=np.float64).reshape(n)
    if channels == 0:
        table["mean_intensity"] = raw["intensity_mean"].astype(np.float64)
        table["max_intensity"] = raw["intensity_max"].astype(np.float64)
    elif channels:
        for c in range(channels):
            table[f"mean_intensity_{c}"] = raw[f"intensity_mean-{c}"].astype(np.float64)
            table[f"max_intensity_{c}"] = raw[f"intensity_max-{c}"].astype(np.float64)
    return table


def concat_tables(tables: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of several tables with the same columns, in order.

    Raises
    ------
    ValueError
        When there is no table, or their columns differ.
    """
    tables = list(tables)
    if not tables:
        raise ValueError("tables is empty: give at least one table (e.g. empty_table())")
    names = list(tables[0])
    for t in tables[1:]:
        if list(t) != names:
            raise ValueError(f"tables must have the same columns, got {names} and {list(t)}")
    return {name: np.concatenate([np.asarray(t[name]) for t in tables]) for name in names}


def object_table(labels, image=None, *, scores: Scores | None = None) -> dict[str, np.ndarray]:
    """The objects of a label image or stack, one row per id and plane.

    Parameters
    ----------
    labels : array_like
        (..., H, W) integer labels, 0 = background; the leading axes index planes.
    image : array_like, optional
        Intensities of the labels' shape, or of that shape plus a trailing channel axis
        (..., H, W, C) such as RGB; raw values. Read one plane at a time (dask works).
    scores : mapping, optional
        ``{(plane, id): (predicted_iou, stability_score)}`` as from :func:`scores_from`.

    Returns
    -------
    dict of str to np.ndarray
        Rows by plane (C order), then by id; columns as in the module docstring.

    Raises
    ------
    TypeError, ValueError
        For labels that are not an integer array with >= 2 axes, or an image of another
        shape.
    """
    labels = _check_labels(labels)
    lead = labels.shape[:-2]
    channels = _channels(labels.shape, image)
    tables = [empty_table(len(lead), channels)]
    for index in np.ndindex(*lead):
        plane = tuple(int(i) for i in index)
        part = np.asarray(labels[plane])
        if part.any():
            img = None if image is None else np.asarray(image[plane])
            tables.append(plane_table(part, img, plane=plane, scores=scores))
    return concat_tables(tables)


def scores_from(features: Mapping, n_plane_axes: int = 0) -> dict:
    """The recorded scores in a features table (napari's layer ``features``).

    Parameters
    ----------
    features : mapping of str to array_like
        Columns ``index`` (label id), ``plane_*`` for stacks, ``predicted_iou`` and
        ``stability_score``; a table without them has no scores.
    n_plane_axes : int
        Leading plane axes of the labels (0 for 2D).

    Returns
    -------
    dict
        ``{(plane, id): (predicted_iou, stability_score)}`` for rows with a finite
        predicted IoU or stability.
    """
    names = ["index", *(f"plane_{i}" for i in range(n_plane_axes)), *SCORE_COLUMNS]
    if any(name not in features for name in names) or not len(features["index"]):
        return {}
    cols = {name: np.asarray(features[name]) for name in names}
    out = {}
    for k in range(len(cols["index"])):
        iou, stab = float(cols["predicted_iou"][k]), float(cols["stability_score"][k])
        if np.isfinite(iou) or np.isfinite(stab):
            plane = tuple(int(cols[f"plane_{i}"][k]) for i in range(n_plane_axes))
            out[(plane, int(cols["index"][k]))] = (iou, stab)
    return out


def record_scores(
    features: Mapping,
    ids,
    predicted_iou,
    stability_score,
    *,
    plane: tuple[int, ...] = (),
    replace_plane: bool = False,
) -> dict[str, np.ndarray]:
    """A features table with the scores of objects added (or replaced).

    Parameters
    ----------
    features : mapping of str to array_like
        The layer's current features; only its recorded scores are kept.
    ids : (N,) array_like of int
        Label ids of the scored objects on ``plane``.
    predicted_iou, stability_score : (N,) array_like of float
        Their scores.
    plane : tuple of int
        The plane they are on (``()`` for 2D labels).
    replace_plane : bool
        Drop the plane's earlier scores first (a new segmentation of the plane).

    Returns
    -------
    dict of str to np.ndarray
        Columns ``index``, ``plane_*``, ``predicted_iou``, ``stability_score``, one row
        per scored object (the layer's other columns come back at the next table).

    Raises
    ------
    ValueError
        When the three arrays differ in length.
    """
    plane = tuple(int(i) for i in plane)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    iou = np.asarray(predicted_iou, dtype=np.float64).reshape(-1)
    stab = np.asarray(stability_score, dtype=np.float64).reshape(-1)
    if not len(ids) == len(iou) == len(stab):
        raise ValueError(
            f"ids, predicted_iou and stability_score must have one value per object, got "
            f"lengths {len(ids)}, {len(iou)} and {len(stab)}"
        )
    scores = scores_from(features, len(plane))
    if replace_plane:
        scores = {key: value for key, value in scores.items() if key[0] != plane}
    for i, a, b in zip(ids.tolist(), iou.tolist(), stab.tolist(), strict=True):
        scores[(plane, i)] = (a, b)
    return _score_columns(scores, len(plane))


def _score_columns(scores: Scores, n_plane_axes: int) -> dict[str, np.ndarray]:
    keys = sorted(scores)
    out = {"index": np.array([k[1] for k in keys], dtype=np.int64)}
    for i in range(n_plane_axes):
        out[f"plane_{i}"] = np.array([k[0][i] for k in keys], dtype=np.int64)
    out["predicted_iou"] = np.array([scores[k][0] for k in keys], dtype=np.float64)
    out["stability_score"] = np.array([scores[k][1] for k in keys], dtype=np.float64)
    return out


def apply_scores(table: Mapping[str, np.ndarray], scores: Scores) -> dict[str, np.ndarray]:
    """A copy of ``table`` with its score columns taken from ``scores``.

    Parameters
    ----------
    table : mapping of str to np.ndarray
        From :func:`object_table`.
    scores : mapping
        ``{(plane, id): (predicted_iou, stability_score)}``; rows not in it get NaN.

    Returns
    -------
    dict of str to np.ndarray
    """
    out = {name: np.asarray(col) for name, col in table.items()}
    n_plane_axes = sum(1 for name in out if name.startswith("plane_"))
    planes = [out[f"plane_{i}"] for i in range(n_plane_axes)]
    pairs = [
        scores.get((tuple(int(p[k]) for p in planes), int(label)), (np.nan, np.nan))
        for k, label in enumerate(out["id"])
    ]
    n = len(pairs)
    out["predicted_iou"] = np.array([p[0] for p in pairs], dtype=np.float64).reshape(n)
    out["stability_score"] = np.array([p[1] for p in pairs], dtype=np.float64).reshape(n)
    return out


def table_csv(table: Mapping[str, np.ndarray], order=None) -> str:
    """The table as CSV text: a header of the column names, one line per row, NaN as an
    empty cell.

    Parameters
    ----------
    table : mapping of str to np.ndarray
    order : (M,) array_like of int, optional
        The rows to write, in this order; default all in table order.

    Returns
    -------
    str
    """
    names = list(table)
    n = len(table[names[0]]) if names else 0
    rows = range(n) if order is None else np.asarray(order, dtype=np.intp)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(names)
    cols = [np.asarray(table[name]) for name in names]
    for k in rows:
        writer.writerow(["" if _isnan(c[k]) else c[k].item() for c in cols])
    return buf.getvalue()


def _isnan(value) -> bool:
    return isinstance(value, np.floating) and bool(np.isnan(value))


def features_from(table: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """napari layer ``features`` of a table: its columns with ``id`` named ``index``
    (napari's label-id column), first."""
    return {("index" if name == "id" else name): np.asarray(col) for name, col in table.items()}


def edit_indices(labels: np.ndarray, rows, *, merge: bool) -> tuple[tuple[np.ndarray, ...], int]:
    """The pixels a delete or merge of table rows changes, and their new value.

    Parameters
    ----------
    labels : array_like
        (..., H, W) integer labels; only the rows' planes are read (chunked or lazy
        labels are not loaded whole).
    rows : sequence of (plane, id)
        The rows' objects: ``plane`` a tuple of the leading indices (``()`` for 2D).
    merge : bool
        False: the objects' pixels become 0 (delete). True: they take the smallest id
        among the rows (merge); the smallest id's own pixels do not change.

    Returns
    -------
    indices : tuple of np.ndarray
        ``labels.ndim`` index arrays (``np.nonzero`` form) of the pixels to change.
    value : int
        Their new label.

    Raises
    ------
    ValueError
        When ``rows`` is empty, a plane does not fit the labels, an id is < 1, or a merge
        has fewer than 2 distinct ids.
    """
    labels = _check_labels(labels)
    rows = [(tuple(int(i) for i in plane), int(label)) for plane, label in rows]
    if not rows:
        raise ValueError("rows is empty: select at least one object")
    lead = labels.shape[:-2]
    for plane, label in rows:
        if len(plane) != len(lead) or any(not 0 <= p < s for p, s in zip(plane, lead, strict=True)):
            raise ValueError(f"plane {plane} does not index the labels' planes {lead}")
        if label < 1:
            raise ValueError(f"object ids must be >= 1 (0 is background), got {label}")
    ids = sorted({label for _, label in rows})
    if merge and len(ids) < 2:
        raise ValueError(f"merging needs objects of 2 or more ids, got {ids}")
    value = ids[0] if merge else 0
    by_plane: dict[tuple[int, ...], list[int]] = {}
    for plane, label in rows:
        if label != value:
            by_plane.setdefault(plane, []).append(label)
    parts = []
    for plane, plane_ids in sorted(by_plane.items()):
        hits = np.nonzero(np.isin(np.asarray(labels[plane]), plane_ids))
        parts.append(tuple(np.full(len(hits[0]), p, dtype=np.intp) for p in plane) + hits)
    if not parts:
        return tuple(np.zeros(0, dtype=np.intp) for _ in range(labels.ndim)), value
    return tuple(np.concatenate(axis) for axis in zip(*parts, strict=True)), value


def delete_objects(labels: np.ndarray, rows) -> int:
    """Set the pixels of the rows' objects to 0, in place; other objects never change.

    Parameters
    ----------
    labels : np.ndarray
        (..., H, W) integer labels, modified in place.
    rows : sequence of (plane, id)
        As for :func:`edit_indices`.

    Returns
    -------
    int
        Pixels changed. Errors: see :func:`edit_indices`.
    """
    indices, value = edit_indices(labels, rows, merge=False)
    labels[indices] = value
    return len(indices[0])


def merge_objects(labels: np.ndarray, rows) -> int:
    """Relabel the rows' objects to the smallest of their ids, in place.

    Parameters
    ----------
    labels : np.ndarray
        (..., H, W) integer labels, modified in place.
    rows : sequence of (plane, id)
        As for :func:`edit_indices`; at least 2 distinct ids.

    Returns
    -------
    int
        The id the objects now have. Errors: see :func:`edit_indices`.
    """
    indices, value = edit_indices(labels, rows, merge=True)
    labels[indices] = value
    return value
