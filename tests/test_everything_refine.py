"""Box refinement (``MaskGenerator(refine_rounds=...)``, everything/refine.py).

Checked against a slow path written here from the predictor alone: the grid's seeds,
each seed's box prompted for one mask, the generator's filters and NMS.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mobilesam import synthetic
from napari_mobilesam.build import load_model
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.everything.boxes import nms
from napari_mobilesam.everything.generator import MAX_REFINE_ROUNDS
from napari_mobilesam.predictor import Predictor


@pytest.fixture(scope="module")
def standin():
    return load_model("vit_t_synthetic_cells")


@pytest.fixture(scope="module")
def cells():
    return synthetic.cells_2d((192, 192), seed=10_003).image


def _xyxy(record) -> list[float]:
    x, y, w, h = record["bbox"]
    return [x, y, x + w, y + h]  # inclusive, as the masks' boxes


def _slow_refined(model, image, grid, min_iou, iou_thresh, stab_thresh, offset=1.0):
    """One round of box refinement from the predictor: (masks, scores, points)."""
    seeds = MaskGenerator(model, points_per_side=grid, mode="reference",
                          pred_iou_thresh=min_iou, stability_score_thresh=0.0,
                          stability_score_offset=offset,
                          max_covered_fraction=1.0).generate(image)  # fmt: skip
    pred = Predictor(model)
    pred.set_image(image)
    boxes = np.array([_xyxy(r) for r in seeds], np.float64)
    logits, scores, _ = pred.predict_batch(boxes=boxes, multimask_output=False,
                                           return_logits=True)  # fmt: skip
    logits, scores = torch.from_numpy(logits[:, 0]), scores[:, 0]
    hi = (logits > offset).flatten(1).sum(1).float()
    lo = (logits > -offset).flatten(1).sum(1).float()
    stability = (hi / lo.clamp(min=1)).numpy()
    masks = (logits > 0).numpy()
    keep = (scores > iou_thresh) & (stability >= stab_thresh) & masks.any((1, 2))
    masks, scores = masks[keep], scores[keep]
    points = np.array([r["point_coords"][0] for r in seeds])[keep]
    out_boxes = []
    for m in masks:
        rows, cols = np.nonzero(m)
        out_boxes.append([cols.min(), rows.min(), cols.max(), rows.max()])
    order = nms(torch.tensor(out_boxes, dtype=torch.float32).reshape(-1, 4),
                torch.from_numpy(scores), 0.7).numpy()  # fmt: skip
    return masks[order], scores[order], points[order]


def _iou(a, b):
    return np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)


def test_one_round_is_each_seeds_box_prompted_again(standin, cells):
    """Reference mode with one round: every mask is the box prompt of a seed (a grid
    mask that passed ``refine_min_iou``), filtered and merged as the grid's masks are."""
    options = dict(pred_iou_thresh=0.8, stability_score_thresh=0.9)
    want, want_scores, want_points = _slow_refined(standin, cells, 6, 0.5, **{
        "iou_thresh": 0.8, "stab_thresh": 0.9})  # fmt: skip
    got = MaskGenerator(standin, points_per_side=6, mode="reference", refine_rounds=1,
                        refine_min_iou=0.5, max_covered_fraction=1.0,
                        **options).generate(cells)  # fmt: skip
    assert len(want) >= 3 and len(got) == len(want)
    for r, m, s, p in zip(got, want, want_scores, want_points, strict=True):
        assert _iou(r["segmentation"], m) > 0.99
        assert r["predicted_iou"] == pytest.approx(float(s), abs=1e-4)
        np.testing.assert_allclose(r["point_coords"][0], p)  # the seed's grid point


#: two rounds at thresholds that keep several cells of ``cells``
TWO_ROUNDS = dict(points_per_side=6, refine_rounds=2, pred_iou_thresh=0.8,
                  stability_score_thresh=0.9)  # fmt: skip


@pytest.fixture(scope="module")
def reference_two_rounds(standin, cells):
    return MaskGenerator(standin, mode="reference", **TWO_ROUNDS).generate(cells)


@pytest.mark.parametrize("mode", ["fast", "device"])
def test_other_modes_refine_as_reference_mode(standin, cells, reference_two_rounds, mode):
    """Fast and device modes, with box NMS, find every object reference mode finds
    (two rounds: the second round's prompts are the first round's masks' boxes)."""
    ref = reference_two_rounds
    other = MaskGenerator(standin, mode=mode, nms="box", **TWO_ROUNDS).generate(cells)
    assert len(ref) >= 3 and len(other) == len(ref)
    for a, b in zip(ref, other, strict=True):
        assert _iou(a["segmentation"], b["segmentation"]) > 0.98
        assert a["point_coords"][0] == pytest.approx(b["point_coords"][0])


def test_labels_and_progress_with_refinement(standin, cells, capsys):
    gen = MaskGenerator(standin, points_per_side=6, refine_rounds=1, progress=True,
                        pred_iou_thresh=0.8, stability_score_thresh=0.9)  # fmt: skip
    labels, info = gen.generate_labels(cells, return_info=True)
    assert labels.max() >= 3 and len(info["predicted_iou"]) == labels.max()
    assert "segment everything" in capsys.readouterr().err
    assert "box refinement (1 round)" in gen.describe()
    assert "box refinement (2 rounds)" in MaskGenerator(standin, refine_rounds=2).describe()
    assert "refinement" not in MaskGenerator(standin).describe()


def test_refinement_of_an_image_without_objects(standin):
    """Nothing passes the loose filter on a flat image: no rounds, no objects."""
    flat = np.zeros((64, 64), np.uint8)
    assert MaskGenerator(standin, points_per_side=4, refine_rounds=2,
                         refine_min_iou=1.0).generate(flat) == []  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"refine_rounds": -1}, "refine_rounds"),
        ({"refine_rounds": MAX_REFINE_ROUNDS + 1}, "refine_rounds"),
        ({"refine_rounds": 1.0}, "refine_rounds"),
        ({"refine_min_iou": 1.5}, "refine_min_iou"),
        ({"refine_min_iou": "high"}, "refine_min_iou"),
    ],
)
def test_bad_refinement_settings_are_refused(tiny_model, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MaskGenerator(tiny_model, **kwargs)
