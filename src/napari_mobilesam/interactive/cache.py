"""Per-plane image embeddings: an in-memory LRU plus an optional folder on disk, and keys.

A key says which pixels went through which model with which settings; it never relies on
the identity (``id()``) of an array, which Python reuses. :func:`content_fingerprint`
identifies a plane by its pixels, :func:`model_fingerprint` a model by its weights.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch

from ..predictor import ImageEmbedding
from ..validation import check_int

__all__ = ["EmbeddingCache", "content_fingerprint", "model_fingerprint"]

_FILE_RE = re.compile(r"^emb-[0-9a-f]{40}\.pt$")
_FILE_FORMAT = 1


class EmbeddingCache:
    """Per-plane image embeddings: an in-memory LRU plus an optional folder on disk.

    Parameters
    ----------
    max_items : int
        How many embeddings to keep in memory (>= 1); the least recently used one
        is dropped first. An embedding is 256 x 64 x 64 float32 (4 MiB) for SAM
        models, held on the device it was computed on.
    folder : str or Path, optional
        Also keep every embedding in this folder (created when missing), one file
        ``emb-<sha1 of repr(key)>.pt`` each, written atomically. A new cache on the
        same folder finds them again.

    Notes
    -----
    Keys are hashable values whose ``repr`` is stable across runs, e.g. tuples like
    ``(layer_name, source_fingerprint, plane_index, contrast_limits)``. The key must
    identify the model as well as the data when a folder is shared between models
    (:class:`PromptSession` does this for you). All methods are thread-safe.
    """

    def __init__(self, max_items: int = 16, folder: str | os.PathLike | None = None):
        self.max_items = check_int(max_items, "max_items", minimum=1)
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            if self.folder.exists() and not self.folder.is_dir():
                raise ValueError(f"folder must be a directory, got the file {str(folder)!r}")
            self.folder.mkdir(parents=True, exist_ok=True)
        self._items: OrderedDict[Hashable, ImageEmbedding] = OrderedDict()
        self._lock = threading.RLock()

    # -- dict-like ----------------------------------------------------------------

    def get(self, key: Hashable) -> ImageEmbedding | None:
        """The embedding stored under ``key`` (memory first, then disk), or None.

        A disk hit is loaded on the CPU and promoted to memory.
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            embedding = self._load(key)
            if embedding is not None:
                self._remember(key, embedding)
            return embedding

    def put(self, key: Hashable, embedding: ImageEmbedding) -> None:
        """Store ``embedding`` under ``key`` in memory, and on disk when a folder is set."""
        if not isinstance(embedding, ImageEmbedding):
            raise TypeError(f"embedding must be an ImageEmbedding, got {type(embedding)}")
        hash(key)  # a TypeError naming the type for unhashable keys
        with self._lock:
            self._remember(key, embedding)
            if self.folder is not None:
                self._save(key, embedding)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items or (self.folder is not None and self.file_for(key).is_file())

    def __len__(self) -> int:
        """Number of embeddings held in memory."""
        with self._lock:
            return len(self._items)

    def keys(self) -> list[Hashable]:
        """Keys held in memory, least recently used first."""
        with self._lock:
            return list(self._items)

    def clear(self, memory_only: bool = False) -> None:
        """Forget every embedding; also delete the cache files unless ``memory_only``."""
        with self._lock:
            self._items.clear()
            if not memory_only and self.folder is not None:
                for path in self.folder.iterdir():
                    if _FILE_RE.match(path.name):
                        path.unlink(missing_ok=True)

    # -- internals ------------------------------------------------------------------

    def _remember(self, key, embedding) -> None:
        self._items[key] = embedding
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def file_for(self, key: Hashable) -> Path | None:
        """The file that holds ``key``'s embedding in :attr:`folder` (None without a folder).

        ``emb-<sha1 of repr(key)>.pt``; the file records the full ``repr(key)``, so a
        file under another key's name is a miss, not a wrong embedding.
        """
        if self.folder is None:
            return None
        digest = hashlib.sha1(repr(key).encode("utf-8")).hexdigest()
        return self.folder / f"emb-{digest}.pt"

    def _save(self, key, embedding: ImageEmbedding) -> None:
        record = {
            "format": _FILE_FORMAT,
            "key": repr(key),
            "features": embedding.features.detach().to("cpu").contiguous().clone(),
            "original_size": tuple(int(s) for s in embedding.original_size),
            "input_size": tuple(int(s) for s in embedding.input_size),
        }
        path = self.file_for(key)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-emb-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            Path(tmp).unlink(missing_ok=True)
            warnings.warn(
                f"could not write the embedding cache file {path}: {err}",
                RuntimeWarning,
                stacklevel=3,
            )
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, key) -> ImageEmbedding | None:
        if self.folder is None:
            return None
        path = self.file_for(key)
        if not path.is_file():
            return None
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
            if record.get("format") != _FILE_FORMAT or record.get("key") != repr(key):
                return None
            return ImageEmbedding(
                record["features"],
                tuple(int(s) for s in record["original_size"]),
                tuple(int(s) for s in record["input_size"]),
            )
        except Exception as err:  # a truncated or foreign file is a miss, not a crash
            from ..build import load_error_detail  # (torch's weights_only advice left out)

            warnings.warn(
                f"ignoring unreadable embedding cache file {path}: {load_error_detail(err)}",
                RuntimeWarning,
                stacklevel=3,
            )
            return None


def content_fingerprint(plane: np.ndarray) -> str:
    """A sha1 of a plane's dtype, shape and pixels: equal for equal pixels only.

    Parameters
    ----------
    plane : np.ndarray
        Any array; it is read whole.

    Returns
    -------
    str
        40 hex digits.
    """
    data = np.ascontiguousarray(plane)
    digest = hashlib.sha1(f"{data.dtype.str}{data.shape}".encode())
    digest.update(data.view(np.uint8).reshape(-1) if data.size else b"")
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights, so that caches never mix two models.

    A sha1 of the model's class name, its input size, and the first and last image
    encoder tensors.

    Returns
    -------
    str
        16 hex digits.
    """
    digest = hashlib.sha1(type(model).__name__.encode())
    digest.update(str(getattr(model, "img_size", "")).encode())
    state = model.state_dict()
    names = [n for n, t in state.items() if n.startswith("image_encoder.") and t.numel()]
    for name in (names[:1] + names[-1:]) if names else []:
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]
