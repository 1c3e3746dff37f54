"""``PromptSession``: interactive segmentation of one image or stack, without any GUI.

It composes the pieces of this package around one :class:`~napari_mobilesam.predictor.
Predictor`: :class:`~.planes.ImagePlanes` (which plane is which), an
:class:`~.cache.EmbeddingCache` (embeddings per plane), prompts (:mod:`.prompts`),
a :class:`~.labels.LabelEditor` (commit and undo; the methods in :mod:`.session_labels`),
tiles of large planes (:mod:`.tiled`) and propagation (:mod:`.propagate`,
:mod:`.propagate_many`; the methods in :mod:`.session_stacks`).

Threads: every public method may be called from several threads at once. A lock per
session guards its current plane; :func:`predictor_lock`, shared by every session on a
predictor, guards the predictor's current image (taken second). Precompute and
propagation take the predictor lock one plane (or batch) at a time, so that a prompt on
another thread gets its turn between planes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np

from ..predictor import ImageEmbedding, Predictor
from ..validation import check_int
from .cache import EmbeddingCache, content_fingerprint, model_fingerprint
from .candidates import CandidateMasks
from .labels import LabelEditor
from .locks import predictor_lock
from .planes import ImagePlanes
from .prompts import ObjectPrompt, Prediction, SamPrompt, batches, check_choice, pick, to_sam
from .session_labels import SessionLabels
from .session_stacks import StackPropagation
from .tiled import TiledPrompts
from .tiles import DEFAULT_TILE_OVERLAP, DEFAULT_TILE_SIZE, DEFAULT_TILE_THRESHOLD, TileGrid

__all__ = ["PromptSession"]


def _from_planes(name: str, doc: str) -> property:
    """A read-only attribute of the session's :class:`ImagePlanes`."""
    return property(lambda self: getattr(self.planes, name), doc=doc)


class PromptSession(StackPropagation, TiledPrompts, SessionLabels):
    """Interactive segmentation state over an image or a stack of planes.

    Parameters
    ----------
    predictor : Predictor
        The predictor to run. Other users of the same predictor are fine: the session
        puts its plane's embedding back before decoding (see :func:`predictor_lock`).
    image : array_like
        numpy, dask or zarr array in napari layout; see
        :class:`~napari_mobilesam.interactive.ImagePlanes`.
    rgb, channel_axis, channels, contrast_limits
        How planes are read and normalised; see
        :class:`~napari_mobilesam.interactive.ImagePlanes`.
    cache : EmbeddingCache, optional
        Where embeddings go; default a private in-memory cache of 16 planes. Share one
        (with a folder) between sessions to reuse embeddings.
    cache_key : hashable, optional
        Names the image data (e.g. ``(layer_name, source_path)``), so that cache entries
        are looked up by this name and the plane index without reading the plane. The
        caller guarantees that the data under that name does not change. Default: a
        sha1 of each plane's pixels, which is always right but reads the plane on every
        :meth:`embed`. Either way the key also holds the normalisation settings and a
        fingerprint of the model's weights.
    tile_threshold : int or None
        Planes whose longer side exceeds this many pixels are embedded as overlapping
        tiles (:attr:`tiles`) instead of shrunk whole to the model's input; None never
        tiles. Default 2048.
    tile_size, tile_overlap : int
        Side of a tile (default 1024, the model's input) and least overlap between
        neighbouring tiles (default 256; a box up to this size always fits one tile).

    Notes
    -----
    Coordinates are napari's: points are (row, col) = (y, x) pixels of the plane, boxes
    two opposite corners ``(r0, c0, r1, c1)``. Every public method is thread-safe.

    On tiled planes (see :mod:`.tiled`) :meth:`embed` only selects the plane: a tile is
    embedded the first time a prompt needs it (or by :meth:`precompute`), all tiles of
    a plane with the same contrast limits (:meth:`tile_contrast_limits`). Masks are
    always (H, W) of the whole plane; a prompt held by one tile is answered from the most
    central such tile, others from every tile they cross, stitched. Without a ``cache``,
    a tiled session keeps up to 256 tile embeddings in memory (4 MB each).
    """

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
        tile_threshold: int | None = DEFAULT_TILE_THRESHOLD,
        tile_size: int = DEFAULT_TILE_SIZE,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
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
        self.planes = ImagePlanes(
            image, rgb=rgb, channel_axis=channel_axis, channels=channels,
            contrast_limits=contrast_limits,
        )  # fmt: skip
        self.predictor = predictor
        grid = TileGrid(self.planes.shape_hw, tile_size, tile_overlap)
        if tile_threshold is not None:
            tile_threshold = check_int(tile_threshold, "tile_threshold", minimum=1)
        tiled = tile_threshold is not None and max(self.planes.shape_hw) > tile_threshold
        self._init_tiles(grid if tiled else None)
        if cache is None:
            cache = EmbeddingCache(max_items=min(max(16, len(grid)), 256) if tiled else 16)
        self.cache = cache
        self.cache_key = cache_key
        self._settings = (
            *self.planes.settings(),
            model_fingerprint(predictor.model),
            predictor.engine.frames.max_upscale,  # embeddings differ with the limit
        )
        self._labels = LabelEditor(self.planes.shape_hw)
        self._lock = threading.RLock()
        self._predictor_lock = predictor_lock(predictor)
        self._current: tuple[int, ...] | None = None
        self._embedding: ImageEmbedding | None = None

    # -- the image ------------------------------------------------------------------------

    image = _from_planes("image", "The image or stack, as given.")
    rgb = _from_planes("rgb", "Whether the last axis holds RGB(A) colour.")
    channels = _from_planes("channels", "Channels shown to the model as R, G, B, or None.")
    contrast_limits = _from_planes("contrast_limits", "(lo, hi) per picked channel, or None.")
    plane_shape = _from_planes("plane_shape", "Sizes of the plane axes (() for a 2-D image).")
    n_planes = _from_planes("n_planes", "Number of planes (1 for a single 2-D image).")
    shape_hw = _from_planes("shape_hw", "(H, W) of every plane.")

    def check_index(self, index) -> tuple[int, ...]:
        """A plane index as a tuple of ints (:meth:`ImagePlanes.check_index`)."""
        return self.planes.check_index(index)

    def plane(self, index) -> np.ndarray:
        """The pixels of one plane; see :meth:`ImagePlanes.plane`."""
        return self.planes.plane(index)

    # -- embeddings -----------------------------------------------------------------------

    @property
    def current(self) -> tuple[int, ...] | None:
        """Index of the plane :meth:`predict` works on, or None before :meth:`embed`."""
        with self._lock:
            return self._current

    @property
    def batch_size(self) -> int:
        """Planes per encoder call when precomputing: 8 on a GPU, where batches raise
        throughput, 1 on a CPU, where they do not (and progress stays per plane)."""
        return 1 if self.predictor.device.type == "cpu" else 8

    def _key(self, idx: tuple[int, ...]) -> tuple[Hashable, np.ndarray | None]:
        """The cache key of a plane, and its pixels when the key needed them."""
        if self.cache_key is not None:
            return (self.cache_key, idx, *self._settings), None
        plane = self.planes.plane(idx)
        return ("sha1", content_fingerprint(plane), *self._settings), plane

    def is_cached(self, index) -> bool:
        """Whether the cache holds plane ``index``'s embedding (in memory or on disk)."""
        idx = self.check_index(index)
        if self.tiles is not None:
            return self._tiles_cached(idx)
        key, _ = self._key(idx)
        return key in self.cache

    def _activate(self, embedding: ImageEmbedding) -> ImageEmbedding:
        """Put ``embedding`` on the predictor unless it is there (predictor lock held)."""
        p = self.predictor
        if not p.is_image_set or p.features is not embedding.features:
            p.set_embedding(embedding)
            embedding = p.get_embedding()
        return embedding

    def _embedding_of(self, idx: tuple[int, ...]) -> tuple[ImageEmbedding, bool]:
        """Plane ``idx``'s embedding from the cache, or computed and cached; and whether
        the encoder ran. Leaves the predictor on that plane."""
        key, plane = self._key(idx)
        embedding = self.cache.get(key)
        if embedding is not None:
            with self._predictor_lock:
                return self._activate(embedding), False
        if plane is None:
            plane = self.planes.plane(idx)
        with self._predictor_lock:
            self.predictor.set_image(plane, **self.planes.normalize_kwargs())
            embedding = self.predictor.get_embedding()
        self.cache.put(key, embedding)
        return embedding, True

    def embed(self, index) -> bool:
        """Make plane ``index`` the current plane, and the predictor's current image.

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
            (or the session was already on this plane). Always False on a tiled plane,
            whose tiles are embedded when prompts need them.
        """
        idx = self.check_index(index)
        if self.tiles is not None:
            self.tile_contrast_limits(idx)  # the plane's limits, once
            with self._lock:
                self._current, self._embedding = idx, None
            return False
        with self._lock:
            if idx == self._current and self._embedding is not None:
                with self._predictor_lock:
                    self._embedding = self._activate(self._embedding)
                return False
            embedding, computed = self._embedding_of(idx)
            self._current, self._embedding = idx, embedding
            return computed

    def precompute(
        self,
        indices: Iterable | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        batch_size: int | None = None,
    ) -> int:
        """Embed planes into the cache ahead of time, without changing the current plane.

        Size the cache (``max_items`` or a folder) for the number of planes.

        Parameters
        ----------
        indices : iterable of plane indices, optional
            Default: every plane, in C order.
        progress : callable(done, total), optional
            Called after each plane (each batch of planes when batching; each tile on
            tiled planes, where ``total`` counts tiles).
        should_stop : callable() -> bool, optional
            Checked before each plane (each batch); True stops early.
        batch_size : int, optional
            Planes per encoder call (:meth:`Predictor.embed_images`); only planes missing
            from the cache are encoded. Default: :attr:`batch_size`.

        Returns
        -------
        int
            How many planes (tiles, on tiled planes) were computed (cache hits do not
            count).
        """
        if indices is None:
            todo = list(self.planes.indices())
        else:
            if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
                raise TypeError(f"indices must be an iterable of plane indices, got {indices!r}")
            todo = [self.check_index(i) for i in indices]
        batch_size = self.batch_size if batch_size is None else batch_size
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        if self.tiles is not None:
            return self._precompute_tiles(todo, progress, should_stop)
        computed = 0
        for start in range(0, len(todo), batch_size):
            if should_stop is not None and should_stop():
                break
            computed += self._embed_missing(todo[start : start + batch_size])
            if progress is not None:
                progress(min(start + batch_size, len(todo)), len(todo))
        return computed

    def _embed_missing(self, indices: list[tuple[int, ...]]) -> int:
        """Cache the embeddings of ``indices`` missing from the cache, in one encoder call."""
        missing = []
        for idx in indices:
            key, plane = self._key(idx)
            if key not in self.cache:
                missing.append((key, self.planes.plane(idx) if plane is None else plane))
        if missing:
            planes = [plane for _, plane in missing]
            kwargs = self.planes.normalize_kwargs()
            with self._predictor_lock:
                embeddings = self.predictor.embed_images(planes, batch_size=len(planes), **kwargs)
            for (key, _), embedding in zip(missing, embeddings, strict=True):
                self.cache.put(key, embedding)
        return len(missing)

    # -- prompts --------------------------------------------------------------------------

    def _decode(
        self, embedding, prompt: SamPrompt, multimask: bool, mask_input=None, low_res=False
    ):
        """``predictor.predict`` (or ``predict_low_res``) of ``prompt`` on ``embedding``."""
        predict = self.predictor.predict_low_res if low_res else self.predictor.predict
        with self._predictor_lock:
            self._activate(embedding)
            return predict(
                prompt.points_xy, prompt.labels, prompt.box_xyxy,
                mask_input=mask_input, multimask_output=multimask,
            )  # fmt: skip

    def _current_embedding(self) -> ImageEmbedding:
        with self._lock:
            if self._embedding is None:
                raise RuntimeError("no plane is embedded: call embed(index) before predict()")
            return self._embedding

    def _current_plane(self) -> tuple[int, ...]:
        """The current plane of a tiled session."""
        with self._lock:
            if self._current is None:
                raise RuntimeError("no plane is embedded: call embed(index) before predict()")
            return self._current

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
        """Masks for one object's prompts on the current plane.

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
            Ask for three candidates. Used only for a single prompt (one point or a box
            alone), where it resolves ambiguity; with several prompts a single mask is
            predicted, as SAM recommends.
        mask_input : (1, h, w) array_like, optional
            Low-res logits of an earlier prediction (:attr:`Prediction.mask_input`); on a
            tiled plane, of a prediction from the tile that answers these prompts
            (:attr:`Prediction.window`).
        choice : "best" or int
            The candidate to choose: the highest score, or index ``choice % K`` (to
            cycle through the candidates).

        Returns
        -------
        Prediction
        """
        prompt = to_sam(points_rc, labels, box_rc)
        choice = check_choice(choice)
        multimask_output = bool(multimask) and prompt.n_prompts == 1
        if self.tiles is not None:
            with self._lock:
                return self._predict_tiled(
                    self._current_plane(), prompt, multimask_output, mask_input, choice
                )
        with self._lock:
            scores, low_res, upsample = self._decode(
                self._current_embedding(), prompt, multimask_output, mask_input, low_res=True
            )
        # each candidate is upsampled when first read: a viewer shows the chosen one
        masks = CandidateMasks(
            low_res, upsample, upsample.original_size, upsample.input_size, upsample.scale
        )
        return Prediction(masks, scores, low_res, pick(scores, choice))

    def predict_many(
        self, prompts: Sequence[ObjectPrompt], *, multimask: bool = False
    ) -> list[Prediction]:
        """Masks for several objects on the current plane, batched into decoder calls.

        Objects whose prompts have the same form (as many points, with or without a
        box) share one decoder call: for example every box of a plane in one call.

        Parameters
        ----------
        prompts : sequence of ObjectPrompt
            One per object.
        multimask : bool
            Three candidates for objects with a single prompt (the best is chosen);
            others always get one mask.

        Returns
        -------
        list of Prediction
            One per object, in the order of ``prompts``.
        """
        if isinstance(prompts, ObjectPrompt) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a sequence of ObjectPrompt, got {prompts!r}")
        checked = []
        for i, p in enumerate(prompts):
            if not isinstance(p, ObjectPrompt):
                raise TypeError(f"prompts[{i}] must be an ObjectPrompt, got {type(p)}")
            checked.append(to_sam(p.points_rc, p.labels, p.box_rc))
        out: list[Prediction | None] = [None] * len(checked)
        if self.tiles is not None:
            with self._lock:
                return self._predict_many_tiled(self._current_plane(), checked, multimask)
        with self._lock:
            embedding = self._current_embedding()
            for members, arrays in batches(checked):
                single = checked[members[0]].n_prompts == 1
                with self._predictor_lock:
                    self._activate(embedding)
                    masks, scores, low_res = self.predictor.predict_batch(
                        *arrays, multimask_output=bool(multimask) and single
                    )
                for j, i in enumerate(members):
                    out[i] = Prediction(masks[j], scores[j], low_res[j], pick(scores[j], "best"))
        return out  # type: ignore[return-value]
