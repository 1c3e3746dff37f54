"""Masks mostly inside better-scored ones (``max_covered_fraction``, :mod:`.covered`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.everything.covered import covered_masks, covered_on_device
from napari_mobilesam.everything.masks import tight_crop

SHAPE = (20, 30)
ALL_PASS = {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def _mask(y0, y1, x0, x1):
    m = np.zeros(SHAPE, bool)
    m[y0:y1, x0:x1] = True
    return m


def _drop(masks, scores, max_covered):
    crops, boxes = [], []
    for m in masks:
        crop, box = tight_crop(m, 0, 0)
        crops.append(crop)
        boxes.append(box)
    return covered_masks(crops, np.array(boxes), np.array(scores, float), SHAPE, max_covered)


def test_a_part_inside_a_better_scored_whole_is_dropped():
    cell = _mask(2, 12, 2, 12)  # 100 px
    part = _mask(2, 7, 2, 12)  # 50 px, all inside the cell
    other = _mask(2, 12, 15, 25)  # elsewhere
    assert _drop([part, cell, other], [0.8, 0.9, 0.7], 0.5).tolist() == [True, False, False]
    # the part scored higher is kept, and the whole is then covered by half only
    assert _drop([part, cell], [0.95, 0.9], 0.5).tolist() == [False, False]
    assert _drop([part, cell], [0.95, 0.9], 0.4).tolist() == [False, True]


def test_the_threshold_is_a_fraction_of_the_masks_own_pixels():
    a = _mask(0, 10, 0, 10)
    b = _mask(0, 10, 5, 15)  # half of it inside a
    assert _drop([a, b], [0.9, 0.8], 0.5).tolist() == [False, False]  # not more than half
    assert _drop([a, b], [0.9, 0.8], 0.49).tolist() == [False, True]
    assert _drop([a, b], [0.9, 0.8], 1.0).tolist() == [False, False]
    assert _drop([a, _mask(0, 10, 10, 20)], [0.9, 0.8], 0.0).tolist() == [False, False]
    assert _drop([a, _mask(0, 10, 9, 20)], [0.9, 0.8], 0.0).tolist() == [False, True]


def test_only_kept_masks_cover():
    """A dropped mask covers nothing: a mask under it alone stays."""
    a = _mask(0, 10, 0, 10)
    b = _mask(0, 10, 2, 14)  # 80 of 120 px inside a: dropped
    c = _mask(0, 10, 10, 14)  # inside b only
    assert _drop([a, b, c], [0.9, 0.8, 0.7], 0.5).tolist() == [False, True, False]


def test_ties_go_to_the_earlier_mask():
    a = _mask(0, 10, 0, 10)
    copy = a.copy()
    assert _drop([a, copy], [0.9, 0.9], 0.5).tolist() == [False, True]
    assert _drop([copy, a], [0.9, 0.9], 0.5).tolist() == [False, True]


def test_no_masks():
    assert covered_masks([], np.zeros((0, 4)), np.zeros(0), SHAPE, 0.5).shape == (0,)


@pytest.mark.parametrize("value", [-0.1, 1.5, "half", None, True])
def test_the_fraction_must_be_in_0_1(value):
    with pytest.raises(ValueError, match=r"max_covered must be a number in \[0, 1\]"):
        covered_masks([], np.zeros((0, 4)), np.zeros(0), SHAPE, value)
    with pytest.raises(ValueError, match=r"max_covered must be a number in \[0, 1\]"):
        covered_on_device(torch.zeros(0, *SHAPE, dtype=torch.bool), torch.zeros(0), value)


def test_inconsistent_inputs_are_named():
    crop = np.ones((3, 3), bool)
    with pytest.raises(ValueError, match="differ in length: 1, 2, 1"):
        covered_masks([crop], np.zeros((2, 4), int), np.zeros(1), SHAPE, 0.5)
    with pytest.raises(ValueError, match=r"mask 0 is 3 x 3 but its box \[0, 0, 3, 3\] holds 4 x 4"):
        covered_masks([crop], np.array([[0, 0, 3, 3]]), np.zeros(1), SHAPE, 0.5)


@pytest.mark.parametrize("max_covered", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_device_version_equals_the_host_version(max_covered):
    rng = np.random.default_rng(1)
    masks = []
    for _ in range(40):
        y, x = rng.integers(0, SHAPE[0] - 3), rng.integers(0, SHAPE[1] - 3)
        h, w = rng.integers(2, 10, size=2)
        masks.append(_mask(y, y + h, x, x + w))
    scores = rng.random(40).round(1)  # ties among them
    want = _drop(masks, scores, max_covered)
    got = covered_on_device(torch.from_numpy(np.stack(masks)), torch.from_numpy(scores),
                            max_covered)  # fmt: skip
    assert got.dtype == torch.bool
    np.testing.assert_array_equal(got.numpy(), want)
    if max_covered == 0.5:
        assert 0 < want.sum() < 40


def _coverage(records):
    """Each record's fraction inside the better-scored records listed before it."""
    order = sorted(range(len(records)), key=lambda i: -records[i]["predicted_iou"])
    union = np.zeros_like(records[0]["segmentation"])
    out = {}
    for i in order:
        seg = records[i]["segmentation"]
        out[i] = np.count_nonzero(seg & union) / max(np.count_nonzero(seg), 1)
        union |= seg
    return out


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_generator_drops_covered_records_by_default(tiny_model, mode):
    """Random weights give masks that overlap a lot: by default no record lies more than
    half inside better-scored ones, and the records are those of ``max_covered_fraction=1``
    that pass this rule."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    # (no NMS: many overlapping masks)
    kw = dict(ALL_PASS, mode=mode, nms="box", box_nms_thresh=1.0)
    every = MaskGenerator(tiny_model, **kw, max_covered_fraction=1.0).generate(image)
    default = MaskGenerator(tiny_model, **kw).generate(image)
    assert 0 < len(default) < len(every)
    assert max(_coverage(default).values()) <= 0.5
    assert max(_coverage(every).values()) > 0.5
    # the same records, in the same order, minus the covered ones
    crops, boxes = [], []
    for r in every:  # (reference mode keeps empty masks: they cover nothing)
        crop, box = tight_crop(r["segmentation"], 0, 0) or (np.zeros((1, 1), bool), [0] * 4)
        crops.append(crop)
        boxes.append(box)
    scores = np.array([r["predicted_iou"] for r in every])
    drop = covered_masks(crops, np.array(boxes), scores, image.shape[:2], 0.5)
    kept = [r for r, d in zip(every, drop, strict=True) if not d]
    assert len(kept) == len(default)
    for a, b in zip(kept, default, strict=True):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
        assert a["predicted_iou"] == b["predicted_iou"]


def test_device_mode_labels_equal_reference_mode_labels():
    """Device mode drops covered masks on the device (one crop, no region cleanup): the
    same label image as reference mode, which drops them on the host. The stand-in model
    on cells, at low thresholds: parts of cells next to the cells."""
    from napari_mobilesam import synthetic
    from napari_mobilesam.build import load_model

    model = load_model("vit_t_synthetic_cells")
    image = synthetic.cells_2d((192, 192), seed=10_003).image
    kw = dict(points_per_side=6, pred_iou_thresh=0.5, stability_score_thresh=0.8)
    ref = MaskGenerator(model, **kw, mode="reference")
    records = ref.generate(image)
    every = MaskGenerator(model, **kw, mode="reference", max_covered_fraction=1.0).generate(image)
    assert len(every) > len(records) >= 5  # some masks were covered
    want, want_info = ref.generate_labels(image, return_info=True)
    got, got_info = MaskGenerator(model, **kw, mode="device").generate_labels(
        image, return_info=True
    )
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_info["order"], want_info["order"])
