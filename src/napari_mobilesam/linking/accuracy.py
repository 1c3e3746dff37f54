"""How well tracks match the true ones: the fraction of correct links, division recall.

A track is judged by its links. Through a time series each true cell present at
frames ``t`` and ``t + 1`` makes one *continuation link*, and each daughter of a
division one *division link* (its mother's last frame to its own first). Per frame the
predicted objects are matched one-to-one to the true cells (Hungarian on IoU among the
pairs with IoU >= ``min_iou``: the linker's own overlap matching). A continuation link
is correct when the cell is matched at both frames, to objects of the same predicted
track; a division link when the daughter's object is
a track whose recorded parent is the track of the mother's object. A division is
recalled when both its links are correct.

This is what a tracking user checks by eye (does the id stay on the cell, is the
lineage right), the links of the Cell Tracking Challenge's TRA measure without its
weights. A perfect segmentation linked perfectly scores 1; a missed section costs the
two links through it, a swap of two cells' ids two links, a lost division its links.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .match import code_plane, iou, match_global, overlaps

__all__ = ["track_accuracy"]


def track_accuracy(
    labels: np.ndarray,
    parents: Mapping[int, int],
    truth: np.ndarray,
    true_parents: Mapping[int, int],
    *,
    min_iou: float = 0.5,
) -> dict:
    """Link accuracy and division recall of tracks against the true ones.

    Parameters
    ----------
    labels : np.ndarray
        (T, Y, X) or (T, Z, Y, X) integer track ids, 0 = background: the tracks judged.
    parents : mapping
        ``{track id: parent track id}`` of ``labels`` (divisions; a 0 or missing parent:
        none).
    truth : np.ndarray
        The true track ids, the same shape.
    true_parents : mapping
        ``{track id: parent track id}`` of ``truth``.
    min_iou : float
        A predicted object matches a true cell in a frame when their IoU is at least this
        (one-to-one, Hungarian); in (0, 1].

    Returns
    -------
    dict
        ``links`` (true links), ``links_correct``, ``link_accuracy`` (their ratio; nan
        without links), ``divisions``, ``divisions_found``, ``division_recall`` (nan
        without divisions), ``sections`` (true cells summed over frames),
        ``sections_matched`` and ``detection_recall``.

    Raises
    ------
    ValueError
        When the shapes differ, an array is not (T, Y, X) or (T, Z, Y, X), or
        ``min_iou`` is outside (0, 1].
    TypeError
        When an array is not integer.
    """
    labels, truth = np.asarray(labels), np.asarray(truth)
    for name, a in (("labels", labels), ("truth", truth)):
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array, got {a.dtype}")
        if a.ndim not in (3, 4):
            raise ValueError(f"{name} must be (T, Y, X) or (T, Z, Y, X), got shape {a.shape}")
    if labels.shape != truth.shape:
        raise ValueError(f"labels {labels.shape} and truth {truth.shape} differ in shape")
    if not 0 < min_iou <= 1:
        raise ValueError(f"min_iou must lie in (0, 1], got {min_iou!r}")
    matched = [_match(labels[t], truth[t], min_iou) for t in range(len(truth))]
    present = [set(_ids(frame)) for frame in truth]
    links = correct = 0
    for t in range(len(truth) - 1):
        for cell in present[t] & present[t + 1]:
            links += 1
            a, b = matched[t].get(cell), matched[t + 1].get(cell)
            correct += a is not None and a == b
    first = {}
    last = {}
    for t, cells in enumerate(present):
        for cell in cells:
            first.setdefault(cell, t)
            last[cell] = t
    daughters: dict[int, list[int]] = {}
    for child, parent in true_parents.items():
        if parent and child in first and parent in last:
            daughters.setdefault(int(parent), []).append(int(child))
    found = 0
    for mother, children in daughters.items():
        ok = 0
        for child in children:
            links += 1
            m = matched[last[mother]].get(mother)
            d = matched[first[child]].get(child)
            good = m is not None and d is not None and int(parents.get(d, 0) or 0) == m
            correct += good
            ok += good
        found += ok == len(children)
    sections = sum(len(p) for p in present)
    hit = sum(len(m) for m in matched)
    nan = float("nan")
    return {
        "links": links,
        "links_correct": int(correct),
        "link_accuracy": correct / links if links else nan,
        "divisions": len(daughters),
        "divisions_found": found,
        "division_recall": found / len(daughters) if daughters else nan,
        "sections": sections,
        "sections_matched": hit,
        "detection_recall": hit / sections if sections else nan,
    }


def _ids(frame: np.ndarray) -> list[int]:
    ids = np.unique(frame)
    return [int(i) for i in ids if i]


def _match(pred: np.ndarray, truth: np.ndarray, min_iou: float) -> dict[int, int]:
    """``{true id: predicted id}`` of one frame, one-to-one at IoU >= ``min_iou`` (the
    linker's own overlap matching)."""
    a, b = code_plane(pred), code_plane(truth)
    ia, ib, counts = overlaps(a, b)
    rows, cols = match_global(ia, ib, iou(a, b, ia, ib, counts), min_iou)
    return {int(b.ids[c - 1]): int(a.ids[r - 1]) for r, c in zip(rows, cols, strict=True)}
