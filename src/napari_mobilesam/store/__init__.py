"""Image embeddings on disk in a standard format (zarr), to compute once and carry.

``mobilesam embed`` (or :func:`open_for` + :func:`embed_planes`) fills an
:class:`EmbeddingStore` with an image's per-plane embeddings, resumably; a
:class:`~napari_mobilesam.interactive.PromptSession` given the store
(:func:`attach_store`, :class:`StoreCache`) loads those planes instead of running the
encoder, after checking that the store belongs to its model, image and normalisation.

- :mod:`.zarr_store`: :class:`EmbeddingStore`, the layout, per-plane checksums, errors;
- :mod:`.identity`: the model, image and normalisation records a store is checked by;
- :mod:`.embed`: checking a store against an image, computing the planes it lacks;
- :mod:`.cache`: :class:`StoreCache`, a session's cache that reads a store.
"""

from .cache import StoreCache, attach_store
from .embed import EmbedReport, check_store, describe, embed_planes, open_for
from .identity import image_fingerprint, model_identity, normalisation
from .zarr_store import (
    EmbeddingStore,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    StoreWriteError,
)

__all__ = [
    "EmbedReport",
    "EmbeddingStore",
    "StoreCache",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "StoreWriteError",
    "attach_store",
    "check_store",
    "describe",
    "embed_planes",
    "image_fingerprint",
    "model_identity",
    "normalisation",
    "open_for",
]
