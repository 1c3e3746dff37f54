"""Quality of a model on annotated images, measured the way users run it.

Everything goes through the public :class:`~napari_mobilesam.predictor.Predictor`
and :class:`~napari_mobilesam.everything.MaskGenerator` with their defaults, on the
images as stored (uint16 and other dtypes normalised by the predictor):

- **point mIoU**: one foreground click per object at its *centre* (the pixel
  farthest from the background, as SAM's paper evaluates single points), the best
  of the three masks by predicted IoU (the predictor's "best of 3");
- **random-point mIoU**: the same with a click drawn uniformly inside the object;
- **box mIoU**: the object's tight box, the single-mask output;
- **segment-everything**: precision, recall, F1 at IoU 0.5 and AP50 (ranked by
  predicted IoU) of ``MaskGenerator(points_per_side=...)`` at default thresholds.

Objects smaller than ``min_area`` pixels are left out of the prompt scores (a click
cannot be placed reliably inside a few pixels) but count as ground truth for
segment-everything.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from ..model import Sam
from .data import Example
from .metrics import average_precision, iou_matrix, mask_iou, match_counts

__all__ = ["centre_point", "evaluate"]


def centre_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the pixel of ``mask`` farthest from its background.

    Among equally deep pixels (a ridge, e.g. along an elongated cell), the one nearest
    their mean position.
    """
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if not len(rows):
        raise ValueError("centre_point needs a non-empty mask")
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask[r0:r1, c0:c1], 1)
    dist = ndimage.distance_transform_edt(crop)
    deepest = np.argwhere(dist == dist.max())
    r, c = deepest[np.argmin(((deepest - deepest.mean(0)) ** 2).sum(1))]
    return np.array([c - 1 + c0, r - 1 + r0], np.float64)


def _objects(labels: np.ndarray, min_area: int, limit: int | None, rng) -> list[int]:
    ids, counts = np.unique(labels, return_counts=True)
    ids = ids[(ids > 0) & (counts >= min_area)]
    if limit is not None and len(ids) > limit:
        ids = np.sort(rng.choice(ids, size=limit, replace=False))
    return [int(i) for i in ids]


#: per-object prompt scores: a click at the centre (the mask of the highest predicted IoU
#: of three; the best of the three by real IoU), a click at a random pixel of the object,
#: its bounding box
_PROMPT_SCORES = ("point", "point_oracle", "random_point", "box")


def _prompt_scores(predictor, labels: np.ndarray, ids: list[int], rng) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in _PROMPT_SCORES}
    if not ids:
        return out
    masks = [labels == i for i in ids]
    centres = np.stack([centre_point(m) for m in masks])[:, None]
    randoms = []
    for m in masks:
        ys, xs = np.nonzero(m)
        k = rng.integers(len(xs))
        randoms.append([xs[k], ys[k]])
    randoms = np.asarray(randoms, np.float64)[:, None]
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    boxes = np.asarray(boxes, np.float64)
    ones = np.ones((len(ids), 1), np.int64)
    for name, coords in (("point", centres), ("random_point", randoms)):
        pred, scores, _ = predictor.predict_batch(coords, ones, multimask_output=True)
        ious = np.array([[mask_iou(pred[b, k], m) for k in range(pred.shape[1])]
                         for b, m in enumerate(masks)])  # fmt: skip
        out[name] = list(ious[np.arange(len(masks)), scores.argmax(1)])
        if name == "point":  # what a perfect choice among the three would give
            out["point_oracle"] = list(ious.max(1))
    pred, _, _ = predictor.predict_batch(boxes=boxes, multimask_output=False)
    out["box"] = [mask_iou(pred[b, 0], m) for b, m in enumerate(masks)]
    return out


def evaluate(
    model: Sam,
    examples: Iterable[Example],
    *,
    points_per_side: int | None = 32,
    mode: str = "auto",
    min_area: int = 12,
    max_objects: int | None = 64,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Point, box and segment-everything scores of ``model`` on ``examples``.

    Parameters
    ----------
    model : Sam
        In eval mode, on the device to run on.
    examples : iterable of Example
    points_per_side : int or None
        Grid of segment-everything; None skips segment-everything.
    mode : str
        :class:`MaskGenerator`'s ``mode``.
    min_area : int
        Smallest object (pixels) prompted for the point and box scores.
    max_objects : int or None
        At most this many objects per image (a seeded random subset) for the point
        and box scores.
    seed : int
        Seeds the random points and subsets.

    Returns
    -------
    dict
        ``point_miou`` (a click at each object's centre, the mask of the highest predicted
        IoU of three), ``point_oracle_miou`` (the best of those three by real IoU: what a
        perfect choice gives), ``random_point_miou``, ``box_miou`` (means over objects),
        ``n_objects``, ``n_images``, and with segment-everything ``precision``,
        ``recall``, ``f1`` (pooled over images), ``ap50`` and ``n_found``.
    """
    from ..everything import MaskGenerator
    from ..predictor import Predictor

    rng = np.random.default_rng(seed)
    predictor = Predictor(model)
    generator = None
    if points_per_side is not None:
        generator = MaskGenerator(predictor, points_per_side=points_per_side, mode=mode)
    scores: dict[str, list[float]] = {name: [] for name in _PROMPT_SCORES}
    scored, tp, n_pred, n_true, n_images = [], 0, 0, 0, 0
    items = list(examples)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="evaluating", unit="image")
    for ex in items:
        n_images += 1
        predictor.set_image(ex.image)
        ids = _objects(ex.labels, min_area, max_objects, rng)
        for k, v in _prompt_scores(predictor, ex.labels, ids, rng).items():
            scores[k] += v
        if generator is not None:
            records = generator.generate(ex.image)
            ious = iou_matrix([r["segmentation"] for r in records], ex.labels)
            counts = match_counts(ious)
            tp += counts["tp"]
            n_pred += counts["n_pred"]
            n_true += counts["n_true"]
            scored.append((ious, np.array([r["predicted_iou"] for r in records])))
    out: dict[str, float] = {
        f"{name}_miou": float(np.mean(v)) if v else float("nan") for name, v in scores.items()
    }
    out.update(n_objects=float(len(scores["point"])), n_images=float(n_images))
    if generator is not None:
        precision = tp / n_pred if n_pred else float(n_true == 0)
        recall = tp / n_true if n_true else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.update(
            precision=precision,
            recall=recall,
            f1=f1,
            ap50=average_precision(scored),
            n_found=float(n_pred),
        )
    return out
