"""Resize-longest-side and coordinate conversions.

This is the only module that converts between napari's (row, col) = (y, x)
order and SAM's (x, y) order. Coordinates are pixels: SAM treats (x, y) as a
pixel index and adds 0.5 itself to reach the pixel centre, napari puts pixel
centres at integer coordinates, so the two differ only in axis order.

Frames:
- *original*: pixels of the image the user gave, size (H, W);
- *input*: the image after resize-longest-side to ``long_side`` (h, w), before
  padding to (long_side, long_side); prompts go to the model in this frame.

``long_side`` is the model's input size S, except for a small image with an upscale
limit (:func:`input_long_side`): it is then resized to a shorter side and the rest of
the (S, S) input is padding.
"""

from __future__ import annotations

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


def input_long_side(
    height: int, width: int, model_size: int, max_upscale: float | None = None
) -> int:
    """The longer side, in the model's input, of an (height, width) image.

    SAM resizes every image so that its longer side is the model's input size S
    (``model_size``): a 256 px image is enlarged 4 times. With ``max_upscale`` an image
    is enlarged at most that many times (never shrunk by it); the rest of the (S, S)
    input is padding. Objects of a small image then keep the size, in the model's
    input, that a model trained on larger images saw.

    Parameters
    ----------
    height, width : int
        Image size in pixels.
    model_size : int
        The model's input size S (1024 for SAM models).
    max_upscale : float, optional
        At least 1; None: no limit (SAM's resize).

    Returns
    -------
    int
        ``model_size``, or ``round(max(height, width) * max_upscale)`` when that is
        smaller.
    """
    check_max_upscale(max_upscale)
    if max_upscale is None:
        return model_size
    return min(model_size, int(max(height, width) * max_upscale + 0.5))


def check_max_upscale(max_upscale: float | None) -> None:
    """Raise ValueError unless ``max_upscale`` is None or a finite number >= 1."""
    if max_upscale is None:
        return
    number = isinstance(max_upscale, (int, float, np.integer, np.floating))
    ok = number and not isinstance(max_upscale, bool)
    if not ok or not (1.0 <= float(max_upscale) < float("inf")):
        raise ValueError(
            f"max_upscale must be a number >= 1 (how many times a small image may be "
            f"enlarged) or None (no limit), got {max_upscale!r}"
        )


def max_upscale_option(text: str | None, default: float | None) -> float | None:
    """The upscale limit a command-line option asks for.

    Parameters
    ----------
    text : str or None
        The option's text: a number >= 1, ``"none"`` (no limit: enlarge to the model's
        input size, as SAM does) or None (not given).
    default : float or None
        What an option not given means: the model's default
        (:attr:`napari_mobilesam.registry.ModelInfo.max_upscale`).

    Returns
    -------
    float or None
        The limit for :class:`~napari_mobilesam.predictor.Predictor`; None: no limit.

    Raises
    ------
    ValueError
        ``text`` is neither ``"none"`` nor a finite number >= 1.
    """
    if text is None:
        return default
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1 <= value < float("inf"):  # NaN too
        raise ValueError(f"{text}: give a finite number >= 1, or none (no limit)")
    return value


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize an RGB uint8 (H, W, 3) image so its longer side is ``long_side``.

    PIL bilinear on uint8, bit-identical to the reference predictor's resize
    (:class:`napari_mobilesam.accel.resize.PillowResize` gives the same bytes on a GPU).
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
