"""Pillow's bilinear resize-longest-side, byte for byte, as matrix products on any device.

On a GPU, Pillow's resize on the host (a CPU core's work per image) bounds how fast a
stack goes through the encoder. :class:`PillowResize` gives the same bytes on the
image's device: Pillow's fixed-point weights (:func:`pil_bilinear_matrix`) and its two
passes, each rounded to uint8, as float64 matrix products whose integer sums are exact.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from ..transforms import preprocess_shape, resize_longest_side

__all__ = ["PillowResize", "pil_bilinear_matrix", "two_passes"]

#: Pillow's fixed-point precision for 8-bit images (32 - 8 - 2 bits, Resample.c)
_PRECISION_BITS = 22


@functools.lru_cache(maxsize=32)
def pil_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's bilinear resampling of one axis as an (out_size, in_size) matrix.

    The fixed-point weights Pillow (Resample.c, ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc``) computes for 8-bit images: integers scaled by
    2**22, antialiased (support widened by the scale) when shrinking. Computed
    in float64 in the same order as Pillow's C code, so the integers are the same.

    Returns
    -------
    np.ndarray
        (out_size, in_size) float64 holding integers; rows sum to about 2**22.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    ss = 1.0 / filterscale
    weights = np.zeros((out_size, ksize))
    total = np.zeros(out_size)
    for x in range(ksize):  # one tap at a time: the C code's summation order
        arg = np.abs((x + xmin - center + 0.5) * ss)
        w = np.where((x < xmax) & (arg < 1.0), 1.0 - arg, 0.0)
        weights[:, x] = w
        total += w
    weights = np.divide(weights, total[:, None], out=np.zeros_like(weights),
                        where=total[:, None] != 0.0)  # fmt: skip
    fixed = weights * (1 << _PRECISION_BITS)
    fixed = np.where(fixed < 0, np.trunc(fixed - 0.5), np.trunc(fixed + 0.5))
    matrix = np.zeros((out_size, in_size))
    rows = np.repeat(np.arange(out_size), ksize)
    cols = (xmin[:, None] + np.arange(ksize)[None]).ravel()
    valid = (np.arange(ksize)[None] < xmax[:, None]).ravel()
    matrix[rows[valid], cols[valid]] = fixed.ravel()[valid]
    return matrix


@functools.lru_cache(maxsize=8)
def _device_matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """:func:`pil_bilinear_matrix` transposed, (in_size, out_size), kept on ``device``
    (8 of them: at most 256 MB for 4096 px images; a stack needs two)."""
    return torch.as_tensor(pil_bilinear_matrix(in_size, out_size).T.copy(), device=device)


def _pil_pass(image: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Resample the last axis of a float64 tensor of 0..255 integers as Pillow does."""
    acc = image @ _device_matrix(in_size, out_size, image.device)  # exact: integers < 2**53
    return torch.floor((acc + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)).clamp_(0, 255)


def two_passes(image: torch.Tensor, h: int, w: int, vertical_first: bool) -> torch.Tensor:
    """Pillow's two passes resizing a (3, H, W) uint8 tensor to (3, h, w), each pass
    rounded to 8 bits; ``vertical_first`` chooses their order."""
    big_h, big_w = image.shape[1:]
    out = image.to(torch.float64)

    def horizontal(t):
        return _pil_pass(t, big_w, w) if w != big_w else t

    def vertical(t):
        return _pil_pass(t.transpose(1, 2), big_h, h).transpose(1, 2) if h != big_h else t

    out = horizontal(vertical(out)) if vertical_first else vertical(horizontal(out))
    return out.to(torch.uint8)


class PillowResize:
    """:func:`~napari_mobilesam.transforms.resize_longest_side` on a tensor, on its device.

    Which pass Pillow runs first depends on its release and on the sizes (recent
    releases shrink images more than twice as tall as wide vertically first), so the
    first image of each size is resized by Pillow on the host and the order that
    reproduces it is remembered, by this object, for the later ones (a stack's planes
    then run on the device). Safe to call from several threads.

    Parameters
    ----------
    long_side : int
        The longer side after resizing (the model's input size).
    max_sizes : int
        Image sizes whose pass order is remembered (all are forgotten beyond that).
    passes : callable
        :func:`two_passes` or a function of the same signature.
    """

    def __init__(self, long_side: int, max_sizes: int = 512, passes=two_passes) -> None:
        self.long_side = long_side
        self.max_sizes = max_sizes
        self.passes = passes
        #: (H, W) -> whether Pillow runs its vertical pass first (None: neither order
        #: reproduced it; such sizes stay with Pillow)
        self.pass_order: dict[tuple[int, int], bool | None] = {}
        self._lock = threading.Lock()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Resize a (3, H, W) uint8 RGB tensor; returns (3, h, w) uint8 on its device.

        Holds the image in float64 (24 bytes a pixel).
        """
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"PillowResize needs a (3, H, W) uint8 tensor, got {image.dtype} "
                f"{tuple(image.shape)}"
            )
        big_h, big_w = image.shape[1:]
        h, w = preprocess_shape(big_h, big_w, self.long_side)
        if (h, w) == (big_h, big_w):
            return image.clone()
        if h == big_h or w == big_w:  # one pass: no order to choose
            return self.passes(image, h, w, False)
        key = (big_h, big_w)
        with self._lock:
            known, vertical_first = key in self.pass_order, self.pass_order.get(key)
        if vertical_first is not None:
            return self.passes(image, h, w, vertical_first)
        rgb = image.permute(1, 2, 0).cpu().numpy()
        resized = np.require(resize_longest_side(rgb, self.long_side), requirements=["C", "W"])
        pillow = torch.from_numpy(resized).permute(2, 0, 1).to(image.device)
        if not known:
            horizontal_ok = torch.equal(self.passes(image, h, w, False), pillow)
            vertical_ok = torch.equal(self.passes(image, h, w, True), pillow)
            if horizontal_ok != vertical_ok or not horizontal_ok:  # else: this image cannot tell
                with self._lock:
                    if len(self.pass_order) >= self.max_sizes:
                        self.pass_order.clear()
                    self.pass_order[key] = vertical_ok if horizontal_ok != vertical_ok else None
        return pillow
