"""Shared by the tests of extending linked 3D objects (library, batch tool, widget): a
stand-in for the prompted model, and segmentation that missed the cells' end sections."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def oracle(truth: np.ndarray | Callable[[int], np.ndarray], score: float = 0.9, calls=None):
    """``predict(z, boxes)``: the true section of plane z under each box's centre.

    ``truth``: a (Z, H, W) label stack, or ``truth(z)`` -> plane z's (H, W) labels. Each
    mask scores ``score``; ``calls`` (a list) gets ``(z, boxes)`` of every call.
    """

    def predict(z, boxes):
        if calls is not None:
            calls.append((z, np.asarray(boxes).copy()))
        plane = truth(z) if callable(truth) else truth[z]
        masks = []
        for x0, y0, x1, y1 in boxes:
            i = plane[int((y0 + y1) / 2), int((x0 + x1) / 2)]
            masks.append(plane == i if i else np.zeros(plane.shape, bool))
        return np.array(masks), np.full(len(boxes), score)

    return predict


def without_ends(truth: np.ndarray) -> np.ndarray:
    """``truth`` (..., Z, H, W) less the first and last section of every cell spanning
    three planes or more: what segment-everything typically misses."""
    found = truth.copy()
    for stack in found.reshape(-1, *truth.shape[-3:]):
        for i in np.unique(stack)[1:]:
            planes = np.flatnonzero((stack == i).any(axis=(1, 2)))
            if len(planes) >= 3:
                for z in (planes[0], planes[-1]):
                    stack[z][stack[z] == i] = 0
    return found
