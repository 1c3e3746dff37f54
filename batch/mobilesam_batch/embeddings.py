"""``--embeddings STORE``: segment-everything on the embeddings of a store.

A store made by ``mobilesam embed`` holds each plane's whole-image embedding: exactly
what segment-everything computes for its first crop (the whole plane). Given one,
``mobilesam-everything`` checks it against the input before any plane is segmented
(:func:`check_embeddings`: the model, the image's fingerprint and the normalisation the
run uses, as :func:`napari_mobilesam.store.check_store` compares them) and then reads a
plane's embedding from the store instead of running the encoder
(:func:`plane_embedding`) when the store has that plane, made from the same pixels.
Planes the store lacks (or holds damaged) are embedded as usual.

Both commands read an input the same way: :class:`PlaneArray` shows an opened input
to :class:`~napari_mobilesam.interactive.ImagePlanes`, so the image fingerprint and the
normalisation of ``mobilesam embed INPUT`` and ``mobilesam-everything INPUT`` agree.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PlaneArray", "check_embeddings", "plane_embedding", "source_planes"]


class PlaneArray:
    """An opened input in napari's layout, ``(P..., [C,] H, W)``, read one plane at a
    time (what :class:`~napari_mobilesam.interactive.ImagePlanes` indexes).

    Parameters
    ----------
    source : ImageSource
        From :func:`~mobilesam_batch.inputs.open_source`.
    """

    def __init__(self, source):
        self.source = source
        self.dtype = source.dtype
        channels = () if source.channel_axis is None else (source.n_channels,)
        self.shape = (*source.plane_shape, *channels, source.height, source.width)
        self.channel_axis = None if not channels else len(source.plane_shape)

    def __getitem__(self, key):
        n = len(self.source.plane_shape)
        plane = self.source.read_plane(tuple(key[:n]))
        if self.channel_axis is not None:
            plane = np.moveaxis(plane, -1, 0)
        return plane[tuple(key[n:])]


def source_planes(source, channels=None, contrast_limits=None):
    """The planes of an opened input with the normalisation settings of a run.

    Parameters
    ----------
    source : ImageSource
    channels : tuple of int, optional
        ``--channels``.
    contrast_limits : (float, float), optional
        ``--contrast-limits``.

    Returns
    -------
    ImagePlanes
    """
    from napari_mobilesam.interactive import ImagePlanes

    data = PlaneArray(source)
    return ImagePlanes(
        data, channel_axis=data.channel_axis, channels=channels, contrast_limits=contrast_limits
    )


def check_embeddings(path, source, options, model) -> dict[str, Any]:
    """Check that the store at ``path`` belongs to this input, model and normalisation.

    Parameters
    ----------
    path : str or Path
        The embedding store (``--embeddings``).
    source : ImageSource
        The opened input.
    options : SegmentOptions
        The run's channels, contrast limits and percentiles.
    model : Sam
        The run's model.

    Returns
    -------
    dict
        For the provenance record: ``path`` (absolute), ``model``, ``image``
        (``sample_sha256``, ``plane_shape``, ``shape_hw``, ``dtype``) and
        ``normalisation`` as the store records them (and the run matched), the store's
        ``precision`` and ``planes_done``.

    Raises
    ------
    FileNotFoundError
        When there is no store at ``path``.
    StoreMismatchError
        When ``path`` is not a store, holds tiles instead of whole planes, or belongs to
        another model, image or normalisation; the message names the store and every
        difference.
    """
    from napari_mobilesam.store import EmbeddingStore, StoreMismatchError, check_store, describe

    store = EmbeddingStore.open(path, mode="r")
    grid = list(store.meta.get("tiles", {}).get("grid", [1, 1]))
    if grid != [1, 1]:
        raise StoreMismatchError(
            f"the embedding store {path} holds tiles ({grid[0]} x {grid[1]} per plane, as the "
            "prompt widget embeds large planes); mobilesam-everything reads one embedding per "
            "plane: embed INPUT again without tiles (`mobilesam embed --tile-threshold 0`)"
        )
    planes = source_planes(source, options.channels, options.contrast_limits)
    check_store(
        store, describe(planes, model, options.percentiles, max_upscale=options.max_upscale)
    )
    meta = store.meta
    image = {k: meta["image"][k] for k in ("sample_sha256", "plane_shape", "shape_hw", "dtype")}
    return {
        "path": str(Path(path).resolve()),
        "model": {k: meta["model"].get(k) for k in ("name", "checkpoint_sha256")},
        "image": image,
        "normalisation": meta["normalisation"],
        "precision": meta.get("embedding", {}).get("precision"),
        "planes_done": len(store.done()),
    }


_OPEN: dict[str, Any] = {}


def plane_embedding(
    path: str, index: tuple[int, ...], plane: np.ndarray, input_size: tuple[int, int] | None = None
):
    """The store's embedding of plane ``index``, if it was made from these pixels.

    The store is opened once per process (read-only). A plane the store lacks, whose
    source hash differs from ``plane``'s, or whose chunk is damaged (a warning naming
    it) gives None: the caller embeds the plane itself.

    Parameters
    ----------
    path : str
        The store, checked before with :func:`check_embeddings`.
    index : tuple of int
        The plane's position in the input's plane axes.
    plane : np.ndarray
        The plane's pixels as read from the input ((H, W) or (H, W, C)).
    input_size : (int, int), optional
        The (h, w) this run shows the plane at in the model's input (smaller than the
        input with ``--max-upscale``); a stored embedding made at another size raises.

    Returns
    -------
    ImageEmbedding or None

    Raises
    ------
    StoreMismatchError
        When the plane's embedding was made at another input size than ``input_size``.
    """
    from napari_mobilesam.interactive.cache import content_fingerprint
    from napari_mobilesam.store import EmbeddingStore, StoreCorruptError

    store = _OPEN.get(path)
    if store is None:
        _OPEN.clear()  # one store per run
        store = _OPEN[path] = EmbeddingStore.open(path, mode="r")
    sha1 = store.source_sha1(index)
    if sha1 is None or sha1 != content_fingerprint(plane):
        return None
    try:
        embedding = store.read(index)
    except StoreCorruptError as err:
        warnings.warn(f"{err}; embedding the plane instead", RuntimeWarning, stacklevel=2)
        return None
    if input_size is not None and tuple(embedding.input_size) != tuple(input_size):
        from napari_mobilesam.store import StoreMismatchError

        raise StoreMismatchError(
            f"the embedding store {path} shows plane {index} to the model at "
            f"{embedding.input_size[1]}x{embedding.input_size[0]} px, this run at "
            f"{input_size[1]}x{input_size[0]} px: embed the input again with this run's "
            "--max-upscale (`mobilesam embed --max-upscale X`), or run with the store's"
        )
    return embedding
