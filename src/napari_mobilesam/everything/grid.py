"""Point grids, crop boxes and tiles: where segment-everything prompts and looks.

Points are (x, y); boxes are XYXY in pixels, ``x1``/``y1`` exclusive for crop
boxes (``image[y0:y1, x0:x1]``), as in segment-anything.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) points (x, y) in [0, 1], the centres of an n x n grid of cells, row-major."""
    if n_per_side < 1:
        raise ValueError(f"points_per_side must be >= 1, got {n_per_side}")
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """One normalised grid per crop layer; layer i has ``n_per_side / scale**i`` per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes of segment-anything's multi-scale scheme and their layer index.

    Layer 0 is the whole image; layer i >= 1 splits it into 2**i x 2**i
    overlapping crops. ``im_size`` is (H, W); boxes are XYXY with exclusive ends.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops)

    for i_layer in range(n_layers):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w = crop_len(im_w, n, overlap)
        crop_h = crop_len(im_h, n, overlap)
        xs = [int((crop_w - overlap) * i) for i in range(n)]
        ys = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(xs, ys):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i_layer + 1)
    return boxes, layers


def generate_tiles(im_size: tuple[int, int], tile_size: int, overlap: int) -> list[list[int]]:
    """Overlapping tiles covering an (H, W) image, XYXY with exclusive ends, row-major.

    Tiles are ``tile_size`` square (smaller only when the image is), consecutive
    tiles share at least ``overlap`` pixels, and the last tile of a row/column
    ends exactly at the image border.
    """
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"tile_overlap must be in [0, tile_size), got {overlap}")
    im_h, im_w = im_size

    def starts(length: int) -> list[int]:
        if length <= tile_size:
            return [0]
        n = math.ceil((length - overlap) / (tile_size - overlap))
        # spread the n tiles evenly; the overlap only grows
        return [round(i * (length - tile_size) / (n - 1)) for i in range(n)]

    return [
        [x0, y0, min(x0 + tile_size, im_w), min(y0 + tile_size, im_h)]
        for y0 in starts(im_h)
        for x0 in starts(im_w)
    ]
