"""``StoreCache``: a PromptSession's embedding cache that also reads an embedding store.

Planes found in the store are loaded instead of computed. The store is checked once,
when the cache is made, against the session's model (name and checkpoint sha256), image
(:func:`~.identity.image_fingerprint`) and normalisation; a mismatch raises
:class:`~.zarr_store.StoreMismatchError` naming the store and what differs.

Use :func:`attach_store` on a session, or give ``StoreCache(...)`` as a session's
``cache``.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Hashable

from ..interactive.cache import EmbeddingCache, model_fingerprint
from ..interactive.planes import ImagePlanes
from ..predictor import ImageEmbedding
from .embed import check_store, describe, store_grid
from .zarr_store import EmbeddingStore, StoreCorruptError

__all__ = ["StoreCache", "attach_store"]


class StoreCache(EmbeddingCache):
    """An :class:`EmbeddingCache` that also finds planes in an :class:`EmbeddingStore`.

    Parameters
    ----------
    store : EmbeddingStore or path
        The store (a path is opened read-only).
    planes : ImagePlanes
        The session's image (``session.planes``).
    model : Sam
        The session's model (``session.predictor.model``).
    tiles : TileGrid, optional
        The session's tile grid (``session.tiles``) when it tiles its planes: the store
        must hold the same tiles.
    max_items, folder
        As for :class:`EmbeddingCache` (what the session computes goes there, never
        into the store).
    max_upscale : float, optional
        The session's predictor's upscale limit (``Predictor(max_upscale=)``): the store
        must have been made with the same.

    Raises
    ------
    StoreMismatchError
        When the store belongs to another model, image or normalisation.

    Notes
    -----
    A session's cache key names a plane either by the sha1 of its pixels (looked up
    among the store's per-plane source hashes, so only identical pixels match) or, with
    the session's ``cache_key``, by its plane index. Keys with other normalisation
    settings or another model are never answered from the store. A damaged chunk is a
    warning that names it, and a miss: the session computes that plane.
    :attr:`loads` counts the planes (tiles) read from the store.
    """

    def __init__(
        self,
        store: EmbeddingStore | str | os.PathLike,
        planes: ImagePlanes,
        model,
        *,
        tiles=None,
        max_items: int = 16,
        folder: str | os.PathLike | None = None,
        max_upscale: float | None = None,
    ):
        super().__init__(max_items=max_items, folder=folder)
        if not isinstance(store, EmbeddingStore):
            store = EmbeddingStore.open(store, mode="r")
        if not isinstance(planes, ImagePlanes):
            raise TypeError(f"planes must be an ImagePlanes, got {type(planes)}")
        check_store(store, describe(planes, model, tiles=tiles, max_upscale=max_upscale))
        self.store = store
        grid = store_grid(store)
        self._tile_of_window = {} if grid is None else {w: t for t, w in enumerate(grid.windows())}
        self._tail = (*planes.settings(), model_fingerprint(model), max_upscale)
        self._n_axes = len(planes.plane_shape)
        self._count_lock = threading.Lock()
        #: planes (tiles, of a tiled store) read from the store so far
        self.loads = 0

    def _plane_of(self, key: Hashable) -> tuple[int, ...] | None:
        """The store's plane for a session key, or None (not this session's kind of key)."""
        n = len(self._tail)
        if not isinstance(key, tuple) or len(key) != 2 + n or key[2:] != self._tail:
            return None
        name, ident = key[0], key[1]
        if name == "sha1" and isinstance(ident, str):
            return self.store.find(ident)
        if isinstance(ident, tuple) and len(ident) == self._n_axes:
            try:
                idx = self.store.check_index(ident)
            except (TypeError, ValueError):
                return None
            return idx if self.store.is_done(idx) else None
        return None

    def _tile_of(self, key: Hashable) -> tuple[tuple[int, ...], int] | None:
        """The store's (plane, tile) for a session's tile key, or None."""
        n = len(self._tail)
        if not isinstance(key, tuple) or len(key) != 4 + n or key[0] != "tile":
            return None
        if key[4:] != self._tail or key[2] not in self._tile_of_window:
            return None
        ident, tile = key[1], self._tile_of_window[key[2]]
        if isinstance(ident, tuple) and len(ident) == 2 and ident[0] == "sha1":
            found = self.store.find_tile(ident[1])
            return found if found is not None and found[1] == tile else None
        if isinstance(ident, tuple) and len(ident) == 2 and isinstance(ident[1], tuple):
            try:
                idx = self.store.check_index(ident[1])
            except (TypeError, ValueError):
                return None
            return (idx, tile) if self.store.is_tile_done(idx, tile) else None
        return None

    def _where(self, key: Hashable) -> tuple[tuple[int, ...], int] | None:
        """The store's (plane, tile) that answers ``key``, or None."""
        if self._tile_of_window:
            return self._tile_of(key)
        idx = self._plane_of(key)
        return None if idx is None else (idx, 0)

    def get(self, key: Hashable) -> ImageEmbedding | None:
        """The embedding of ``key``: memory, then the folder, then the store."""
        with self._lock:
            embedding = super().get(key)
            if embedding is not None:
                return embedding
            where = self._where(key)
            if where is None:
                return None
            try:
                embedding = self.store.read(*where)
            except StoreCorruptError as err:
                warnings.warn(f"{err}; computing the plane instead", RuntimeWarning, stacklevel=2)
                return None
            self._remember(key, embedding)
        with self._count_lock:
            self.loads += 1
        return embedding

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return super().__contains__(key) or self._where(key) is not None


def attach_store(session, store) -> StoreCache:
    """Make ``session`` load its planes from ``store`` where it has them.

    Replaces ``session.cache`` by a :class:`StoreCache` with the same size and folder
    (embeddings held in the old cache's memory are dropped; its folder is kept).

    Parameters
    ----------
    session : PromptSession
    store : EmbeddingStore or path

    Returns
    -------
    StoreCache
        The session's new cache.

    Raises
    ------
    StoreMismatchError
        When the store belongs to another model, image or normalisation.
    """
    old = session.cache
    cache = StoreCache(
        store, session.planes, session.predictor.model, tiles=session.tiles,
        max_items=old.max_items, folder=old.folder,
        max_upscale=session.predictor.engine.frames.max_upscale,
    )  # fmt: skip
    session.cache = cache
    return cache
