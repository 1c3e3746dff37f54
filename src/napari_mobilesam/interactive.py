"""Interactive segmentation of image stacks, without any GUI.

The napari prompt widget stays thin: it turns layers into calls on this module
and runs the slow ones (:meth:`PromptSession.embed`, :meth:`PromptSession.precompute`,
:meth:`PromptSession.propagate`) in a thread worker.

- :class:`EmbeddingCache` keeps per-plane image embeddings (an in-memory LRU and an
  optional folder on disk), so going back to a plane does not run the encoder again.
- :class:`PromptSession` holds the state of one image (a 2-D image or a stack of
  planes): which plane the predictor is on, prompts -> :class:`Prediction`,
  committing masks into a label image with undo, and propagating a mask through
  neighbouring planes.

Coordinates here are napari's: points are (row, col) = (y, x) pixels of the plane,
boxes are two opposite corners (r0, c0, r1, c1). They are converted to SAM's (x, y)
with :mod:`napari_mobilesam.transforms` only.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
import re
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import normalize
from .predictor import ImageEmbedding, Predictor
from .transforms import corners_rc_to_xyxy, rc_to_xy

__all__ = ["EmbeddingCache", "Prediction", "PromptSession"]

_FILE_RE = re.compile(r"^emb-[0-9a-f]{40}\.pt$")
_FILE_FORMAT = 1


# --------------------------------------------------------------------------- cache


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
        if isinstance(max_items, bool):
            raise TypeError(f"max_items must be an int, got {max_items!r}")
        try:
            max_items = operator.index(max_items)
        except TypeError:
            raise TypeError(f"max_items must be an int, got {max_items!r}") from None
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.max_items = max_items
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
            return key in self._items or (self.folder is not None and self._path(key).is_file())

    def __len__(self) -> int:
        """Number of embeddings held in memory."""
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

    def _path(self, key) -> Path:
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
        path = self._path(key)
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
        path = self._path(key)
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
            warnings.warn(
                f"ignoring unreadable embedding cache file {path}: {err}",
                RuntimeWarning,
                stacklevel=3,
            )
            return None


# --------------------------------------------------------------------------- session


@dataclass
class Prediction:
    """Candidate masks for one prompt and the one chosen.

    Attributes
    ----------
    masks : np.ndarray
        (K, H, W) bool candidate masks at the plane's size (K = 3 with multimask
        output, else 1).
    scores : np.ndarray
        (K,) float32 predicted IoU of each candidate.
    low_res : np.ndarray
        (K, h, w) float32 low-resolution logits ((K, 256, 256) for SAM models).
    choice : int
        Index of the chosen candidate, ``0 <= choice < K``.
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res: np.ndarray
    choice: int

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the chosen mask."""
        return self.masks[self.choice]

    @property
    def score(self) -> float:
        """Predicted IoU of the chosen mask."""
        return float(self.scores[self.choice])

    @property
    def mask_input(self) -> np.ndarray:
        """(1, h, w) float32 logits of the chosen mask, to refine it with ``mask_input=``."""
        return self.low_res[self.choice][None]


@dataclass
class _UndoStep:
    target: np.ndarray
    where: tuple[np.ndarray, ...]
    previous: np.ndarray
    label_id: int


class PromptSession:
    """Interactive segmentation state over an image or a stack of planes.

    Parameters
    ----------
    predictor : Predictor
        The predictor to run. The session makes it hold the current plane's
        embedding; other users of the same predictor are fine (the session puts its
        embedding back before decoding).
    image : array_like
        Anything with ``.shape``, ``.dtype`` and numpy indexing (numpy, dask, zarr),
        in napari layout, any numeric dtype:

        - ``(..., H, W)`` grayscale;
        - ``(..., H, W, 3 | 4)`` when ``rgb`` is True;
        - a channel axis anywhere before (H, W) when ``channel_axis`` is given, e.g.
          ``(C, Z, H, W)`` with ``channel_axis=0``.

        The *plane axes* are the leading axes other than the channel axis.
    rgb : bool
        The last axis holds RGB(A) colour (as napari's ``rgb=True``).
    channel_axis : int, optional
        Index into ``image.shape`` of the channel axis (not one of the last two).
    channels : sequence of int, optional
        Up to three channels to show the model as R, G, B (one is replicated to
        gray, two fill R and G). Default: the first three (``channel_axis``) or the
        colour channels (``rgb``). Not allowed for a grayscale image.
    contrast_limits : (float, float), optional
        ``(lo, hi)`` as a napari layer has them, or one pair per picked channel,
        used for every plane. Default: each plane's 0.5 / 99.5 percentiles (uint8
        and bool unscaled); see :func:`~napari_mobilesam.normalize.to_rgb_uint8`.
    cache : EmbeddingCache, optional
        Where embeddings go; default a private in-memory cache of 16 planes. Share
        one (with a folder) between sessions to reuse embeddings.
    cache_key : hashable, optional
        Identifies the image data (e.g. ``(layer_name, source_path)``), so cache
        entries are looked up by plane index. Default: a sha1 of each plane's
        pixels, which is always right but reads the plane on every ``embed``.

    Notes
    -----
    :meth:`embed`, :meth:`predict`, :meth:`precompute` and :meth:`propagate` hold a
    lock on the session, so a worker thread and the GUI thread never interleave
    their use of the predictor; a call waits for the running one to finish.
    """

    #: How many commits :meth:`undo` can revert.
    max_undo = 64

    def __init__(
        self,
        predictor: Predictor,
        image,
        *,
        rgb: bool = False,
        channel_axis: int | None = None,
        channels: Sequence[int] | None = None,
        contrast_limits=None,
        cache: EmbeddingCache | None = None,
        cache_key: Hashable | None = None,
    ):
        if not isinstance(predictor, Predictor):
            raise TypeError(f"predictor must be a Predictor, got {type(predictor)}")
        if cache is not None and not isinstance(cache, EmbeddingCache):
            raise TypeError(f"cache must be an EmbeddingCache, got {type(cache)}")
        if cache_key is not None:
            try:
                hash(cache_key)
            except TypeError:
                raise TypeError(f"cache_key must be hashable, got {cache_key!r}") from None
        self.predictor = predictor
        self.image = image
        self.rgb = bool(rgb)
        self._check_image_layout(channel_axis)
        self.channels = self._check_channels(channels)
        n_picked = len(self.channels) if self.channels is not None else (3 if self.rgb else 1)
        self.contrast_limits = _check_contrast_limits(contrast_limits, n_picked)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.cache_key = cache_key
        self._model_id = _model_fingerprint(predictor.model)
        self._lock = threading.RLock()
        self._current: tuple[int, ...] | None = None
        self._embedding: ImageEmbedding | None = None
        self._undo: list[_UndoStep] = []

    # -- layout ---------------------------------------------------------------------

    def _check_image_layout(self, channel_axis) -> None:
        image = self.image
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):
            raise TypeError(
                f"image must be an array (numpy, dask, ...) with .shape and .dtype, "
                f"got {type(image)}"
            )
        shape = tuple(int(s) for s in image.shape)
        if np.dtype(image.dtype).kind not in "biuf":
            raise TypeError(f"image must have a bool, integer or float dtype, got {image.dtype}")
        ndim = len(shape)
        if self.rgb and channel_axis is not None:
            raise ValueError("rgb=True and channel_axis cannot be used together")
        need = 3 if (self.rgb or channel_axis is not None) else 2
        if ndim < need:
            raise ValueError(
                f"image must have at least {need} dimensions for rgb={self.rgb}, "
                f"channel_axis={channel_axis!r}, got shape {shape}"
            )
        if self.rgb and shape[-1] not in (3, 4):
            raise ValueError(f"rgb=True needs a last axis of 3 or 4, got image shape {shape}")
        self._channel_axis = None
        if channel_axis is not None:
            if isinstance(channel_axis, bool):
                raise TypeError(f"channel_axis must be an int, got {channel_axis!r}")
            try:
                axis = operator.index(channel_axis)
            except TypeError:
                raise TypeError(f"channel_axis must be an int, got {channel_axis!r}") from None
            if not -ndim <= axis < ndim or axis % ndim >= ndim - 2:
                raise ValueError(
                    f"channel_axis={channel_axis!r} must index an axis before (H, W) of the "
                    f"image of shape {shape}"
                )
            self._channel_axis = axis % ndim
        n_trailing = 3 if self.rgb else 2
        hw = shape[ndim - n_trailing : ndim - n_trailing + 2]
        if min(hw) <= 0:
            raise ValueError(f"image planes must not be empty, got image shape {shape}")
        self._shape = shape
        self._hw = (hw[0], hw[1])
        self._plane_axes = tuple(a for a in range(ndim - n_trailing) if a != self._channel_axis)

    def _check_channels(self, channels) -> tuple[int, ...] | None:
        if self._channel_axis is not None:
            n = self._shape[self._channel_axis]
        elif self.rgb:
            n = self._shape[-1]
        else:
            if channels is not None:
                raise ValueError(
                    f"channels={channels!r} needs rgb=True or a channel_axis; the image is "
                    "grayscale"
                )
            return None
        if channels is None:
            return tuple(range(min(n, 3))) if self._channel_axis is not None else None
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Iterable):
            raise TypeError(f"channels must be a sequence of ints, got {channels!r}")
        try:
            picked = tuple(operator.index(c) for c in channels)
        except TypeError:
            raise TypeError(f"channels must be a sequence of ints, got {channels!r}") from None
        if not 1 <= len(picked) <= 3 or any(not 0 <= c < n for c in picked):
            raise ValueError(
                f"channels must hold 1 to 3 indices in [0, {n}) for an image with {n} "
                f"channels, got {channels!r}"
            )
        return picked

    @property
    def plane_shape(self) -> tuple[int, ...]:
        """Sizes of the plane axes (``()`` for a single 2-D image)."""
        return tuple(self._shape[a] for a in self._plane_axes)

    @property
    def n_planes(self) -> int:
        """Number of planes (1 for a single 2-D image)."""
        return math.prod(self.plane_shape)

    @property
    def shape_hw(self) -> tuple[int, int]:
        """(H, W) of every plane."""
        return self._hw

    @property
    def current(self) -> tuple[int, ...] | None:
        """Index of the plane the predictor is on, or None before :meth:`embed`."""
        return self._current

    def check_index(self, index) -> tuple[int, ...]:
        """Validate a plane index and return it as a tuple of ints.

        Parameters
        ----------
        index : int or sequence of int
            One non-negative int per plane axis (an int alone for one plane axis,
            ``()`` for a 2-D image).
        """
        shape = self.plane_shape
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            index = (index,)
        if isinstance(index, (str, bytes)) or not isinstance(index, Iterable):
            raise TypeError(f"index must be a tuple of ints, got {index!r}")
        try:
            if any(isinstance(i, bool) for i in index):
                raise TypeError
            idx = tuple(operator.index(i) for i in index)
        except TypeError:
            raise TypeError(f"index must be a tuple of ints, got {index!r}") from None
        if len(idx) != len(shape) or any(not 0 <= i < n for i, n in zip(idx, shape, strict=True)):
            raise ValueError(f"index must be a plane index within {shape}, got {index!r}")
        return idx

    def plane(self, index) -> np.ndarray:
        """The pixels of one plane, read into memory.

        Parameters
        ----------
        index : tuple of int
            Plane index (see :meth:`check_index`).

        Returns
        -------
        np.ndarray
            (H, W) grayscale, or (H, W, C) for ``rgb`` (C = 3 or 4) and for a channel
            axis (C = channels, moved last), in the image's dtype.
        """
        idx = self.check_index(index)
        key: list = [slice(None)] * len(self._shape)
        for axis, i in zip(self._plane_axes, idx, strict=True):
            key[axis] = i
        plane = np.asarray(self.image[tuple(key)])
        if self._channel_axis is not None:
            plane = np.moveaxis(plane, 0, -1)  # the only axis left before (H, W)
        return plane

    # -- embeddings -----------------------------------------------------------------

    def _set_image_kwargs(self) -> dict:
        kwargs = {"contrast_limits": self.contrast_limits, "channels": self.channels}
        if self._channel_axis is not None:
            kwargs["channel_axis"] = -1
        return kwargs

    def _key(self, idx: tuple[int, ...], plane: np.ndarray | None) -> Hashable:
        mode = "rgb" if self.rgb else ("channels" if self._channel_axis is not None else "gray")
        settings = (mode, self.channels, self.contrast_limits, self._model_id)
        if self.cache_key is not None:
            return (self.cache_key, idx, *settings)
        data = np.ascontiguousarray(plane)
        digest = hashlib.sha1(f"{data.dtype.str}{data.shape}".encode())
        digest.update(data.view(np.uint8).reshape(-1) if data.size else b"")
        return ("sha1", digest.hexdigest(), *settings)

    def embed(self, index) -> bool:
        """Make plane ``index`` the predictor's current image.

        From the cache when it holds the plane (no encoder run), else by running the
        encoder (the slow call, for a worker thread) and storing the result.

        Parameters
        ----------
        index : tuple of int
            Plane index (see :meth:`check_index`).

        Returns
        -------
        bool
            True when the encoder ran, False when the embedding came from the cache
            (or the predictor was already on this plane).
        """
        idx = self.check_index(index)
        with self._lock:
            if idx == self._current and self._embedding is not None:
                self._activate()
                return False
            plane = None if self.cache_key is not None else self.plane(idx)
            key = self._key(idx, plane)
            embedding = self.cache.get(key)
            computed = embedding is None
            if computed:
                if plane is None:
                    plane = self.plane(idx)
                self.predictor.set_image(plane, **self._set_image_kwargs())
                embedding = self.predictor.get_embedding()
                self.cache.put(key, embedding)
            else:
                self.predictor.set_embedding(embedding)
                embedding = self.predictor.get_embedding()
            self._current, self._embedding = idx, embedding
            return computed

    @property
    def batch_size(self) -> int:
        """Planes per encoder call when precomputing: 8 on a GPU, where batches raise
        throughput, 1 on a CPU, where they do not (and progress stays per plane)."""
        return 1 if self.predictor.device.type == "cpu" else 8

    def _embed_many(self, indices: list[tuple[int, ...]]) -> int:
        """Cache the embeddings of ``indices`` missing from the cache, in one encoder batch."""
        missing = []
        for idx in indices:
            plane = None if self.cache_key is not None else self.plane(idx)
            key = self._key(idx, plane)
            if self.cache.get(key) is None:
                missing.append((key, self.plane(idx) if plane is None else plane))
        if missing:
            planes = [plane for _, plane in missing]
            kwargs = self._set_image_kwargs()
            embeddings = self.predictor.embed_images(planes, batch_size=len(planes), **kwargs)
            for (key, _), embedding in zip(missing, embeddings, strict=True):
                self.cache.put(key, embedding)
        return len(missing)

    def _activate(self) -> None:
        """Put this session's embedding back on the predictor if someone replaced it."""
        if self._embedding is None:
            raise RuntimeError("no plane is embedded: call embed(index) before predict()")
        if not self.predictor.is_image_set or self.predictor.features is not (
            self._embedding.features
        ):
            self.predictor.set_embedding(self._embedding)
            self._embedding = self.predictor.get_embedding()

    def precompute(
        self,
        indices: Iterable | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        batch_size: int | None = None,
    ) -> int:
        """Embed planes into the cache ahead of time.

        The predictor is put back on the current plane afterwards. Size the cache
        (``max_items`` or a folder) for the number of planes.

        Parameters
        ----------
        indices : iterable of plane indices, optional
            Default: every plane, in C order.
        progress : callable(done, total), optional
            Called after each plane (each batch of planes when batching).
        should_stop : callable() -> bool, optional
            Checked before each plane (each batch); True stops early.
        batch_size : int, optional
            Planes per encoder call (:meth:`Predictor.embed_images`); only planes
            missing from the cache are encoded. Default: :attr:`batch_size`.

        Returns
        -------
        int
            How many planes were computed (cache hits do not count).
        """
        if indices is None:
            todo = list(np.ndindex(*self.plane_shape))
        else:
            if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
                raise TypeError(f"indices must be an iterable of plane indices, got {indices!r}")
            todo = [self.check_index(i) for i in indices]
        if batch_size is None:
            batch_size = self.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        computed = 0
        with self._lock:
            before, before_embedding = self._current, self._embedding
            try:
                for start in range(0, len(todo), batch_size):
                    if should_stop is not None and should_stop():
                        break
                    chunk = todo[start : start + batch_size]
                    computed += self.embed(chunk[0]) if batch_size == 1 else self._embed_many(chunk)
                    if progress is not None:
                        progress(start + len(chunk), len(todo))
            finally:
                self._current, self._embedding = before, before_embedding
                if before_embedding is not None:
                    self._activate()
        return computed

    # -- prompts ----------------------------------------------------------------------

    def predict(
        self,
        points_rc=None,
        labels=None,
        box_rc=None,
        *,
        multimask: bool = True,
        mask_input=None,
        choice: int | str = "best",
    ) -> Prediction:
        """Masks for prompts on the current plane.

        Parameters
        ----------
        points_rc : (N, 2) array_like, optional
            Points as (row, col) pixels of the plane (napari's order).
        labels : (N,) array_like, optional
            1 = foreground, 0 = background; default all 1.
        box_rc : (4,) or (K, 2) array_like, optional
            Two opposite corners ``(r0, c0, r1, c1)`` in any order, or K >= 2 corner
            points (row, col) such as a napari rectangle; the box is their bounding box.
        multimask : bool
            Ask for three candidates. Used only for a single prompt (one point or a
            box alone), where it resolves ambiguity; with several prompts a single
            mask is predicted, as SAM recommends.
        mask_input : (1, h, w) array_like, optional
            Low-res logits of an earlier prediction (:attr:`Prediction.mask_input`).
        choice : "best" or int
            The candidate to choose: the highest score, or index ``choice % K``
            (to cycle through the candidates).

        Returns
        -------
        Prediction
        """
        points_xy, point_labels = self._check_points(points_rc, labels)
        box_xyxy = self._check_box(box_rc)
        if points_xy is None and box_xyxy is None:
            raise ValueError("predict needs a prompt: give points_rc and/or box_rc")
        if not (isinstance(choice, str) and choice == "best"):
            if isinstance(choice, bool) or not isinstance(choice, (int, np.integer)):
                raise TypeError(f"choice must be 'best' or an int, got {choice!r}")
        n_prompts = (0 if points_xy is None else len(points_xy)) + (box_xyxy is not None)
        multimask_output = bool(multimask) and n_prompts == 1
        with self._lock:
            self._activate()
            masks, scores, low_res = self.predictor.predict(
                points_xy,
                point_labels,
                box_xyxy,
                mask_input=mask_input,
                multimask_output=multimask_output,
            )
        k = int(np.argmax(scores)) if isinstance(choice, str) else int(choice) % len(scores)
        return Prediction(masks, scores, low_res, k)

    @staticmethod
    def _check_points(points_rc, labels):
        if points_rc is None:
            if labels is not None:
                raise ValueError("labels given without points_rc")
            return None, None
        pts = _finite_array(points_rc, "points_rc")
        if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
            raise ValueError(f"points_rc must have shape (N, 2) as (row, col), got {pts.shape}")
        if labels is None:
            lab = np.ones(len(pts), dtype=np.int64)
        else:
            lab = _finite_array(labels, "labels")
            if lab.shape != (len(pts),):
                raise ValueError(
                    f"labels must have shape ({len(pts)},) to match points_rc, got {lab.shape}"
                )
            if not np.isin(lab, (0, 1)).all():
                raise ValueError(
                    f"labels must be 1 (foreground) or 0 (background), got {np.unique(lab)}"
                )
            lab = lab.astype(np.int64)
        return rc_to_xy(pts), lab

    @staticmethod
    def _check_box(box_rc):
        if box_rc is None:
            return None
        box = _finite_array(box_rc, "box_rc")
        if box.shape == (4,):
            box = box.reshape(2, 2)
        if box.ndim != 2 or box.shape[1] != 2 or box.shape[0] < 2:
            raise ValueError(
                f"box_rc must have shape (4,) as (r0, c0, r1, c1) or (K>=2, 2) corners as "
                f"(row, col), got {box.shape}"
            )
        return corners_rc_to_xyxy(box)

    # -- labels -----------------------------------------------------------------------

    def commit(
        self,
        labels: np.ndarray,
        mask: np.ndarray,
        *,
        label_id: int | None = None,
        overwrite: bool = False,
    ) -> int:
        """Paint ``mask`` into a label image in place, with a new id; undoable.

        Parameters
        ----------
        labels : np.ndarray
            (H, W) integer label image (0 = background), modified in place; a view
            into a stack (``labels3d[z]``) works.
        mask : np.ndarray
            (H, W) bool.
        label_id : int, optional
            The id to paint (>= 1); default ``labels.max() + 1``. For one plane of a
            stack, pass ``stack.max() + 1`` to keep ids unique across planes.
        overwrite : bool
            Also paint over other labels; by default only background pixels change.

        Returns
        -------
        int
            The id painted.
        """
        if not isinstance(labels, np.ndarray):
            raise TypeError(f"labels must be a numpy array (modified in place), got {type(labels)}")
        if labels.dtype.kind not in "iu":
            raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.shape != self.shape_hw:
            raise ValueError(
                f"labels must have shape {self.shape_hw} (one plane), got {labels.shape}"
            )
        if not labels.flags.writeable:
            raise ValueError("labels is read-only; commit paints it in place")
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a bool array, got dtype {mask.dtype}")
        if mask.shape != labels.shape:
            raise ValueError(f"mask must have shape {labels.shape} like labels, got {mask.shape}")
        if not mask.any():
            raise ValueError("mask is empty: nothing to commit")
        top = int(np.iinfo(labels.dtype).max)
        if label_id is None:
            current_max = int(labels.max())
            if current_max >= top:
                raise ValueError(
                    f"labels already holds the largest {labels.dtype} id ({top}): no new id "
                    "fits; use a wider dtype or pass label_id"
                )
            label_id = max(current_max, 0) + 1
        else:
            if isinstance(label_id, bool) or not isinstance(label_id, (int, np.integer)):
                raise TypeError(f"label_id must be an int, got {label_id!r}")
            label_id = int(label_id)
            if not 1 <= label_id <= top:
                raise ValueError(
                    f"label_id must be in [1, {top}] for {labels.dtype}, got {label_id}"
                )
        region = mask if overwrite else mask & (labels == 0)
        where = np.nonzero(region)
        if where[0].size == 0:
            raise ValueError(
                "mask covers only pixels that already have a label; pass overwrite=True to "
                "paint over them"
            )
        previous = labels[where].copy()
        labels[where] = label_id
        self._undo.append(_UndoStep(labels, where, previous, label_id))
        del self._undo[: -self.max_undo]
        return label_id

    @property
    def can_undo(self) -> bool:
        """Whether :meth:`undo` has a commit to revert."""
        return bool(self._undo)

    def undo(self, labels: np.ndarray | None = None) -> int | None:
        """Revert the last :meth:`commit`, restoring the pixels' previous values.

        Parameters
        ----------
        labels : np.ndarray, optional
            Revert in this array instead of the one the commit painted (when the
            label data was replaced by a copy); same shape.

        Returns
        -------
        int or None
            The id that was removed, or None when there is nothing to undo.
        """
        if not self._undo:
            return None
        step = self._undo[-1]
        target = step.target if labels is None else labels
        if not isinstance(target, np.ndarray) or target.shape != step.target.shape:
            raise ValueError(
                f"labels must be an array of shape {step.target.shape} to undo into, got "
                f"{getattr(target, 'shape', type(target))}"
            )
        target[step.where] = step.previous
        self._undo.pop()
        return step.label_id

    # -- propagation ------------------------------------------------------------------

    def propagate(
        self,
        start,
        mask: np.ndarray,
        axis: int,
        *,
        direction: int = 0,
        min_score: float = 0.7,
        min_area_ratio: float = 0.3,
        max_planes: int | None = None,
        use_mask_input: bool = False,
        progress: Callable[[tuple[int, ...], float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[tuple[int, ...], np.ndarray]:
        """Segment the object of ``mask`` in neighbouring planes along one plane axis.

        Plane by plane away from ``start``, the previous plane's mask becomes the
        prompt: its bounding box widened by 10% of its height / width on each side
        (clipped to the plane) and a positive point at its most interior pixel (the
        maximum of the Euclidean distance transform), single-mask output. A result is
        accepted when it is non-empty, its score is ``>= min_score`` and its area
        over the previous area lies in ``[min_area_ratio, 1 / min_area_ratio]``;
        the first rejected plane ends that direction.

        Parameters
        ----------
        start : tuple of int
            Plane index of ``mask``.
        mask : np.ndarray
            (H, W) bool, non-empty: the object on ``start``.
        axis : int
            Which plane axis to walk along (0-based index into :attr:`plane_shape`).
        direction : {1, -1, 0}
            Towards higher indices, lower indices, or both (0).
        min_score : float
            Lowest predicted IoU accepted.
        min_area_ratio : float
            In (0, 1]: the largest allowed shrink factor (and its inverse the
            largest growth) of the area from one plane to the next.
        max_planes : int, optional
            At most this many planes per direction.
        use_mask_input : bool
            Also give the previous plane's low-res logits as ``mask_input`` (none for
            the first step). Off by default: SAM learnt mask prompts from its own
            earlier output on the *same* image, and logits from another plane are
            reported not to help in practice.
        progress : callable(index, score), optional
            Called after each accepted plane.
        should_stop : callable() -> bool, optional
            Checked before each plane; True stops.

        Returns
        -------
        dict
            ``{plane index: (H, W) bool mask}`` for the accepted planes, ``start``
            excluded, in the order they were found. The predictor is back on
            ``start`` afterwards.
        """
        start = self.check_index(start)
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a bool array, got dtype {mask.dtype}")
        if mask.shape != self.shape_hw:
            raise ValueError(f"mask must have shape {self.shape_hw}, got {mask.shape}")
        if not mask.any():
            raise ValueError("mask is empty: nothing to propagate")
        n_axes = len(self.plane_shape)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an int, got {axis!r}")
        if not 0 <= axis < n_axes:
            raise ValueError(
                f"axis must index a plane axis in [0, {n_axes}) (plane shape "
                f"{self.plane_shape}), got {axis}"
            )
        if direction not in (-1, 0, 1) or isinstance(direction, bool):
            raise ValueError(f"direction must be 1, -1 or 0 (both), got {direction!r}")
        min_score = _as_float(min_score, "min_score")
        if math.isnan(min_score):
            raise ValueError(f"min_score must be a number, got {min_score!r}")
        min_area_ratio = _as_float(min_area_ratio, "min_area_ratio")
        if not 0 < min_area_ratio <= 1:
            raise ValueError(f"min_area_ratio must be in (0, 1], got {min_area_ratio!r}")
        if max_planes is not None:
            if isinstance(max_planes, bool) or not isinstance(max_planes, (int, np.integer)):
                raise TypeError(f"max_planes must be an int or None, got {max_planes!r}")
            if max_planes < 0:
                raise ValueError(f"max_planes must be >= 0, got {max_planes}")
        steps = (1, -1) if direction == 0 else (direction,)
        size = self.plane_shape[axis]
        limit = size if max_planes is None else int(max_planes)
        found: dict[tuple[int, ...], np.ndarray] = {}
        with self._lock:
            try:
                for step in steps:
                    prev_mask, prev_logits = mask, None
                    pos = start[axis]
                    for _ in range(limit):
                        pos += step
                        if not 0 <= pos < size or (should_stop is not None and should_stop()):
                            break
                        idx = (*start[:axis], pos, *start[axis + 1 :])
                        self.embed(idx)
                        box_rc, point_rc = _mask_prompt(prev_mask)
                        pred = self.predict(
                            point_rc[None],
                            None,
                            box_rc,
                            multimask=False,
                            mask_input=prev_logits if use_mask_input else None,
                        )
                        new_mask, score = pred.mask, pred.score
                        ratio = new_mask.sum() / prev_mask.sum()
                        if not (
                            new_mask.any()
                            and score >= min_score
                            and min_area_ratio <= ratio <= 1 / min_area_ratio
                        ):
                            break
                        found[idx] = new_mask
                        prev_mask, prev_logits = new_mask, pred.mask_input
                        if progress is not None:
                            progress(idx, score)
            finally:
                self.embed(start)
        return found


# --------------------------------------------------------------------------- helpers


def _as_float(value, name: str) -> float:
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


def _finite_array(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got {value!r}") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values: {value!r}")
    return arr


def _check_contrast_limits(contrast_limits, n_picked: int):
    """Limits validated as :func:`~napari_mobilesam.normalize.to_rgb_uint8` will use them,
    as a hashable tuple of Python floats (one pair, or one pair per picked channel)."""
    if contrast_limits is None:
        return None
    pairs = normalize._check_contrast_limits(contrast_limits, n_picked)
    if np.shape(contrast_limits) == (2,):
        return pairs[0]
    return tuple(pairs)


def _model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights, so caches never mix two models."""
    digest = hashlib.sha1(type(model).__name__.encode())
    digest.update(str(getattr(model, "img_size", "")).encode())
    state = model.state_dict()
    names = [n for n, t in state.items() if n.startswith("image_encoder.") and t.numel()]
    for name in (names[:1] + names[-1:]) if names else []:
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def _mask_prompt(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box (r0, c0, r1, c1), widened by 10% per side, and the most interior point of a mask."""
    from scipy import ndimage

    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    dr, dc = 0.1 * (r1 - r0 + 1), 0.1 * (c1 - c0 + 1)
    box = np.array(
        [max(r0 - dr, 0.0), max(c0 - dc, 0.0), min(r1 + dr, h - 1.0), min(c1 + dc, w - 1.0)]
    )
    # pad so that pixels on the image border count as interior only up to the border
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    point = np.array(np.unravel_index(int(np.argmax(dist)), mask.shape), dtype=np.float64)
    return box, point
