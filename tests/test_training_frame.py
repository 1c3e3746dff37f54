"""Training at a smaller input keeps the full input's prompt frame (InputFrame).

A 1024 px model trained at 512 px sees crops; its prompts and the decoder's positional
encoding must be those of the crop's pixels in the full 1024 px frame, which inference
uses. Encoded in a 512 px frame of their own, distances look twice as long in training as
in use (the first stand-in model's masks spilled into touching cells for that reason).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_mobilesam.build import build_sam
from napari_mobilesam.training import loop
from napari_mobilesam.training.config import TrainConfig
from napari_mobilesam.training.decoder import InputFrame, decode_tokens
from napari_mobilesam.training.step import StepConfig, interactive_loss

from .conftest import TINY_CONFIG


@pytest.fixture
def crop_and_full(tiny_state_dict):
    """The tiny model (128 px input, 8 x 8 tokens) and the same weights at a 64 px input
    whose prompt encoder keeps the 128 px frame, as the training loop builds it."""
    full = build_sam(TINY_CONFIG).eval()
    full.load_state_dict(tiny_state_dict)
    small = dataclasses.replace(
        TINY_CONFIG, encoder=dataclasses.replace(TINY_CONFIG.encoder, img_size=64)
    )
    crop = build_sam(small).eval()
    crop.load_state_dict(tiny_state_dict)
    crop.prompt_encoder.input_image_size = (128, 128)
    return crop, full


@pytest.mark.parametrize("row, col", [(0, 0), (2, 3), (4, 4)])
def test_crop_prompts_and_pe_are_the_full_frames(crop_and_full, row, col):
    crop, full = crop_and_full
    frame = InputFrame(row, col)
    assert frame.stride(crop) == 16
    torch.testing.assert_close(
        frame.dense_pe(crop, (4, 4)),
        full.prompt_encoder.get_dense_pe()[..., row : row + 4, col : col + 4],
    )
    coords = torch.tensor([[[3.0, 7.0], [60.0, 12.5]]])
    labels = torch.tensor([[1, 0]])
    boxes = torch.tensor([[5.0, 6.0, 40.0, 50.0]])
    shift = torch.tensor([16.0 * col, 16.0 * row])
    with torch.no_grad():
        got, _ = frame.encode_prompts(crop, (coords, labels), boxes, None)
        want, _ = full.prompt_encoder((coords + shift, labels), boxes + shift.repeat(2), None)
    torch.testing.assert_close(got, want)


def test_the_old_own_frame_encoding_differs(crop_and_full):
    """What the fix changes: a crop encoded in a 64 px frame of its own is not the same
    point in the full frame (this is what the first stand-in model was trained with)."""
    _, full = crop_and_full
    own = build_sam(dataclasses.replace(
        TINY_CONFIG, encoder=dataclasses.replace(TINY_CONFIG.encoder, img_size=64)
    )).eval()  # fmt: skip
    own.load_state_dict(full.state_dict())
    coords, labels = torch.tensor([[[30.0, 20.0]]]), torch.tensor([[1]])
    with torch.no_grad():
        a, _ = own.prompt_encoder((coords, labels), None, None)
        b, _ = full.prompt_encoder((coords, labels), None, None)
    assert not torch.allclose(a, b, atol=1e-3)


def test_a_frame_that_leaves_the_grid_is_refused(crop_and_full):
    crop, _ = crop_and_full
    with pytest.raises(ValueError, match="leaves the"):
        InputFrame(5, 0).dense_pe(crop, (4, 4))


def test_random_frames_cover_the_full_grid(crop_and_full):
    crop, _ = crop_and_full
    rng = np.random.default_rng(0)
    seen = {(f.row, f.col) for f in (InputFrame.random(crop, 128, rng) for _ in range(400))}
    assert seen == {(r, c) for r in range(5) for c in range(5)}
    assert InputFrame.random(crop, 64, rng) == InputFrame(0, 0)


def test_decoding_a_full_size_input_is_unchanged(tiny_model):
    """The default frame is the identity: the decoder's own positional encoding."""
    torch.manual_seed(0)
    emb = torch.randn(1, 32, 8, 8)
    coords, labels = torch.rand(2, 1, 2) * 128, torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        sparse, dense = InputFrame().encode_prompts(tiny_model, (coords, labels), None, None)
        want, _ = tiny_model.prompt_encoder((coords, labels), None, None)
        torch.testing.assert_close(sparse, want)
        a = decode_tokens(tiny_model, emb, sparse, dense, True)
        b = decode_tokens(tiny_model, emb, sparse, dense, True, InputFrame())
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


def test_interactive_loss_in_a_frame_trains(crop_and_full):
    crop, _ = crop_and_full
    crop.train()
    emb = crop.image_encoder(torch.randn(1, 3, 64, 64))
    labels = np.zeros((64, 64), np.int32)
    labels[8:24, 8:26], labels[30:50, 34:60] = 1, 2
    cfg = StepConfig(objects=2, rounds=2, background=1, far_tokens=2)
    loss, parts = interactive_loss(
        crop, emb, (64, 64), labels, cfg, np.random.default_rng(0), 1.0, InputFrame(3, 1)
    )
    loss.backward()
    assert torch.isfinite(loss) and parts["objects"] == 2
    assert crop.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.grad is None
    assert crop.mask_decoder.iou_token.weight.grad.abs().sum() > 0


def test_training_model_at_a_smaller_input_keeps_the_full_frame(tmp_path):
    cfg = TrainConfig(out=tmp_path, synthetic=1, input_size=512, checkpoint=None)
    model = loop._model(cfg, torch.device("cpu"))
    assert model.img_size == 512
    assert model.prompt_encoder.image_embedding_size == (32, 32)
    assert tuple(model.prompt_encoder.input_image_size) == (1024, 1024)


def test_a_larger_input_keeps_its_own_frame(tmp_path):
    """Only a crop of the full input is placed in it; a larger input is a frame itself."""
    cfg = TrainConfig(out=tmp_path, synthetic=1, input_size=1088)
    model = loop._model(cfg, torch.device("cpu"))
    assert tuple(model.prompt_encoder.input_image_size) == (1088, 1088)
    assert InputFrame().dense_pe(model, (68, 68)).shape[-2:] == (68, 68)


def test_own_frame_is_kept_for_reproducing_old_runs(tmp_path):
    cfg = TrainConfig(out=tmp_path, synthetic=1, input_size=512, input_frame="own")
    model = loop._model(cfg, torch.device("cpu"))
    assert tuple(model.prompt_encoder.input_image_size) == (512, 512)
    with pytest.raises(ValueError, match="input_frame must be full or own"):
        TrainConfig(out=tmp_path, synthetic=1, input_frame="crop")


def test_runs_written_before_the_setting_resume_as_they_were_made(tmp_path):
    """A run's stored settings without ``input_frame`` (older versions) had crops in their
    own frame: such a run at a smaller input resumes only as that; at full size the
    frame does not arise."""
    from napari_mobilesam.atomic import to_json

    small = TrainConfig(out=tmp_path, synthetic=1, input_size=512, input_frame="own")
    full = TrainConfig(out=tmp_path, synthetic=1)
    for cfg in (small, full):
        old = cfg.to_dict()
        del old["input_frame"]
        assert TrainConfig.from_dict(old) == cfg
        assert loop._changed_settings(to_json(old), cfg) == []
    old = small.to_dict()
    del old["input_frame"]
    changed = loop._changed_settings(to_json(old), dataclasses.replace(small, input_frame="full"))
    assert changed == ["input_frame: 'own' -> 'full'"]
    assert loop._changed_settings("{not json", full) is None
    assert loop._changed_settings(to_json({**full.to_dict(), "later": 1}), full) is None
