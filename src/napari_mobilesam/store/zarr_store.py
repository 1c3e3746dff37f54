"""``EmbeddingStore``: per-plane image embeddings in a zarr group, resumable and checked.

Layout (zarr format 2, one chunk per plane and tile; ``P...`` are the image's plane
axes, ``T`` the tiles of a plane, ``C, h, w`` the embedding)::

    store.zarr/
      .zattrs        {"napari_mobilesam_embeddings": {format, version, model, image,
                      normalisation, tiles, embedding}}
      features       float32 (P..., T, C, h, w), uncompressed: the encoder's output
      geometry       int32   (P..., T, 4): original (H, W) and input (h, w) sizes, as
                     Predictor needs them to answer prompts
      source_sha1    uint8   (P..., 20): sha1 of each source plane's pixels
                     (:func:`~napari_mobilesam.interactive.content_fingerprint`); whole
                     planes (T = 1) only, zero for tiled planes
      tile_sha1      uint8   (P..., T, 20): sha1 of each tile's source pixels (the
                     plane's when T = 1)
      checksum       uint8   (P..., T, 32): sha256 of the tile's ``features`` bytes
                     (little-endian float32, C order); all zero = not done

A tile is *done* when its checksum is set, a plane when all its tiles are.
:meth:`EmbeddingStore.write` writes the features, the geometry and the source hashes
first and the checksum last, so a tile interrupted mid-write is not done, and a chunk
damaged later fails its checksum on :meth:`EmbeddingStore.read`. zarr writes each chunk
file to a temporary and renames it into place.

Tiles: ``tiles`` in the attributes is ``{"grid": [1, 1], "size": None, "overlap": 0}``
for whole planes (``T = 1``), or the :class:`~napari_mobilesam.interactive.tiles.TileGrid`
of large planes (``{"grid": [rows, cols], "size": 1024, "overlap": 256}``), tiles
numbered in C order over the grid.
"""

from __future__ import annotations

import errno
import hashlib
import threading
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..predictor import ImageEmbedding
from ..validation import check_int

__all__ = [
    "ATTRS_KEY",
    "FORMAT_VERSION",
    "EmbeddingStore",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "StoreWriteError",
]

#: The ``tiles`` record of a store of whole planes.
WHOLE_PLANES = {"grid": [1, 1], "size": None, "overlap": 0}

#: The key of the store's metadata in the zarr group's attributes.
ATTRS_KEY = "napari_mobilesam_embeddings"
#: Layout version; a store of another version is refused.
FORMAT_VERSION = 2
_FORMAT = "napari-mobilesam image embeddings"


class StoreError(Exception):
    """An embedding store cannot be used; the message names the store and the fix."""


class StoreMismatchError(StoreError, ValueError):
    """The store belongs to another model, image or normalisation (or is not a store)."""


class StoreCorruptError(StoreError):
    """A done plane's chunk is unreadable or fails its checksum.

    Attributes
    ----------
    index : tuple of int
        The plane.
    tile : int
        The tile (0 for whole planes).
    """

    def __init__(self, message: str, index: tuple[int, ...], tile: int = 0):
        super().__init__(message)
        self.index = index
        self.tile = tile


class StoreWriteError(StoreError):
    """Writing a plane failed (e.g. disk full); that plane is not marked done.

    Attributes
    ----------
    index : tuple of int
        The plane.
    errno : int or None
        The operating system's error number (``errno.ENOSPC`` for a full disk).
    """

    def __init__(self, message: str, index: tuple[int, ...], errno_: int | None):
        super().__init__(message)
        self.index = index
        self.errno = errno_


class EmbeddingStore:
    """Per-plane embeddings of one image or stack in a zarr group.

    Make one with :meth:`create` or :meth:`open`. Every method is thread-safe.

    Attributes
    ----------
    path : Path
    meta : dict
        The store's attributes: ``format``, ``version``, ``model``
        (:func:`~.identity.model_identity`), ``image``
        (:func:`~.identity.image_fingerprint`), ``normalisation``
        (:func:`~.identity.normalisation`), ``tiles`` (:data:`WHOLE_PLANES`, or a tile
        grid: see the module docstring) and ``embedding`` (``shape`` [C, h, w],
        ``dtype``, ``precision``).
    plane_shape : tuple of int
        Sizes of the image's plane axes (``()`` for one 2-D image).
    n_tiles : int
        Tiles per plane (1: whole planes).

    Notes
    -----
    Methods that take a ``tile`` default to 0, the whole plane of an untiled store.
    """

    def __init__(self, path: Path, group, writable: bool):
        self.path = Path(path)
        self._group = group
        self.writable = writable
        self.meta = dict(group.attrs[ATTRS_KEY])
        self.plane_shape = tuple(int(s) for s in self.meta["image"]["plane_shape"])
        names = ("features", "geometry", "source_sha1", "tile_sha1", "checksum")
        self._arrays = {name: group[name] for name in names}
        self.n_tiles = int(self._arrays["checksum"].shape[-2])
        self._lock = threading.RLock()
        self._by_sha1: dict[str, tuple[int, ...]] | None = None
        self._by_tile_sha1: dict[str, tuple[tuple[int, ...], int]] | None = None

    # -- making and opening -----------------------------------------------------------

    @classmethod
    def create(cls, path, meta: dict) -> EmbeddingStore:
        """A new, empty store at ``path`` (which must not exist), made atomically.

        Parameters
        ----------
        path : str or Path
            The store folder to create (``*.zarr`` by convention).
        meta : dict
            ``model``, ``image``, ``normalisation`` and ``embedding`` records, as
            :attr:`meta` describes; ``image.plane_shape`` and ``embedding.shape`` size
            the arrays; ``tiles`` (default :data:`WHOLE_PLANES`) gives the tiles per
            plane. ``format`` and ``version`` are filled in.

        Raises
        ------
        FileExistsError
            When ``path`` exists.
        """
        import zarr

        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists: open it with EmbeddingStore.open")
        meta = {
            "format": _FORMAT,
            "version": FORMAT_VERSION,
            "tiles": dict(WHOLE_PLANES),
            **meta,
        }
        planes = tuple(int(s) for s in meta["image"]["plane_shape"])
        n_tiles = int(np.prod(meta["tiles"]["grid"]))
        emb = tuple(int(s) for s in meta["embedding"]["shape"])
        one = (1,) * len(planes)
        with atomic_path(path, is_dir=True) as tmp:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
            specs = {
                "features": ((*planes, n_tiles, *emb), (*one, 1, *emb), "<f4"),
                "geometry": ((*planes, n_tiles, 4), (*one, 1, 4), "<i4"),
                "source_sha1": ((*planes, 20), (*one, 20), "u1"),
                "tile_sha1": ((*planes, n_tiles, 20), (*one, 1, 20), "u1"),
                "checksum": ((*planes, n_tiles, 32), (*one, 1, 32), "u1"),
            }
            for name, (shape, chunks, dtype) in specs.items():
                group.create_array(
                    name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, compressors=None
                )
            group.attrs[ATTRS_KEY] = meta
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path, mode: str = "r") -> EmbeddingStore:
        """Open an existing store.

        Parameters
        ----------
        path : str or Path
        mode : {"r", "r+"}
            Read only, or also write planes.

        Raises
        ------
        FileNotFoundError
            When ``path`` does not exist.
        StoreMismatchError
            When ``path`` is not an embedding store of this version.
        """
        import zarr

        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no embedding store at {path}")
        try:
            group = zarr.open_group(str(path), mode=mode)
            meta = group.attrs[ATTRS_KEY]
        except Exception:
            raise StoreMismatchError(
                f"{path} is not an embedding store (no {ATTRS_KEY!r} attributes): choose "
                "another path, or make one with `mobilesam embed`"
            ) from None
        if meta.get("format") != _FORMAT or meta.get("version") != FORMAT_VERSION:
            raise StoreMismatchError(
                f"{path} is an embedding store of version {meta.get('version')!r}; this "
                f"napari-mobilesam reads version {FORMAT_VERSION}: make it again with "
                "`mobilesam embed`"
            )
        return cls(path, group, writable=mode == "r+")

    # -- planes ------------------------------------------------------------------------

    def check_index(self, index) -> tuple[int, ...]:
        """``index`` as a tuple of ints within :attr:`plane_shape`."""
        if isinstance(index, (int, np.integer)):
            index = (index,)
        idx = tuple(check_int(i, "index") for i in index)
        if len(idx) != len(self.plane_shape) or any(
            not 0 <= i < n for i, n in zip(idx, self.plane_shape, strict=True)
        ):
            raise ValueError(f"index {index!r} is not a plane of {self.plane_shape} in {self.path}")
        return idx

    def check_tile(self, tile) -> int:
        """``tile`` as an int below :attr:`n_tiles`."""
        tile = check_int(tile, "tile", minimum=0)
        if tile >= self.n_tiles:
            raise ValueError(f"tile {tile} is not one of the {self.n_tiles} tiles of {self.path}")
        return tile

    def chunk_name(self, index, tile: int = 0) -> str:
        """The file of a tile's features, relative to the store (for messages)."""
        idx, tile = self.check_index(index), self.check_tile(tile)
        n_dims = len(self._arrays["features"].shape) - len(idx) - 1
        return "features/" + ".".join(str(i) for i in (*idx, tile, *([0] * n_dims)))

    def is_tile_done(self, index, tile: int) -> bool:
        """Whether tile ``tile`` of plane ``index`` has been written completely."""
        idx, tile = self.check_index(index), self.check_tile(tile)
        with self._lock:
            try:
                return bool(np.asarray(self._arrays["checksum"][(*idx, tile)]).any())
            except Exception:  # an unreadable marker: not done
                return False

    def is_done(self, index) -> bool:
        """Whether plane ``index`` has been written completely."""
        idx = self.check_index(index)
        with self._lock:
            try:
                return bool(np.asarray(self._arrays["checksum"][idx]).any(axis=-1).all())
            except Exception:  # an unreadable marker: not done
                return False

    def done(self) -> list[tuple[int, ...]]:
        """The done planes, in C order."""
        with self._lock:
            try:
                sums = np.asarray(self._arrays["checksum"][...])
            except Exception:  # an unreadable marker: ask plane by plane
                return [idx for idx in np.ndindex(*self.plane_shape) if self.is_done(idx)]
        marked = sums.any(axis=-1).all(axis=-1)  # (P...): every tile has a checksum
        return [idx for idx in np.ndindex(*self.plane_shape) if marked[idx]]

    def source_sha1(self, index) -> str | None:
        """The sha1 of plane ``index``'s source pixels, or None when it is not done (or
        the store is tiled)."""
        idx = self.check_index(index)
        if self.n_tiles > 1 or not self.is_done(idx):
            return None
        with self._lock:
            return bytes(np.asarray(self._arrays["source_sha1"][idx], dtype=np.uint8)).hex()

    def find(self, sha1: str) -> tuple[int, ...] | None:
        """The done plane whose source pixels have this sha1, or None (always for a
        tiled store: see :meth:`find_tile`)."""
        if self.n_tiles > 1:
            return None
        with self._lock:
            if self._by_sha1 is None:
                digests = np.asarray(self._arrays["source_sha1"][...], dtype=np.uint8)
                self._by_sha1 = {}
                for idx in self.done():
                    self._by_sha1.setdefault(bytes(digests[idx]).hex(), idx)
            return self._by_sha1.get(sha1)

    def find_tile(self, sha1: str) -> tuple[tuple[int, ...], int] | None:
        """The done (plane, tile) whose source pixels have this sha1, or None."""
        with self._lock:
            if self._by_tile_sha1 is None:
                digests = np.asarray(self._arrays["tile_sha1"][...], dtype=np.uint8)
                sums = np.asarray(self._arrays["checksum"][...]).any(axis=-1)
                self._by_tile_sha1 = {}
                for idx in np.ndindex(*self.plane_shape):
                    for tile in np.flatnonzero(sums[idx]):
                        key = bytes(digests[(*idx, tile)]).hex()
                        self._by_tile_sha1.setdefault(key, (idx, int(tile)))
            return self._by_tile_sha1.get(sha1)

    def read(self, index, tile: int = 0) -> ImageEmbedding:
        """A tile's (the plane's, untiled) embedding, its checksum verified.

        Returns
        -------
        ImageEmbedding
            Features (1, C, h, w) float32 on the CPU, with the original (the tile's) and
            input sizes.

        Raises
        ------
        KeyError
            When the tile is not done.
        StoreCorruptError
            When its chunk cannot be read or its bytes fail the checksum.
        """
        idx, tile = self.check_index(index), self.check_tile(tile)
        if not self.is_tile_done(idx, tile):
            what = f"tile {tile} of plane {idx}" if self.n_tiles > 1 else f"plane {idx}"
            raise KeyError(f"{what} of {self.path} is not done")
        chunk = self.chunk_name(idx, tile)
        at = (*idx, tile)
        with self._lock:
            try:
                features = np.asarray(self._arrays["features"][at], dtype="<f4")[None]
                geometry = np.asarray(self._arrays["geometry"][at])
                expected = bytes(np.asarray(self._arrays["checksum"][at], dtype=np.uint8))
            except Exception as err:
                raise StoreCorruptError(
                    f"{self.path}: the chunk {chunk} of plane {idx} cannot be read ({err}); "
                    "rerun `mobilesam embed` to recompute it",
                    idx,
                    tile,
                ) from err
        if hashlib.sha256(features.tobytes()).digest() != expected:
            raise StoreCorruptError(
                f"{self.path}: the chunk {chunk} of plane {idx} fails its sha256 checksum "
                "(damaged or truncated); rerun `mobilesam embed` to recompute it",
                idx,
                tile,
            )
        h, w, ih, iw = (int(v) for v in geometry)
        return ImageEmbedding(torch.from_numpy(features.copy()), (h, w), (ih, iw))

    def write(self, index, embedding: ImageEmbedding, source_sha1: str, tile: int = 0) -> None:
        """Store a tile's (the plane's, untiled) embedding and mark it done (the marker
        written last).

        Parameters
        ----------
        index : tuple of int
        embedding : ImageEmbedding
            Features (1, C, h, w), any device.
        source_sha1 : str
            40 hex digits: :func:`~napari_mobilesam.interactive.content_fingerprint` of
            the tile's (the plane's) pixels.
        tile : int
            The tile, for a tiled store.

        Raises
        ------
        StoreWriteError
            When the disk refuses the write (full, read-only, ...): the plane is left
            not done, and a later run writes it again.
        """
        idx, tile = self.check_index(index), self.check_tile(tile)
        if not self.writable:
            raise StoreError(f"{self.path} is open read-only: open it with mode='r+'")
        features = embedding.features.detach().to("cpu", torch.float32).numpy()
        features = np.ascontiguousarray(features[0], dtype="<f4")
        geometry = np.array([*embedding.original_size, *embedding.input_size], dtype="<i4")
        digest = np.frombuffer(hashlib.sha256(features.tobytes()).digest(), dtype=np.uint8)
        sha1 = np.frombuffer(bytes.fromhex(source_sha1), dtype=np.uint8)
        at = (*idx, tile)
        with self._lock:
            try:
                self._arrays["checksum"][at] = 0  # not done while its data changes
                self._arrays["features"][at] = features
                self._arrays["geometry"][at] = geometry
                self._arrays["tile_sha1"][at] = sha1
                if self.n_tiles == 1:
                    self._arrays["source_sha1"][idx] = sha1
                self._arrays["checksum"][at] = digest
            except OSError as err:
                what = "the disk is full" if err.errno == errno.ENOSPC else str(err)
                where = f"tile {tile} of plane {idx}" if self.n_tiles > 1 else f"plane {idx}"
                raise StoreWriteError(
                    f"could not write {where} to {self.path}: {what}; it is not marked "
                    "done: free space (or fix the folder) and run again to resume",
                    idx,
                    err.errno,
                ) from err
            self._by_sha1 = self._by_tile_sha1 = None

    def discard(self, index, tile: int | None = None) -> None:
        """Mark plane ``index`` (or one of its tiles) not done (to write it again)."""
        idx = self.check_index(index)
        at = idx if tile is None else (*idx, self.check_tile(tile))
        with self._lock:
            self._arrays["checksum"][at] = 0
            self._by_sha1 = self._by_tile_sha1 = None

    def verify(self) -> list[StoreCorruptError]:
        """Read every done tile and check it; the errors of the damaged ones (each
        error's ``index`` is the plane, ``tile`` the tile)."""
        errors = []
        for idx in np.ndindex(*self.plane_shape):
            for tile in range(self.n_tiles):
                if not self.is_tile_done(idx, tile):
                    continue
                try:
                    self.read(idx, tile)
                except StoreCorruptError as err:
                    errors.append(err)
        return errors

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r}, planes={self.plane_shape})"
