"""Mask losses on upsampled logits (``StepConfig.loss_upsample``).

A target thresholded at the decoder's resolution (256 x 256 for SAM) moves each boundary
to the nearest low-res pixel edge; the loss then cannot tell a decoder that places the
boundary where it is from one that rounds it. Upsampled as inference upsamples them, the
logits are compared with the labels at the finer resolution.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_mobilesam import synthetic
from napari_mobilesam.training.decoder import Window
from napari_mobilesam.training.step import (
    StepConfig,
    _Losses,
    _Prompt,
    interactive_loss,
    upsample_window,
)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_upsampled_window_equals_the_upsampled_full_logits(factor):
    full = torch.randn(3, 40, 48, generator=torch.Generator().manual_seed(factor))
    window = Window(2, 7, 3, 11)  # tokens; 4 low-res pixels each
    rows, cols = window.pixels
    up, r, c = upsample_window(full[:, rows, cols], window, factor)
    ref = F.interpolate(full[:, None], scale_factor=factor, mode="bilinear", align_corners=False)
    # float32 rounding only: the interpolation weights are computed at another offset in
    # the window than in the full frame (up to 5e-7 at 2, 1.1e-5 at 3, 0 at 4 over 50
    # seeds); a misplaced window would be off by the logits' own scale (~1)
    atol = 1e-4
    torch.testing.assert_close(up, ref[:, 0, r, c], atol=atol, rtol=0)
    b = factor // 2
    assert up.shape[-2:] == (20 * factor - 2 * b, 32 * factor - 2 * b)


def _half_plane():
    """A 16 x 16 low-res frame whose object covers fine columns 0-25 (at 4x): its edge
    lies inside low-res column 6 (fine 24-27), 2 fine pixels from where a target
    thresholded at the low resolution puts it."""
    fine = torch.zeros(64, 64, dtype=torch.bool)
    fine[:, :26] = True
    low = F.adaptive_avg_pool2d(fine[None, None].float(), (16, 16))[0, 0] > 0.5
    assert low[:, :6].all() and not low[:, 6:].any()
    centres = torch.arange(16) * 4 + 1.5  # low-res pixel centres in fine columns
    exact = (25.5 - centres).expand(16, 16)  # zero crossing between fine columns 25 and 26
    rounded = torch.where(low, 3.0, -3.0)  # the low-res target's edge, at fine 23.5
    return _Prompt(target=low, window=Window(0, 4, 0, 4), fine=fine), torch.stack([exact, rounded])


def test_the_fine_loss_sees_the_sub_pixel_edge_the_coarse_loss_rounds_away():
    p, logits = _half_plane()
    _, coarse_iou = _Losses(StepConfig()).score(logits, None, 1.0, p)
    # at the decoder's resolution both are the target exactly
    assert coarse_iou.tolist() == [1.0, 1.0]
    loss, fine_iou = _Losses(StepConfig(loss_upsample=4)).score(logits, None, 1.0, p)
    # upsampled, the exact edge is right and the rounded one misses 2 fine columns (of
    # the 24 left inside the window once its outer 2 fine pixels per side are dropped)
    assert float(fine_iou[0]) == 1.0
    assert float(fine_iou[1]) == pytest.approx(22 / 24, rel=1e-6)
    assert float(loss[0]) < float(loss[1])


def test_far_tokens_count_for_the_fine_pixels_they_stand_for():
    p, logits = _half_plane()
    far = torch.full((2, 5, 4, 4), 4.0)  # 5 far tokens, wrongly "object"
    _, iou = _Losses(StepConfig(loss_upsample=4)).score(logits, far, 2.0, p)
    # the exact mask: 60 x 24 fine pixels right (the window drops 2 per side), 5 x 16
    # far pixels false positives counting 2 (tokens) x 16 (fine pixels) times each
    inner = 60 * 24
    assert float(iou[0]) == pytest.approx(inner / (inner + 5 * 16 * 2 * 16), rel=1e-4)


def test_interactive_loss_with_upsampled_logits_trains_the_decoder(tiny_model):
    tiny_model.train()
    labels = synthetic.cells_2d((128, 128), seed=1, radius=(10, 20)).labels
    emb = tiny_model.image_encoder(torch.randn(1, 3, 128, 128))
    for upsample in (1, 4):
        tiny_model.zero_grad()
        cfg = StepConfig(objects=4, rounds=2, far_tokens=4, neighbour_weight=2.0,
                         loss_upsample=upsample)  # fmt: skip
        loss, parts = interactive_loss(
            tiny_model, emb, (128, 128), labels, cfg, np.random.default_rng(0)
        )
        assert torch.isfinite(loss) and 0 <= parts["miou"] <= 1
        loss.backward(retain_graph=True)
        grads = [q.grad for q in tiny_model.mask_decoder.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_loss_upsample_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="loss_upsample"):
        StepConfig(loss_upsample=value)
