"""The IoU-head calibration on segment-everything prompts (training.calibrate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mobilesam import synthetic
from napari_mobilesam.training.calibrate import (
    best_iou_with_objects,
    calibrate_iou_head,
    iou_head_samples,
)
from napari_mobilesam.training.data import Example


def test_best_iou_with_objects_against_a_direct_count():
    labels = np.zeros((6, 8), np.int32)
    labels[:3, :4] = 1
    labels[3:, 4:] = 7
    masks = np.zeros((4, 6, 8), bool)
    masks[0] = labels == 1  # exact: 1
    masks[1, :3, :2] = True  # half of object 1: 6 / 12
    masks[2, 3:, 2:] = True  # all 12 pixels of object 7 in a mask of 18: 12 / 18
    # masks[3] empty: 0
    got = best_iou_with_objects(masks, labels)
    np.testing.assert_allclose(got, [1.0, 0.5, 2 / 3, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"masks of shape \(5, 8\) but labels of shape"):
        best_iou_with_objects(masks[:, :5], labels)


def test_calibration_fits_only_the_iou_head(tiny_model):
    s = synthetic.cells_2d(shape=(96, 96), radius=(8, 14), seed=3)
    ex = Example("a", s.image, s.labels)
    with torch.no_grad():
        feats, targets = iou_head_samples(tiny_model, [ex], points_per_side=4, chunk=5)
    n_out = tiny_model.mask_decoder.num_mask_tokens
    assert feats.shape == (16, tiny_model.mask_decoder.transformer_dim)
    assert targets.shape == (16, n_out) and 0 <= targets.min() and targets.max() <= 1
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    grads = [p.requires_grad for p in tiny_model.parameters()]
    res = calibrate_iou_head(tiny_model, feats, targets, epochs=30, seed=0)
    assert res["after"] < res["before"] and res["samples"] == 16
    for k, v in tiny_model.state_dict().items():
        changed = not torch.equal(v, before[k])
        assert changed == k.startswith("mask_decoder.iou_prediction_head."), k
    assert [p.requires_grad for p in tiny_model.parameters()] == grads  # restored
    assert not tiny_model.training


def test_calibration_needs_samples(tiny_model):
    with pytest.raises(ValueError, match="no samples"):
        calibrate_iou_head(tiny_model, torch.zeros(0, 8), torch.zeros(0, 4))
