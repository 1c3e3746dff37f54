"""Inputs of the ``mobilesam-everything`` tests: small cell images, the acceptance
folder of good and bad files, and the command's fast test flags."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage.draw import disk

#: Flags that make the command fast on the tiny and golden models: a 4 x 4 grid, every
#: mask kept.
FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def cells(shape, rng, n=5, dtype=np.uint8, hi=220):
    """A (Y, X) image of ``n`` bright discs (radius 6-13 px) on a dim, noisy background."""
    img = np.full(shape, 20, dtype=np.float64)
    for _ in range(n):
        r, c = rng.integers(15, shape[0] - 15), rng.integers(15, shape[1] - 15)
        img[disk((r, c), rng.integers(6, 14), shape=shape)] = rng.integers(90, hi)
    img += rng.normal(0, 3, shape)
    if np.issubdtype(dtype, np.integer):
        img = np.clip(img * (np.iinfo(dtype).max / 255), 0, np.iinfo(dtype).max)
    return img.astype(dtype)


def make_dataset(folder: Path, seed: int = 0) -> dict[str, tuple]:
    """The acceptance folder: PNG, JPEG, uint16 TIFF, 3-plane stack, OME-TIFF with
    channels, a corrupt and an empty file. Returns stem -> expected label shape."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.stack([cells((96, 128), rng) for _ in range(3)], axis=-1)
    Image.fromarray(rgb).save(folder / "a_rgb.png")
    Image.fromarray(cells((80, 100), rng)).save(folder / "b_gray.jpg", quality=95)
    tifffile.imwrite(folder / "c_u16.tif", cells((90, 110), rng, dtype=np.uint16))
    stack = np.stack([cells((64, 96), rng, dtype=np.uint16) for _ in range(3)])
    tifffile.imwrite(folder / "d_stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    ome = np.stack(
        [np.stack([cells((72, 80), rng, dtype=np.uint16) for _ in range(3)]) for _ in range(2)]
    )  # (Z=2, C=3, Y, X)
    tifffile.imwrite(folder / "e_chan.ome.tif", ome, metadata={"axes": "ZCYX"})
    (folder / "f_corrupt.tif").write_bytes(b"II*\x00" + os.urandom(300))
    (folder / "g_empty.png").write_bytes(b"")
    return {
        "a_rgb": (96, 128),
        "b_gray": (80, 100),
        "c_u16": (90, 110),
        "d_stack": (3, 64, 96),
        "e_chan": (2, 72, 80),
    }


#: The stems of :func:`make_dataset` that fail: a corrupt and an empty file.
BAD = ("f_corrupt", "g_empty")
