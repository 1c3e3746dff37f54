"""Label images from overlapping masks."""

from __future__ import annotations

import numpy as np


def masks_to_labels(
    crops: list[np.ndarray],
    boxes: np.ndarray,
    scores: np.ndarray,
    shape: tuple[int, int],
    *,
    return_sources: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Paint crop masks into an (H, W) uint32 label image without overlaps.

    Parameters
    ----------
    crops : list of (h_i, w_i) bool arrays
        Each mask restricted to its inclusive XYXY box.
    boxes : (N, 4) int
        Inclusive XYXY boxes in image pixels.
    scores : (N,) float
        Priority: where masks overlap, the higher score wins; ties go to the
        earlier mask.
    shape : (H, W)
    return_sources : bool
        Also return which mask each id came from.

    Returns
    -------
    labels : (H, W) uint32
        0 background, ids 1..M in decreasing priority (1 = best); masks that end up
        with no pixel of their own get no id, so ids stay dense.
    sources : (M,) int64, only with ``return_sources``
        ``sources[k]`` is the index into ``crops`` of the mask painted as id ``k + 1``.
    """
    labels = np.zeros(shape, dtype=np.uint32)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sources = []
    for i in order:
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        region = labels[y0 : y1 + 1, x0 : x1 + 1]
        free = crops[i] & (region == 0)
        if free.any():
            sources.append(int(i))
            region[free] = len(sources)
    if return_sources:
        return labels, np.asarray(sources, dtype=np.int64)
    return labels
