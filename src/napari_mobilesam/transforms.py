"""Resize-longest-side and coordinate conversions.

This is the only module that converts between napari's (row, col) = (y, x)
order and SAM's (x, y) order. Coordinates are pixels: SAM treats (x, y) as a
pixel index and adds 0.5 itself to reach the pixel centre, napari puts pixel
centres at integer coordinates, so the two differ only in axis order.

Frames:
- *original*: pixels of the image the user gave, size (H, W);
- *input*: the image after resize-longest-side to ``long_side`` (h, w), before
  padding to (long_side, long_side); prompts go to the model in this frame.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size (h, w) of an (height, width) image resized so its longer side is ``long_side``.

    Rounds half up, as segment-anything does (a 770x769 image gives 1024x1023).
    The aspect ratio may be at most ``2 * long_side``:1 (2048:1 for 1024), or the
    shorter side would round to 0 pixels.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {(height, width)}")
    scale = long_side / max(height, width)
    h, w = int(height * scale + 0.5), int(width * scale + 0.5)
    if min(h, w) == 0:
        ratio = max(height, width) / min(height, width)
        raise ValueError(
            f"image of shape {(height, width)} has aspect ratio {ratio:g}:1, above the limit "
            f"of {2 * long_side}:1 for a {long_side}-pixel model input (its shorter side "
            "would shrink to 0 pixels); crop it into pieces or pad its shorter side"
        )
    return h, w


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize an RGB uint8 (H, W, 3) image so its longer side is ``long_side``.

    PIL bilinear on uint8, bit-identical to the reference predictor's resize.
    Returns (h, w, 3) uint8.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"resize_longest_side needs an RGB uint8 (H, W, 3) image, got {image.dtype} "
            f"{image.shape}; convert it with napari_mobilesam.normalize.to_rgb_uint8"
        )
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    if (h, w) == image.shape[:2]:
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


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


#: (H, W, long_side) -> whether Pillow runs its vertical pass first for that resize
#: (None: neither order reproduced it; such sizes stay with Pillow), learnt per size
_PASS_ORDER: dict[tuple[int, int, int], bool | None] = {}
_PASS_ORDER_SIZES = 512


def resize_longest_side_torch(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """:func:`resize_longest_side` on a tensor, on its device (e.g. the GPU).

    The same bytes as Pillow's bilinear resize: its fixed-point weights
    (:func:`pil_bilinear_matrix`) and its two passes, each rounded to uint8, as
    float64 matrix products whose integer sums are exact. Which pass Pillow runs
    first depends on its release and on the sizes (recent releases shrink images
    more than twice as tall as wide vertically first), so the first image of each
    size is resized by Pillow on the host and the order that reproduces it is
    remembered for the later ones (a stack's planes then run on the device). Holds
    the image in float64 (24 bytes a pixel).

    Parameters
    ----------
    image : torch.Tensor
        (3, H, W) uint8 RGB (channels first).
    long_side : int

    Returns
    -------
    torch.Tensor
        (3, h, w) uint8 on ``image``'s device.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"resize_longest_side_torch needs a (3, H, W) uint8 tensor, got {image.dtype} "
            f"{tuple(image.shape)}"
        )
    big_h, big_w = image.shape[1:]
    h, w = preprocess_shape(big_h, big_w, long_side)
    if (h, w) == (big_h, big_w):
        return image.clone()
    if h == big_h or w == big_w:  # one pass: no order to choose
        return _two_passes(image, h, w, vertical_first=False)
    key = (big_h, big_w, long_side)
    vertical_first = _PASS_ORDER.get(key)
    if vertical_first is not None:
        return _two_passes(image, h, w, vertical_first)
    rgb = image.permute(1, 2, 0).cpu().numpy()
    resized = np.require(resize_longest_side(rgb, long_side), requirements=["C", "W"])
    pillow = torch.from_numpy(resized).permute(2, 0, 1)
    pillow = pillow.to(image.device)
    if key not in _PASS_ORDER:
        horizontal_ok = torch.equal(_two_passes(image, h, w, False), pillow)
        vertical_ok = torch.equal(_two_passes(image, h, w, True), pillow)
        if horizontal_ok != vertical_ok or not horizontal_ok:  # else: this image cannot tell
            if len(_PASS_ORDER) >= _PASS_ORDER_SIZES:
                _PASS_ORDER.clear()
            _PASS_ORDER[key] = vertical_ok if horizontal_ok != vertical_ok else None
    return pillow


def _two_passes(image: torch.Tensor, h: int, w: int, vertical_first: bool) -> torch.Tensor:
    """Pillow's two passes on a (3, H, W) uint8 tensor, each rounded to 8 bits."""
    big_h, big_w = image.shape[1:]
    out = image.to(torch.float64)

    def horizontal(t):
        return _pil_pass(t, big_w, w) if w != big_w else t

    def vertical(t):
        return _pil_pass(t.transpose(1, 2), big_h, h).transpose(1, 2) if h != big_h else t

    out = horizontal(vertical(out)) if vertical_first else vertical(horizontal(out))
    return out.to(torch.uint8)


def _scale_xy(original_size: tuple[int, int], long_side: int) -> tuple[float, float]:
    h, w = original_size
    new_h, new_w = preprocess_shape(h, w, long_side)
    return new_w / w, new_h / h


def apply_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Map (..., 2) (x, y) points from the original frame to the input frame (float64)."""
    sx, sy = _scale_xy(original_size, long_side)
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] *= sx
    out[..., 1] *= sy
    return out


def apply_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Map (..., 4) XYXY boxes from the original frame to the input frame."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return apply_coords(boxes.reshape(-1, 2, 2), original_size, long_side).reshape(boxes.shape)


def apply_coords_torch(
    coords: torch.Tensor, original_size: tuple[int, int], long_side: int
) -> torch.Tensor:
    """Torch version of :func:`apply_coords` (keeps device, float dtype)."""
    sx, sy = _scale_xy(original_size, long_side)
    out = coords.to(torch.float32 if not coords.is_floating_point() else coords.dtype).clone()
    out[..., 0] *= sx
    out[..., 1] *= sy
    return out


def apply_boxes_torch(
    boxes: torch.Tensor, original_size: tuple[int, int], long_side: int
) -> torch.Tensor:
    """Torch version of :func:`apply_boxes`."""
    return apply_coords_torch(boxes.reshape(-1, 2, 2), original_size, long_side).reshape(
        boxes.shape
    )


class ResizeLongestSide:
    """The resize and coordinate mapping of one model input size.

    Same methods as segment-anything's ``ResizeLongestSide`` so ported code keeps
    working (``predictor.transform.apply_coords(...)``).
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        return resize_longest_side(image, self.target_length)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        return apply_coords(coords, original_size, self.target_length)

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        return apply_boxes(boxes, original_size, self.target_length)

    def apply_coords_torch(
        self, coords: torch.Tensor, original_size: tuple[int, int]
    ) -> torch.Tensor:
        return apply_coords_torch(coords, original_size, self.target_length)

    def apply_boxes_torch(
        self, boxes: torch.Tensor, original_size: tuple[int, int]
    ) -> torch.Tensor:
        return apply_boxes_torch(boxes, original_size, self.target_length)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        return preprocess_shape(oldh, oldw, long_side_length)


# --- napari (row, col) <-> SAM (x, y) ---------------------------------------------


def rc_to_xy(points_rc: np.ndarray) -> np.ndarray:
    """napari points (N, 2) as (row, col) -> SAM points (N, 2) as (x, y), float64."""
    pts = np.asarray(points_rc, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) as (row, col), got {pts.shape}")
    return pts[:, ::-1].copy()


def xy_to_rc(points_xy: np.ndarray) -> np.ndarray:
    """SAM points (N, 2) as (x, y) -> napari points (N, 2) as (row, col), float64."""
    pts = np.asarray(points_xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) as (x, y), got {pts.shape}")
    return pts[:, ::-1].copy()


def corners_rc_to_xyxy(corners_rc: np.ndarray) -> np.ndarray:
    """napari rectangle / any corner set (K, 2) as (row, col) -> XYXY box (4,).

    The box is the axis-aligned bounding box of the corners:
    ``[min col, min row, max col, max row]``.
    """
    c = np.asarray(corners_rc, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2 or c.shape[0] < 2:
        raise ValueError(f"box corners must have shape (K>=2, 2) as (row, col), got {c.shape}")
    (r0, c0), (r1, c1) = c.min(axis=0), c.max(axis=0)
    return np.array([c0, r0, c1, r1])


def xyxy_to_corners_rc(box: np.ndarray) -> np.ndarray:
    """XYXY box (4,) -> napari rectangle corners (4, 2) as (row, col), clockwise."""
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64).reshape(4)
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
