"""Prompts on large planes, answered from tile embeddings (the tiled half of
:class:`~.session.PromptSession`).

A session whose planes exceed its tile threshold embeds each plane as overlapping tiles
(:class:`~.tiles.TileGrid`), lazily: a tile's embedding is computed the first time a prompt
needs it (or by :meth:`PromptSession.precompute`) and kept in the session's cache. Every
tile of a plane is normalised with the same contrast limits, the session's or, without
them, percentiles of the whole plane (read subsampled), so a cell looks the same to the
model whichever tile holds it.

A prompt is answered from one tile when one holds all of it (the most central one), with
masks pasted back into full-plane coordinates; otherwise (a box larger than the overlap,
points far apart) from every tile it crosses, each given the prompts that fall inside it
(a box clipped to the tile), single-mask, stitched by ownership (:meth:`TileGrid.owned`).
"""

from __future__ import annotations

import threading

import numpy as np

from ..normalize import auto_contrast_limits
from ..predictor import ImageEmbedding
from .cache import content_fingerprint
from .prompts import Prediction, SamPrompt, batches, pick, to_sam
from .tiles import TileGrid

__all__ = ["TiledPrompts", "plane_limits", "tile_prompt"]


def plane_limits(planes, index, percentiles=(0.5, 99.5)):
    """The contrast limits every tile of a plane is normalised with.

    Parameters
    ----------
    planes : ImagePlanes
    index : tuple of int
        The plane.
    percentiles : (float, float)
        Used without contrast limits.

    Returns
    -------
    tuple or None
        ``planes.contrast_limits`` when set; None for uint8 and bool planes (not
        rescaled, as :func:`~napari_mobilesam.normalize.to_rgb_uint8` leaves them);
        else the percentiles of the whole plane (read subsampled,
        :meth:`ImagePlanes.sample`): one (lo, hi) pair, or one per channel shown.
    """
    if planes.contrast_limits is not None:
        return planes.contrast_limits
    if np.dtype(planes.image.dtype) in (np.uint8, np.bool_):
        return None
    sample = planes.sample(index)
    if sample.ndim == 2:
        return auto_contrast_limits(sample, percentiles)
    picked = planes.channels if planes.channels is not None else range(3)
    pairs = tuple(auto_contrast_limits(sample[..., c], percentiles) for c in picked)
    return pairs[0] if len(pairs) == 1 else pairs


def prompt_bounds(prompt: SamPrompt) -> tuple[float, float, float, float]:
    """``(r0, c0, r1, c1)``: the (row, col) bounding box of a prompt's points and box."""
    xy = []
    if prompt.points_xy is not None:
        xy.append(prompt.points_xy)
    if prompt.box_xyxy is not None:
        xy.append(prompt.box_xyxy.reshape(2, 2))
    pts = np.concatenate(xy)
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    return float(y0), float(x0), float(y1), float(x1)


def tile_prompt(
    prompt: SamPrompt, window: tuple[int, int, int, int], *, require_positive: bool = True
) -> SamPrompt | None:
    """A prompt in a tile's frame: shifted to the tile, points outside it dropped, the box
    clipped to it.

    Parameters
    ----------
    prompt : SamPrompt
        In plane pixels, (x, y).
    window : (r0, c0, r1, c1)
        The tile.
    require_positive : bool
        Return None when nothing positive is left inside the tile (no box, no
        foreground point).

    Returns
    -------
    SamPrompt or None
    """
    r0, c0, r1, c1 = window
    offset = np.array([c0, r0], dtype=np.float64)
    points = labels = box = None
    if prompt.points_xy is not None:
        x, y = prompt.points_xy[:, 0], prompt.points_xy[:, 1]
        inside = (x >= c0) & (x < c1) & (y >= r0) & (y < r1)
        if inside.any():
            points, labels = prompt.points_xy[inside] - offset, prompt.labels[inside]
    if prompt.box_xyxy is not None:
        bx0, by0, bx1, by1 = prompt.box_xyxy
        clipped = np.array(
            [max(bx0, c0), max(by0, r0), min(bx1, c1 - 1), min(by1, r1 - 1)], dtype=np.float64
        )
        if clipped[0] <= clipped[2] and clipped[1] <= clipped[3]:
            box = clipped - np.tile(offset, 2)
    if require_positive and box is None and (labels is None or not (labels == 1).any()):
        return None
    return SamPrompt(points, labels, box)


class TiledPrompts:
    """The tiled methods of :class:`~.session.PromptSession` (see there): tile embeddings,
    and prompts answered from them. Uses the session's planes, predictor, cache and locks;
    :attr:`tiles` is None for a session whose planes are not tiled."""

    tiles: TileGrid | None

    def _init_tiles(self, grid: TileGrid | None) -> None:
        self.tiles = grid
        self._limits: dict[tuple[int, ...], object] = {}
        self._limits_lock = threading.Lock()

    def tile_contrast_limits(self, index):
        """The contrast limits every tile of plane ``index`` is normalised with: the
        session's, or percentiles (0.5, 99.5) of the whole plane (one pair per channel
        shown), or None for uint8 and bool planes, which are not rescaled."""
        idx = self.check_index(index)
        with self._limits_lock:
            if idx in self._limits:
                return self._limits[idx]
        limits = plane_limits(self.planes, idx)
        with self._limits_lock:
            self._limits[idx] = limits
        return limits

    def tile_for(self, points_rc=None, box_rc=None) -> int | None:
        """The tile that answers these prompts (as :meth:`predict` takes them), or None
        when they cross tiles (their answer is stitched) or the session is not tiled."""
        if self.tiles is None:
            return None
        return self.tiles.containing(prompt_bounds(to_sam(points_rc, None, box_rc)))

    def is_tile_cached(self, index, tile: int) -> bool:
        """Whether tile ``tile`` of plane ``index`` is embedded (cache or store)."""
        if self.tiles is None:
            raise ValueError("is_tile_cached needs a tiled session (session.tiles is None)")
        idx = self.check_index(index)
        self.tiles.window(tile)  # checks
        return self._tile_key(idx, tile)[0] in self.cache

    def _tile_key(self, idx, tile: int):
        """The cache key of a tile's embedding, and its pixels when the key needed them."""
        window = self.tiles.window(tile)
        limits = self.tile_contrast_limits(idx)
        if self.cache_key is not None:
            return ("tile", (self.cache_key, idx), window, limits, *self._settings), None
        pixels = self.planes.window(idx, window)
        ident = ("sha1", content_fingerprint(pixels))
        return ("tile", ident, window, limits, *self._settings), pixels

    def _tile_embedding(self, idx, tile: int) -> tuple[ImageEmbedding, bool]:
        """Tile ``tile`` of plane ``idx``: its embedding from the cache or computed and
        cached, and whether the encoder ran. Leaves the predictor on that tile."""
        key, pixels = self._tile_key(idx, tile)
        embedding = self.cache.get(key)
        if embedding is not None:
            with self._predictor_lock:
                return self._activate(embedding), False
        if pixels is None:
            pixels = self.planes.window(idx, self.tiles.window(tile))
        kwargs = {**self.planes.normalize_kwargs(), "contrast_limits": key[3]}
        with self._predictor_lock:
            self.predictor.set_image(pixels, **kwargs)
            embedding = self.predictor.get_embedding()
        self.cache.put(key, embedding)
        return embedding, True

    def _tiles_cached(self, idx) -> bool:
        return all(self._tile_key(idx, t)[0] in self.cache for t in range(len(self.tiles)))

    def _precompute_tiles(self, todo, progress, should_stop) -> int:
        """Embed every tile of the planes ``todo``; progress counts tiles."""
        jobs = [(idx, t) for idx in todo for t in range(len(self.tiles))]
        computed = 0
        for n, (idx, t) in enumerate(jobs, start=1):
            if should_stop is not None and should_stop():
                break
            key, _ = self._tile_key(idx, t)
            if key not in self.cache:
                computed += self._tile_embedding(idx, t)[1]
            if progress is not None:
                progress(n, len(jobs))
        return computed

    # -- prompts --------------------------------------------------------------------------

    def _decode_tile(self, idx, tile: int, prompt: SamPrompt, multimask: bool, mask_input):
        """Masks (K, th, tw), scores (K,) and low-res logits of a tile-frame prompt."""
        with self._predictor_lock:  # the tile's embedding and decoding together
            self._tile_embedding(idx, tile)
            return self.predictor.predict(
                prompt.points_xy, prompt.labels, prompt.box_xyxy,
                mask_input=mask_input, multimask_output=multimask,
            )  # fmt: skip

    def _paste(self, masks: np.ndarray, window) -> np.ndarray:
        """(K, th, tw) tile masks as (K, H, W) plane masks (zeros elsewhere)."""
        r0, c0, r1, c1 = window
        out = np.zeros((len(masks), *self.shape_hw), dtype=bool)
        out[:, r0:r1, c0:c1] = masks
        return out

    def _predict_tiled(self, idx, prompt: SamPrompt, multimask: bool, mask_input, choice):
        """:meth:`PromptSession.predict` on a tiled plane."""
        grid = self.tiles
        bounds = prompt_bounds(prompt)
        tile = grid.containing(bounds)
        if tile is not None:
            window = grid.window(tile)
            local = tile_prompt(prompt, window, require_positive=False)
            masks, scores, low_res = self._decode_tile(idx, tile, local, multimask, mask_input)
            return Prediction(self._paste(masks, window), scores, low_res, pick(scores, choice),
                              window)  # fmt: skip
        return self._stitch(idx, prompt, bounds)

    def _stitch(self, idx, prompt: SamPrompt, bounds) -> Prediction:
        """One mask from every tile the prompt crosses, each tile's owned pixels."""
        grid = self.tiles
        centre = grid.owner((bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2)
        mask = np.zeros(self.shape_hw, dtype=bool)
        weighted, area, tile_scores = 0.0, 0, []
        low_res = window_of_low_res = None
        for tile in grid.crossing(bounds):
            window = grid.window(tile)
            local = tile_prompt(prompt, window)
            if local is None:
                continue
            masks, scores, logits = self._decode_tile(idx, tile, local, False, None)
            r0, c0, r1, c1 = grid.owned(tile)
            part = masks[0, r0 - window[0] : r1 - window[0], c0 - window[1] : c1 - window[1]]
            mask[r0:r1, c0:c1] = part
            n = int(part.sum())
            weighted, area = weighted + n * float(scores[0]), area + n
            tile_scores.append(float(scores[0]))
            if low_res is None or tile == centre:
                low_res, window_of_low_res = logits, window
        if not tile_scores:
            h, w = self.shape_hw
            raise ValueError(
                f"nothing to segment inside the plane ({h} x {w} pixels): give a foreground "
                "point or a box within it (points outside the plane are dropped on tiled "
                "planes)"
            )
        score = weighted / area if area else min(tile_scores)
        scores = np.array([score], dtype=np.float32)
        return Prediction(mask[None], scores, low_res, 0, window_of_low_res)

    def _predict_many_tiled(self, idx, prompts: list[SamPrompt], multimask: bool):
        """:meth:`PromptSession.predict_many` on a tiled plane: objects held by one tile
        batched per tile and form, the others stitched one by one."""
        grid = self.tiles
        out: list[Prediction | None] = [None] * len(prompts)
        per_tile: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            tile = grid.containing(prompt_bounds(p))
            if tile is None:
                out[i] = self._stitch(idx, p, prompt_bounds(p))
            else:
                per_tile.setdefault(tile, []).append(i)
        for tile, members in per_tile.items():
            window = grid.window(tile)
            local = [tile_prompt(prompts[i], window, require_positive=False) for i in members]
            for group, arrays in batches(local):
                single = local[group[0]].n_prompts == 1
                with self._predictor_lock:
                    self._tile_embedding(idx, tile)
                    masks, scores, low_res = self.predictor.predict_batch(
                        *arrays, multimask_output=bool(multimask) and single
                    )
                for j, k in enumerate(group):
                    out[members[k]] = Prediction(
                        self._paste(masks[j], window), scores[j], low_res[j],
                        pick(scores[j], "best"), window,
                    )  # fmt: skip
        return out
