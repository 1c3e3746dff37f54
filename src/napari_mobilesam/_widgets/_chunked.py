"""Labels layers of large stacks on chunked labels (:mod:`napari_mobilesam.chunked_labels`).

The widgets make their Labels layers (``<image>_labels``, ``<image> everything``) with
:func:`add_labels`: a stack whose uint32 labels would exceed
``MOBILESAM_CHUNKED_LABELS_MB`` (default 1024 MiB) gets a
:class:`~napari_mobilesam.chunked_labels.ChunkedLabels` on disk instead of a numpy array,
so only the plane napari shows is in memory. napari paints, fills, erases and undoes on
it as on any array; its *new label* key (M), which refuses arrays other than numpy's, is
replaced on such a layer by one that reads the largest id from the labels' record.
"""

from __future__ import annotations

import copy

import numpy as np
from napari.utils.notifications import show_info

from ..chunked_labels import ChunkedLabels, new_labels

__all__ = ["add_labels", "release", "snapshot", "writable"]


def writable(data) -> bool:
    """Whether the widgets can paint into a Labels layer's data in place."""
    return isinstance(data, np.ndarray | ChunkedLabels)


def unwritable(name: str) -> str:
    """What to say when a Labels layer's data cannot be painted in place (see
    :func:`writable`): a lazily opened layer, and how to make it paintable."""
    return (
        f"{name!r} is not an in-memory array (opened lazily?); convert it with "
        "layer.data = numpy.asarray(layer.data) to commit into it"
    )


def snapshot(data):
    """A copy of a Labels layer's data for a worker to read while the layer is edited:
    numpy's in memory, chunked labels' on disk (their chunk files copied, nothing read);
    other data (lazy, read-only) as it is. :func:`release` it after."""
    if isinstance(data, ChunkedLabels):
        return copy.deepcopy(data)
    return data.copy() if isinstance(data, np.ndarray) else data


def release(data) -> None:
    """Remove a :func:`snapshot` of chunked labels from disk (nothing for others)."""
    if isinstance(data, ChunkedLabels):
        data.close()


def add_labels(viewer, shape, **kwargs):
    """Add a Labels layer of uint32 zeros of ``shape``: chunked on disk for a stack over
    the threshold (:func:`~napari_mobilesam.chunked_labels.use_chunked`), else numpy.
    ``kwargs`` go to ``viewer.add_labels``."""
    layer = viewer.add_labels(new_labels(shape), **kwargs)
    if isinstance(layer.data, ChunkedLabels):
        layer.bind_key("m", new_label, overwrite=True)
    return layer


def new_label(layer) -> None:
    """napari's *new label* (M) for chunked labels: the largest id + 1 becomes the
    selected label (from the labels' record of each chunk's largest id)."""
    data = layer.data
    if not isinstance(data, ChunkedLabels):
        return
    label = int(np.max(data)) + 1
    if layer.selected_label == label:
        show_info("the selected label is not used yet: paint with it first")
        return
    layer.selected_label = label
