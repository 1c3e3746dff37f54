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
    pinball_loss,
    scale_mask_logits,
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


def test_pinball_loss_is_minimised_at_the_quantile():
    target = torch.arange(11.0)  # 0 .. 10
    grid = torch.linspace(0, 10, 101)
    for q, expected in ((0.5, 5.0), (0.8, 8.0), (0.1, 1.0)):
        losses = torch.stack([pinball_loss(g, target, q) for g in grid])
        assert grid[losses.argmin()].item() == pytest.approx(expected, abs=0.11)
    # against the definition
    assert pinball_loss(torch.tensor(2.0), torch.tensor([1.0, 4.0]), 0.8).item() == (
        pytest.approx((0.2 * 1.0 + 0.8 * 2.0) / 2)
    )


def test_a_higher_quantile_fits_higher_scores(tiny_model):
    gen = torch.Generator().manual_seed(0)
    # one feature vector for all: the head can only fit one score per output
    feats = torch.randn(1, tiny_model.mask_decoder.transformer_dim, generator=gen)
    feats = feats.expand(200, -1).contiguous()
    n_out = tiny_model.mask_decoder.num_mask_tokens
    targets = torch.rand(200, n_out, generator=gen)
    means = []
    for q in (0.2, 0.8):
        torch.manual_seed(0)
        state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        res = calibrate_iou_head(tiny_model, feats, targets, epochs=300, lr=1e-2, quantile=q)
        with torch.no_grad():
            means.append(tiny_model.mask_decoder.iou_prediction_head(feats).mean().item())
        assert set(res) == {"before", "after", "bias", "samples"}
        tiny_model.load_state_dict(state)
    assert means[0] < 0.35 and means[1] > 0.65, means  # the 0.2 and 0.8 quantiles


@pytest.mark.parametrize("q", [0.0, 1.0, -0.5, 2.0])
def test_the_quantile_must_be_inside_0_1(tiny_model, q):
    with pytest.raises(ValueError, match="quantile must be between 0 and 1"):
        calibrate_iou_head(tiny_model, torch.zeros(4, 8), torch.zeros(4, 4), quantile=q)


def test_scaled_logits_keep_every_mask_and_mask_prompt(tiny_model):
    from napari_mobilesam.predictor import Predictor

    s = synthetic.cells_2d(shape=(96, 96), radius=(8, 14), seed=3)
    rgb = np.repeat((s.image / s.image.max() * 255).astype(np.uint8)[..., None], 3, -1)
    point = (np.array([[40.0, 50.0]]), np.array([1]))

    def answer(model):
        p = Predictor(model)
        p.set_image(rgb)
        logits, _, low = p.predict(*point, multimask_output=True, return_logits=True)
        again, _, _ = p.predict(*point, mask_input=low[:1], multimask_output=False,
                                return_logits=True)  # fmt: skip
        return logits, again

    before, before_prompted = answer(tiny_model)
    scale_mask_logits(tiny_model, 3.0)
    after, after_prompted = answer(tiny_model)
    np.testing.assert_allclose(after, 3.0 * before, rtol=1e-4, atol=1e-4)
    # the mask prompt (the scaled model's own low-res logits) answers as before, x3
    np.testing.assert_allclose(after_prompted, 3.0 * before_prompted, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan"), float("inf")])
def test_the_logit_factor_must_be_finite_and_positive(tiny_model, factor):
    with pytest.raises(ValueError, match="factor must be a finite number above 0"):
        scale_mask_logits(tiny_model, factor)
