"""Fast paths of the model against their reference computations."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from napari_mobilesam.build import build_sam
from napari_mobilesam.model.transformer import TwoWayTransformer

from .conftest import TINY_CONFIG


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_transformer_broadcasts_one_image_over_the_prompts():
    torch.manual_seed(1)
    tr = TwoWayTransformer(depth=2, embedding_dim=64, num_heads=4, mlp_dim=32)
    for p in tr.parameters():
        p.normal_(0, 0.3)
    image, pe = torch.randn(1, 64, 12, 12), torch.randn(1, 64, 12, 12)
    tokens = torch.randn(3, 5, 64)
    shared = tr(image, pe, tokens)
    copied = tr(image.repeat(3, 1, 1, 1), pe, tokens)
    for a, b in zip(shared, copied, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="depth >= 1"):
        TwoWayTransformer(depth=0, embedding_dim=64, num_heads=4, mlp_dim=32)


def test_predict_masks_holds_every_token(tiny_model):
    dec = tiny_model.mask_decoder
    emb = torch.randn(1, 32, 8, 8)
    pe = tiny_model.prompt_encoder.get_dense_pe()
    sparse, dense = tiny_model.prompt_encoder(
        (torch.rand(2, 1, 2) * 128, torch.ones(2, 1)), None, None
    )
    masks, iou = dec.predict_masks(emb, pe, sparse, dense)
    assert masks.shape == (2, 4, 32, 32) and iou.shape == (2, 4)
    for multimask, sl in ((True, slice(1, None)), (False, slice(0, 1))):
        got = dec(emb, pe, sparse, dense, multimask)
        torch.testing.assert_close(got[0], masks[:, sl], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], iou[:, sl], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="image embeddings have batch 3 but there are 2 prompts"):
        dec(emb.repeat(3, 1, 1, 1), pe, sparse, dense, True)


@pytest.mark.parametrize(
    ("input_size", "original"),
    [
        ((1024, 1023), (770, 769)),
        ((1024, 853), (660, 550)),
        ((37, 1024), (20, 555)),
        ((1024, 1024), (1024, 1024)),
        ((1024, 1), (3000, 2)),
    ],
)
def test_postprocess_crop_first_is_bit_identical(input_size, original):
    # a tiny model with a 1024 input: postprocessing only depends on the sizes
    model = build_sam(replace(TINY_CONFIG, encoder=replace(TINY_CONFIG.encoder, img_size=1024)))
    low = torch.randn(2, 3, 256, 256)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # one thread is checked below (the reference rounds otherwise there)
    try:
        ref = _reference_postprocess(low, input_size, original)
        got = model.postprocess_masks(low, input_size, original)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _reference_postprocess(low, input_size, original):
    up = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
    up = up[..., : input_size[0], : input_size[1]]
    return F.interpolate(up, original, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(
    ("input_size", "original"), [((1024, 853), (660, 550)), ((768, 1024), (480, 640))]
)
def test_postprocess_on_one_thread_equals_the_multithreaded_reference(input_size, original):
    """On one CPU thread postprocess_masks upsamples each mask as an image of its own:
    the multi-threaded kernel's values bit for bit (torch's one-thread kernel for several
    channels rounds differently, and is 3-5x slower)."""
    from napari_mobilesam.model.sam import bilinear

    model = build_sam(replace(TINY_CONFIG, encoder=replace(TINY_CONFIG.encoder, img_size=1024)))
    low = torch.randn(2, 3, 256, 256) * 10
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = _reference_postprocess(low, input_size, original)
        want_up = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
        torch.set_num_threads(1)
        got = model.postprocess_masks(low, input_size, original)
        plain = _reference_postprocess(low, input_size, original)  # torch's own 1-thread kernel
        up = bilinear(low, (1024, 1024))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(up, want_up, rtol=0, atol=0)
    assert got.shape == plain.shape and (got - plain).abs().max() < 1e-4
