"""Fill an embedding store from an image, resumably; check a store against an image.

:func:`describe` says what a store for (image, model, normalisation) must hold,
:func:`check_store` compares a store with it, :func:`open_for` opens (or creates) the
store for an image, and :func:`embed_planes` computes the planes it lacks, normalising
each plane with :func:`~napari_mobilesam.normalize.to_rgb_uint8` and the image's
:meth:`~napari_mobilesam.interactive.ImagePlanes.normalize_kwargs`, exactly as
:class:`~napari_mobilesam.interactive.PromptSession` does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..interactive.cache import content_fingerprint
from ..interactive.planes import ImagePlanes
from ..interactive.tiled import plane_limits
from ..interactive.tiles import TileGrid
from ..normalize import to_rgb_uint8
from ..validation import check_int
from .identity import (
    DEFAULT_PERCENTILES,
    differences,
    image_fingerprint,
    model_differences,
    model_identity,
    normalisation,
)
from .zarr_store import WHOLE_PLANES, EmbeddingStore, StoreMismatchError

__all__ = ["EmbedReport", "check_store", "describe", "embed_planes", "open_for", "store_grid"]

_IMAGE_FIELDS = ("plane_shape", "shape_hw", "channels", "dtype", "sample_sha256")


def tiles_record(grid: TileGrid | None) -> dict:
    """The ``tiles`` record of a store: whole planes (None), or the tile grid's."""
    if grid is None:
        return dict(WHOLE_PLANES)
    return {"grid": list(grid.grid_shape), "size": grid.tile_size, "overlap": grid.overlap}


def store_grid(store: EmbeddingStore) -> TileGrid | None:
    """The tile grid of a tiled store (None: whole planes)."""
    tiles = store.meta.get("tiles", WHOLE_PLANES)
    if tiles.get("size") is None:
        return None
    shape_hw = tuple(int(v) for v in store.meta["image"]["shape_hw"])
    return TileGrid(shape_hw, int(tiles["size"]), int(tiles["overlap"]))


def describe(
    planes: ImagePlanes,
    model,
    percentiles=DEFAULT_PERCENTILES,
    tiles: TileGrid | None = None,
    max_upscale: float | None = None,
) -> dict:
    """The ``model``, ``image``, ``normalisation`` and ``tiles`` records of a store for
    these planes, whole (``tiles`` None) or cut into tiles, shown to the model with the
    upscale limit ``max_upscale`` (``Predictor(max_upscale=)``)."""
    return {
        "model": model_identity(model),
        "image": image_fingerprint(planes),
        "normalisation": normalisation(planes, percentiles, max_upscale),
        "tiles": tiles_record(tiles),
    }


def check_store(store: EmbeddingStore, expected: dict) -> None:
    """Raise unless ``store`` holds embeddings of the image and model of ``expected``.

    Parameters
    ----------
    store : EmbeddingStore
    expected : dict
        :func:`describe` of the image, model and normalisation at hand.

    Raises
    ------
    StoreMismatchError
        Naming the store and every difference (model, image, normalisation).
    """
    meta = store.meta
    found = [f"{d} (model)" for d in model_differences(meta["model"], expected["model"])]
    found += [f"{d} (image)" for d in differences(meta["image"], expected["image"], _IMAGE_FIELDS)]
    norm_fields = ("channels", "contrast_limits", "percentiles", "max_upscale")
    found += [
        f"{d} (normalisation)"
        for d in differences(meta["normalisation"], expected["normalisation"], norm_fields)
    ]
    stored_tiles = meta.get("tiles", WHOLE_PLANES)
    wanted_tiles = expected.get("tiles", WHOLE_PLANES)
    if stored_tiles != wanted_tiles:
        found.append(f"{_tiles_text(stored_tiles)} != {_tiles_text(wanted_tiles)} (tiles)")
    if found:
        raise StoreMismatchError(
            f"the embedding store {store.path} was made for another "
            f"{'/'.join(sorted({f.rsplit('(', 1)[1][:-1] for f in found}))}: "
            f"{'; '.join(found)} (store != this). Embed this image into a new store with "
            "`mobilesam embed`, using the same model and normalisation"
            + (f"{_TILES_HINT}" if found[-1].endswith("(tiles)") else "")
        )


_TILES_HINT = (
    " (tiles: `--tile-threshold 0` embeds whole planes, as segment-everything needs; the "
    "prompt widget tiles planes longer than 2048 px with 1024 px tiles, overlap 256)"
)


def _tiles_text(record: dict) -> str:
    if record.get("size") is None:
        return "whole planes"
    rows, cols = record["grid"]
    return f"{rows}x{cols} tiles of {record['size']} px, overlap {record['overlap']}"


def open_for(path, planes: ImagePlanes, predictor, percentiles=DEFAULT_PERCENTILES, tiles=None):
    """The store at ``path`` for these planes and this predictor's model, created if new.

    ``tiles`` (a :class:`~napari_mobilesam.interactive.tiles.TileGrid`) makes a store of
    tile embeddings, as a :class:`~napari_mobilesam.interactive.PromptSession` with that
    grid embeds large planes; None, whole planes.

    Returns
    -------
    EmbeddingStore
        Open for writing.

    Raises
    ------
    StoreMismatchError
        When ``path`` holds a store of another model, image or normalisation, or is not a
        store (it is never overwritten).
    """
    if tiles is not None and not isinstance(tiles, TileGrid):
        raise TypeError(f"tiles must be a TileGrid or None, got {type(tiles)}")
    if tiles is not None and tuple(tiles.shape_hw) != tuple(planes.shape_hw):
        raise ValueError(
            f"tiles cover planes of {tiles.shape_hw}, but the image's planes are {planes.shape_hw}"
        )
    expected = describe(
        planes, predictor.model, percentiles, tiles, predictor.engine.frames.max_upscale
    )
    path = Path(path)
    if not path.exists():
        embedding = {
            "shape": expected["model"]["embedding_shape"],
            "dtype": "<f4",
            "precision": predictor.precision,
        }
        return EmbeddingStore.create(path, {**expected, "embedding": embedding})
    store = EmbeddingStore.open(path, mode="r+")
    check_store(store, expected)
    return store


@dataclass
class EmbedReport:
    """What :func:`embed_planes` did.

    Attributes
    ----------
    computed : int
        Planes (tiles, in a tiled store) run through the encoder.
    skipped : int
        Planes (tiles) already done (not recomputed).
    damaged : list of tuple of int
        Done planes with a chunk that failed its check; it was recomputed.
    """

    computed: int = 0
    skipped: int = 0
    damaged: list = field(default_factory=list)


def embed_planes(
    store: EmbeddingStore,
    planes: ImagePlanes,
    predictor,
    *,
    percentiles=DEFAULT_PERCENTILES,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EmbedReport:
    """Compute and store every plane the store lacks; damaged planes are recomputed.

    Parameters
    ----------
    store : EmbeddingStore
        Open for writing, checked against the image (:func:`open_for`).
    planes : ImagePlanes
        The image, its channels and contrast limits.
    predictor : Predictor
        Runs the encoder (:meth:`Predictor.embed_images`; its current image is untouched).
    percentiles : (float, float)
        Contrast limits from these percentiles of each plane when ``planes`` has none.
    batch_size : int, optional
        Planes per encoder call: default 8 on a GPU, 1 on a CPU.
    progress : callable(n), optional
        Called with the number of planes (tiles, in a tiled store) finished or skipped
        after each batch.
    should_stop : callable() -> bool, optional
        Checked before each batch; True stops early (the finished planes stay done).

    Returns
    -------
    EmbedReport

    Raises
    ------
    StoreWriteError
        When a plane cannot be written (the planes before it stay done).

    Notes
    -----
    In a tiled store (:func:`store_grid`), every tile of a plane is normalised with the
    plane's limits (:func:`~napari_mobilesam.interactive.tiled.plane_limits`), as a
    tiled session does, and the work and ``progress`` go tile by tile.
    """
    if batch_size is None:
        batch_size = 1 if predictor.device.type == "cpu" else 8
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    report = EmbedReport()
    for err in store.verify():
        warnings.warn(f"{err} (recomputing it now)", RuntimeWarning, stacklevel=2)
        store.discard(err.index, err.tile)
        report.damaged.append(err.index)
    grid = store_grid(store)
    if grid is not None:
        _embed_tiles(store, planes, predictor, grid, percentiles, batch_size, progress,
                     should_stop, report)  # fmt: skip
        return report
    done = set(store.done())
    todo = [idx for idx in planes.indices() if idx not in done]
    report.skipped = len(done)
    if progress is not None and done:
        progress(len(done))
    kwargs = planes.normalize_kwargs()
    for start in range(0, len(todo), batch_size):
        if should_stop is not None and should_stop():
            break
        batch = todo[start : start + batch_size]
        pixels = [planes.plane(idx) for idx in batch]
        rgbs = [to_rgb_uint8(p, percentiles=percentiles, **kwargs) for p in pixels]
        embeddings = predictor.embed_images(rgbs, batch_size=len(rgbs))
        for idx, plane, embedding in zip(batch, pixels, embeddings, strict=True):
            store.write(idx, embedding, content_fingerprint(plane))
            report.computed += 1
        if progress is not None:
            progress(len(batch))
    return report


def _embed_tiles(store, planes, predictor, grid, percentiles, batch_size, progress, stop, report):
    """:func:`embed_planes` for a tiled store."""
    todo = []
    for idx in planes.indices():
        for tile in range(len(grid)):
            if store.is_tile_done(idx, tile):
                report.skipped += 1
            else:
                todo.append((idx, tile))
    if progress is not None and report.skipped:
        progress(report.skipped)
    kwargs = planes.normalize_kwargs()
    limits: dict = {}
    for start in range(0, len(todo), batch_size):
        if stop is not None and stop():
            break
        batch = todo[start : start + batch_size]
        pixels = [planes.window(idx, grid.window(tile)) for idx, tile in batch]
        rgbs = []
        for (idx, _), tile_pixels in zip(batch, pixels, strict=True):
            if idx not in limits:
                limits[idx] = plane_limits(planes, idx, percentiles)
            rgbs.append(to_rgb_uint8(tile_pixels, **{**kwargs, "contrast_limits": limits[idx]}))
        embeddings = predictor.embed_images(rgbs, batch_size=len(rgbs))
        for (idx, tile), tile_pixels, embedding in zip(batch, pixels, embeddings, strict=True):
            store.write(idx, embedding, content_fingerprint(tile_pixels), tile=tile)
            report.computed += 1
        if progress is not None:
            progress(len(batch))
