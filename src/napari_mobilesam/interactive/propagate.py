"""Following an object through neighbouring planes of a stack.

Plane by plane away from the start, the previous plane's mask becomes the prompt: its
bounding box widened by 10% of its height / width on each side (clipped to the plane)
and a positive point at its most interior pixel, single-mask output. The walk stops at
the first plane whose mask is empty, scores too low, or changes area too much.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..validation import as_float, check_int
from .prompts import Prediction

__all__ = ["PropagationRule", "check_axis", "follow", "mask_prompt"]

#: segment(index, points_rc (1, 2), box_rc (4,), mask_input (1, h, w) or None) -> Prediction
Segment = Callable[[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray | None], Prediction]


def mask_prompt(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The prompt that stands for a mask on the next plane.

    Parameters
    ----------
    mask : np.ndarray
        (H, W) bool, not empty.

    Returns
    -------
    box_rc : np.ndarray
        (4,) float64 ``(r0, c0, r1, c1)``: the mask's bounding box widened by 10% of its
        height / width per side, clipped to the plane.
    point_rc : np.ndarray
        (2,) float64 (row, col) of the mask's most interior pixel (the maximum of the
        Euclidean distance to the background; the plane's border is no edge).
    """
    from scipy import ndimage

    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    dr, dc = 0.1 * (r1 - r0 + 1), 0.1 * (c1 - c0 + 1)
    box = np.array(
        [max(r0 - dr, 0.0), max(c0 - dc, 0.0), min(r1 + dr, h - 1.0), min(c1 + dc, w - 1.0)]
    )
    # pad so that pixels on the image border count as interior only up to the border
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    point = np.array(np.unravel_index(int(np.argmax(dist)), mask.shape), dtype=np.float64)
    return box, point


@dataclass(frozen=True)
class PropagationRule:
    """When a plane's mask is accepted, and how far to walk.

    Attributes
    ----------
    direction : {1, -1, 0}
        Towards higher indices, lower indices, or both (0: higher first).
    min_score : float
        Lowest predicted IoU accepted.
    min_area_ratio : float
        In (0, 1]: the largest allowed shrink factor (and its inverse the largest growth)
        of the area from one plane to the next.
    max_planes : int or None
        At most this many planes per direction.
    use_mask_input : bool
        Also give the previous plane's low-res logits as ``mask_input`` (none for the
        first step). Off by default: SAM learnt mask prompts from its own earlier output
        on the *same* image, and logits from another plane are reported not to help in
        practice.
    """

    direction: int = 0
    min_score: float = 0.7
    min_area_ratio: float = 0.3
    max_planes: int | None = None
    use_mask_input: bool = False

    def __post_init__(self):
        if self.direction not in (-1, 0, 1) or isinstance(self.direction, bool):
            raise ValueError(f"direction must be 1, -1 or 0 (both), got {self.direction!r}")
        object.__setattr__(self, "min_score", as_float(self.min_score, "min_score"))
        ratio = as_float(self.min_area_ratio, "min_area_ratio")
        if not 0 < ratio <= 1:
            raise ValueError(f"min_area_ratio must be in (0, 1], got {self.min_area_ratio!r}")
        object.__setattr__(self, "min_area_ratio", ratio)
        if self.max_planes is not None:
            try:
                limit = check_int(self.max_planes, "max_planes", minimum=0)
            except TypeError:
                raise TypeError(
                    f"max_planes must be an int or None, got {self.max_planes!r}"
                ) from None
            object.__setattr__(self, "max_planes", limit)

    def accepts(self, mask: np.ndarray, score: float, previous_area: int) -> bool:
        """Whether a plane's (H, W) bool mask and score continue the walk."""
        area = int(mask.sum())
        ratio = area / previous_area
        return (
            area > 0
            and score >= self.min_score
            and self.min_area_ratio <= ratio <= 1 / self.min_area_ratio
        )


def follow(
    start: tuple[int, ...],
    mask: np.ndarray,
    axis: int,
    plane_shape: tuple[int, ...],
    segment: Segment,
    rule: PropagationRule,
    *,
    progress: Callable[[tuple[int, ...], float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[tuple[int, ...], np.ndarray]:
    """Walk from ``start`` along ``axis``, segmenting each plane from the previous mask.

    Parameters
    ----------
    start : tuple of int
        Plane index of ``mask`` (checked by the caller).
    mask : np.ndarray
        (H, W) bool, non-empty: the object on ``start``.
    axis : int
        Which plane axis to walk along, ``0 <= axis < len(plane_shape)``.
    plane_shape : tuple of int
        Sizes of the plane axes.
    segment : callable
        ``segment(index, points_rc, box_rc, mask_input) -> Prediction``: single-mask
        prediction on plane ``index``; ``points_rc`` is (1, 2), ``box_rc`` (4,).
    rule : PropagationRule
    progress : callable(index, score), optional
        Called after each accepted plane.
    should_stop : callable() -> bool, optional
        Checked before each plane; True stops.

    Returns
    -------
    dict
        ``{plane index: (H, W) bool mask}`` for the accepted planes, ``start`` excluded,
        in the order they were found.
    """
    steps = (1, -1) if rule.direction == 0 else (rule.direction,)
    size = plane_shape[axis]
    limit = size if rule.max_planes is None else rule.max_planes
    found: dict[tuple[int, ...], np.ndarray] = {}
    for step in steps:
        prev_mask, prev_logits = mask, None
        pos = start[axis]
        for _ in range(limit):
            pos += step
            if not 0 <= pos < size or (should_stop is not None and should_stop()):
                break
            idx = (*start[:axis], pos, *start[axis + 1 :])
            box_rc, point_rc = mask_prompt(prev_mask)
            mask_input = prev_logits if rule.use_mask_input else None
            pred = segment(idx, point_rc[None], box_rc, mask_input)
            if not rule.accepts(pred.mask, pred.score, int(prev_mask.sum())):
                break
            found[idx] = pred.mask
            prev_mask, prev_logits = pred.mask, pred.mask_input
            if progress is not None:
                progress(idx, pred.score)
    return found


def check_axis(axis, plane_shape: tuple[int, ...]) -> int:
    """A plane axis index for :func:`follow`.

    Raises
    ------
    TypeError
        When ``axis`` is not an int.
    ValueError
        When it does not index a plane axis.
    """
    axis = check_int(axis, "axis")
    n_axes = len(plane_shape)
    if not 0 <= axis < n_axes:
        raise ValueError(
            f"axis must index a plane axis in [0, {n_axes}) (plane shape {plane_shape}), got {axis}"
        )
    return axis
