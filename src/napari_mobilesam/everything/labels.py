"""Label images from overlapping masks."""

from __future__ import annotations

import numpy as np


def masks_to_labels(
    crops: list[np.ndarray],
    boxes: np.ndarray,
    scores: np.ndarray,
    shape: tuple[int, int],
    *,
    min_visible: float = 0.0,
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
    min_visible : float in [0, 1]
        A mask keeps its id only if at least this fraction of its pixels is left
        visible once all masks are painted; the pixels of one that falls short become
        background (they are not handed to lower-scored masks). 0: any visible pixel
        keeps an id. It removes the slivers a mask leaves around better-scored ones
        that cover most of it (a mask of two touching cells, say).
    return_sources : bool
        Also return which mask each id came from.

    Returns
    -------
    labels : (H, W) uint32
        0 background, ids 1..M in decreasing priority (1 = best); masks that end up
        with no pixel of their own (or too few, ``min_visible``) get no id, so ids
        stay dense.
    sources : (M,) int64, only with ``return_sources``
        ``sources[k]`` is the index into ``crops`` of the mask painted as id ``k + 1``.
    """
    check_fraction(min_visible, "min_visible")
    labels = np.zeros(shape, dtype=np.uint32)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sources, visible, areas = [], [], []
    for i in order:
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        region = labels[y0 : y1 + 1, x0 : x1 + 1]
        free = crops[i] & (region == 0)
        n_free = int(np.count_nonzero(free))
        if n_free:
            sources.append(int(i))
            visible.append(n_free)
            areas.append(int(np.count_nonzero(crops[i])))
            region[free] = len(sources)
    sources = np.asarray(sources, dtype=np.int64)
    keep = np.asarray(visible, dtype=np.float64) >= min_visible * np.asarray(areas, np.float64)
    if not keep.all():
        remap = np.zeros(len(sources) + 1, dtype=np.uint32)
        remap[1:] = np.cumsum(keep) * keep
        labels = remap[labels]
        sources = sources[keep]
    if return_sources:
        return labels, sources
    return labels


def check_fraction(value: float, name: str) -> None:
    """Raise ValueError unless ``value`` is a number in [0, 1]."""
    if isinstance(value, bool) or not (isinstance(value, int | float) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
