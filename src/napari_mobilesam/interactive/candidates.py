"""Candidate masks upsampled only when read: a click shows one of its three candidates.

SAM answers a single click with three candidate masks, as low-resolution logits
(256 x 256) that are upsampled to the plane's size. The viewer shows one of them and the
others only if the user asks for the next candidate, so :class:`CandidateMasks`
upsamples each candidate the first time it is read (upsampling all three took about a
fifth of a click's time on a CPU). :meth:`CandidateMasks.bounds` says where any
candidate can have pixels without upsampling them, so a viewer can limit its redraw to
that region.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["CandidateMasks"]

#: low-res logits around a positive one that two bilinear upsamplings can reach (one
#: each), plus one for rounding
_REACH = 2


class CandidateMasks:
    """(K, H, W) bool masks made from (K, h', w') low-res logits when first read.

    Reads like the array it stands for: ``len``, ``shape``, ``masks[k]`` (one
    candidate, upsampled once and kept), ``np.asarray(masks)`` (all of them) and
    iteration. Thread-safe.

    Parameters
    ----------
    low_res : (K, h', w') array
        Low-res logits, threshold 0 (SAM's ``mask_threshold``).
    upsample : callable
        (k, h', w') logits -> (k, H, W) bool masks, the same for one candidate as for
        several (e.g. :class:`~napari_mobilesam.predictor.MaskUpsampler`).
    size : (int, int)
        (H, W) of the masks.
    input_size : (int, int)
        (h, w) of the plane resized to the model's input (the masks' region of it).
    scale : float
        Input-frame pixels per low-res logit (4 for SAM).
    """

    def __init__(
        self,
        low_res: np.ndarray,
        upsample: Callable[[np.ndarray], np.ndarray],
        size: tuple[int, int],
        input_size: tuple[int, int],
        scale: float,
    ) -> None:
        low_res = np.asarray(low_res)
        if low_res.ndim != 3:
            raise ValueError(f"low_res must be (K, h, w), got shape {low_res.shape}")
        self._low = low_res
        self._upsample = upsample
        self.shape = (low_res.shape[0], int(size[0]), int(size[1]))
        self._input_size = (int(input_size[0]), int(input_size[1]))
        self._scale = float(scale)
        self._masks: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    dtype = np.dtype(bool)
    ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[k] for k in range(len(self)))

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._one(range(len(self))[key])  # negative ones too; IndexError past
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = (
            np.stack([self[k] for k in range(len(self))])
            if len(self)
            else np.zeros(self.shape, bool)
        )
        return out if dtype is None else out.astype(dtype)

    @property
    def upsampled(self) -> int:
        """How many candidates have been upsampled so far."""
        with self._lock:
            return len(self._masks)

    def _one(self, k: int) -> np.ndarray:
        with self._lock:
            mask = self._masks.get(k)
        if mask is None:
            mask = np.asarray(self._upsample(self._low[k : k + 1]))[0]
            with self._lock:
                mask = self._masks.setdefault(k, mask)
        return mask

    def bounds(self) -> tuple[int, int, int, int] | None:
        """A region (r0, c0, r1, c1) (exclusive ends) that holds every pixel any candidate
        sets, found from the low-res logits alone; None when no candidate sets any.

        A mask pixel is a bilinear mix of low-res logits within :data:`_REACH` of where
        it falls on the low-res grid, and can only be set where one of them is positive,
        so the region is the positive logits' bounding box widened by that reach. It may
        be a little larger than the masks' own bounding box, never smaller.
        """
        (h_in, w_in), (_, height, width) = self._input_size, self.shape
        # the logits the upsampling reads: those over the image, and the next row and
        # column (the rest lie over the input frame's padding, cropped away)
        read_h = min(self._low.shape[1], math.ceil(h_in / self._scale) + 1)
        read_w = min(self._low.shape[2], math.ceil(w_in / self._scale) + 1)
        positive = self._low[:, :read_h, :read_w] > 0
        if not positive.any():
            return None
        rows = np.flatnonzero(positive.any(axis=(0, 2)))
        cols = np.flatnonzero(positive.any(axis=(0, 1)))
        r0, r1 = self._span(rows[0], rows[-1], h_in, height)
        c0, c1 = self._span(cols[0], cols[-1], w_in, width)
        return None if r0 >= r1 or c0 >= c1 else (r0, c0, r1, c1)

    def _span(self, first: int, last: int, n_in: int, n_out: int) -> tuple[int, int]:
        """Low-res indices first..last -> the range of mask indices they can reach."""
        per = self._scale * n_out / n_in  # mask pixels per low-res logit
        lo = math.floor((first - _REACH) * per)
        hi = math.ceil((last + 1 + _REACH) * per)
        return max(0, lo), min(n_out, hi)
