"""Prompts in napari's (row, col) order, checked and converted to SAM's (x, y), and the
masks they give.

Points are (row, col) = (y, x) pixels of the plane; a box is two opposite corners
``(r0, c0, r1, c1)`` in any order, or K >= 2 corner points such as a napari rectangle.
They are converted with :mod:`napari_mobilesam.transforms` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..transforms import corners_rc_to_xyxy, rc_to_xy
from ..validation import check_int, check_points, finite_array

__all__ = ["ObjectPrompt", "Prediction", "SamPrompt", "batches", "check_choice", "pick", "to_sam"]


@dataclass
class Prediction:
    """Candidate masks for one object's prompts, and the one chosen.

    Attributes
    ----------
    masks : np.ndarray or CandidateMasks
        (K, H, W) bool candidate masks at the plane's size (K = 3 with multimask
        output, else 1); :meth:`PromptSession.predict` gives a
        :class:`~.candidates.CandidateMasks`, which upsamples a candidate when it is
        first read (``np.asarray`` gives them all).
    scores : np.ndarray
        (K,) float32 predicted IoU of each candidate.
    low_res : np.ndarray
        (K, h, w) float32 low-resolution logits ((K, 256, 256) for SAM models).
    choice : int
        Index of the chosen candidate, ``0 <= choice < K``.
    window : (r0, c0, r1, c1) or None
        On a tiled plane, the tile (plane pixels, exclusive ends) whose frame ``low_res``
        is in: give :attr:`mask_input` back only with prompts answered from that tile.
        None: the whole plane.
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res: np.ndarray
    choice: int
    window: tuple[int, int, int, int] | None = None

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the chosen mask."""
        return self.masks[self.choice]

    @property
    def score(self) -> float:
        """Predicted IoU of the chosen mask."""
        return float(self.scores[self.choice])

    @property
    def stability(self) -> float:
        """Stability score of the chosen mask: the IoU of its low-resolution logits
        thresholded at +1 and -1 (the masks' threshold 0 +- 1, as segment-everything's
        fast mode scores masks); NaN for logits all <= -1."""
        logits = np.asarray(self.low_res[self.choice], dtype=np.float32)
        union = int(np.count_nonzero(logits > -1.0))
        return float(np.count_nonzero(logits > 1.0) / union) if union else float("nan")

    @property
    def mask_input(self) -> np.ndarray:
        """(1, h, w) float32 logits of the chosen mask, to refine it with ``mask_input=``."""
        return self.low_res[self.choice][None]


@dataclass(frozen=True)
class ObjectPrompt:
    """The prompts of one object, in napari's order, for
    :meth:`~napari_mobilesam.interactive.PromptSession.predict_many`.

    Attributes
    ----------
    points_rc : (N, 2) array_like, optional
        Points as (row, col) pixels of the plane.
    labels : (N,) array_like, optional
        1 = foreground, 0 = background; default all 1.
    box_rc : (4,) or (K, 2) array_like, optional
        Two opposite corners ``(r0, c0, r1, c1)``, or K >= 2 corner points (row, col).
    """

    points_rc: object = None
    labels: object = None
    box_rc: object = None


@dataclass(frozen=True)
class SamPrompt:
    """One object's prompts checked and in SAM's frame.

    Attributes
    ----------
    points_xy : (N, 2) float64 array or None
        (x, y) pixels.
    labels : (N,) int64 array or None
    box_xyxy : (4,) float64 array or None
        XYXY pixels.
    """

    points_xy: np.ndarray | None
    labels: np.ndarray | None
    box_xyxy: np.ndarray | None

    @property
    def n_prompts(self) -> int:
        """Points plus one for a box."""
        return (0 if self.points_xy is None else len(self.points_xy)) + (self.box_xyxy is not None)


def to_sam(points_rc=None, labels=None, box_rc=None) -> SamPrompt:
    """Check one object's napari prompts and convert them to SAM's frame.

    Parameters
    ----------
    points_rc, labels, box_rc
        As in :class:`ObjectPrompt`.

    Returns
    -------
    SamPrompt

    Raises
    ------
    ValueError
        For malformed points, labels or box, or when there is no prompt at all.
    """
    points, lab = check_points(
        points_rc, labels, coords_name="points_rc", labels_name="labels",
        order="(row, col)", default_label=1,
    )  # fmt: skip
    box_xyxy = None
    if box_rc is not None:
        box = finite_array(box_rc, "box_rc")
        if box.shape == (4,):
            box = box.reshape(2, 2)
        if box.ndim != 2 or box.shape[1] != 2 or box.shape[0] < 2:
            raise ValueError(
                f"box_rc must have shape (4,) as (r0, c0, r1, c1) or (K>=2, 2) corners as "
                f"(row, col), got {box.shape}"
            )
        box_xyxy = corners_rc_to_xyxy(box)
    if points is None and box_xyxy is None:
        raise ValueError("predict needs a prompt: give points_rc and/or box_rc")
    return SamPrompt(None if points is None else rc_to_xy(points), lab, box_xyxy)


def check_choice(choice) -> int | str:
    """``"best"`` or an int (any, taken modulo the number of candidates).

    Raises
    ------
    TypeError
        For anything else.
    """
    if isinstance(choice, str) and choice == "best":
        return choice
    try:
        return check_int(choice, "choice")
    except TypeError:
        raise TypeError(f"choice must be 'best' or an int, got {choice!r}") from None


def pick(scores: np.ndarray, choice: int | str) -> int:
    """The index ``choice`` means among candidates with these (K,) scores."""
    return int(np.argmax(scores)) if isinstance(choice, str) else int(choice) % len(scores)


def batches(prompts: list[SamPrompt]) -> list[tuple[list[int], tuple]]:
    """Group objects whose prompts have the same form, for one decoder call per group.

    Parameters
    ----------
    prompts : list of SamPrompt

    Returns
    -------
    list of (members, (point_coords, point_labels, boxes))
        ``members`` indexes ``prompts``; the arrays are ``Predictor.predict_batch``'s
        (B, N, 2), (B, N) and (B, 4), or None where the group has no points / no box.
    """
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, p in enumerate(prompts):
        n_points = 0 if p.points_xy is None else len(p.points_xy)
        groups.setdefault((n_points, p.box_xyxy is not None), []).append(i)
    out = []
    for (n_points, has_box), members in groups.items():
        points = np.stack([prompts[i].points_xy for i in members]) if n_points else None
        labels = np.stack([prompts[i].labels for i in members]) if n_points else None
        boxes = np.stack([prompts[i].box_xyxy for i in members]) if has_box else None
        out.append((members, (points, labels, boxes)))
    return out
