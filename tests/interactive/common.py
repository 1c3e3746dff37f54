"""Helpers shared by the PromptSession tests: small images and comparisons."""

from __future__ import annotations

import numpy as np
import torch
from skimage.draw import disk

from napari_mobilesam.interactive import Prediction
from napari_mobilesam.predictor import Predictor

H, W = 60, 80


def _disk_stack(n_planes: int, n_with_disk: int, dtype=np.uint16, value=1000) -> np.ndarray:
    """(n_planes, H, W): a bright disk moving right 2 px per plane; blank after n_with_disk."""
    stack = np.zeros((n_planes, H, W), dtype=dtype)
    for z in range(n_with_disk):
        rr, cc = disk((30, 30 + 2 * z), 12, shape=(H, W))
        stack[z, rr, cc] = value
    return stack


def _disk_mask(z: int = 0) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    rr, cc = disk((30, 30 + 2 * z), 12, shape=(H, W))
    mask[rr, cc] = True
    return mask


def _same_input(seen: list, ref: Predictor, image, **kwargs) -> None:
    """The encoder's last input equals what ``ref.set_image(image, **kwargs)`` feeds it."""
    got = seen[-1]
    ref.set_image(image, **kwargs)
    torch.testing.assert_close(got, seen.pop(), rtol=0, atol=0)


def _assert_same(prediction: Prediction, want) -> None:
    for got, exp in zip(
        (prediction.masks, prediction.scores, prediction.low_res), want, strict=True
    ):
        np.testing.assert_array_equal(got, exp)
