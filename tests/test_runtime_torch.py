"""Backends: the torch reference against the model and Sam's own decoder; core counting."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from napari_mobilesam.predictor import Predictor
from napari_mobilesam.runtime import EncoderDecoderBackend, TorchBackend
from napari_mobilesam.runtime.onnx_backend import physical_cores

from .runtime_support import (
    assert_close,
    backend_prompts,
    image,
    sam_reference,
)

# --------------------------------------------------------------------- torch backend


def test_torch_backend_encode_equals_model(tiny_model):
    backend = TorchBackend(tiny_model)
    assert isinstance(backend, EncoderDecoderBackend)
    assert backend.name == "torch"
    assert backend.img_size == 128 and backend.embed_shape == (32, 8, 8)
    assert backend.mask_input_size == (32, 32)
    x = image(tiny_model)
    with torch.no_grad():
        want = tiny_model.image_encoder(torch.from_numpy(x)).numpy()
    got = backend.encode(x)
    assert got.dtype == np.float32 and got.shape == (1, 32, 8, 8)
    np.testing.assert_array_equal(got, want)
    assert "TorchBackend" in repr(backend)


def test_torch_backend_decode_equals_sam(tiny_model, rng):
    backend = TorchBackend(tiny_model)
    emb = backend.encode(image(tiny_model))
    s = tiny_model.img_size
    points = rng.uniform(0, s, (3, 2, 2)).astype(np.float32)
    labels = np.array([[1, 0], [1, 1], [0, 1]])
    boxes = np.sort(rng.uniform(0, s, (3, 2, 2)), axis=1).reshape(3, 4).astype(np.float32)
    masks = rng.normal(size=(3, 1, 32, 32)).astype(np.float32)
    cases = {
        "points": dict(points=points, labels=labels),
        "box": dict(boxes=boxes),
        "points+box": dict(points=points, labels=labels, boxes=boxes),
        "points+mask": dict(points=points, labels=labels, masks=masks),
        "box+mask": dict(boxes=boxes, masks=masks),
    }
    for name, case in cases.items():
        want_low, want_iou = sam_reference(tiny_model, emb, **case)
        coords, labs = backend_prompts(case.get("points"), case.get("labels"), case.get("boxes"))
        low, iou = backend.decode(emb, coords, labs, case.get("masks"))
        assert low.shape == (3, 4, 32, 32) and iou.shape == (3, 4), name
        assert low.dtype == np.float32 and iou.dtype == np.float32
        assert_close(low, want_low, 1e-5, f"{name} logits")
        assert_close(iou, want_iou, 1e-5, f"{name} iou")


def test_torch_backend_equals_predictor(tiny_model, rng):
    """The numbers the Predictor gives for one click (its fast paths included)."""
    pred = Predictor(tiny_model)
    image = (rng.uniform(size=(96, 80, 3)) * 255).astype(np.uint8)
    pred.set_image(image)
    backend = TorchBackend(tiny_model)
    emb = pred.get_image_embedding().numpy()
    pt = np.array([[30.0, 40.0]])
    _, scores, low = pred.predict(pt, np.array([1]), multimask_output=True)
    coords = pred.transform.apply_coords(pt, pred.original_size)[None].astype(np.float32)
    c, lab = backend_prompts(coords, [[1]])
    got_low, got_iou = backend.decode(emb, c, lab)
    assert_close(got_low[0, 1:], low, 1e-4, "logits")
    assert_close(got_iou[0, 1:], scores, 1e-4, "iou")


def test_backend_argument_errors(tiny_model):
    backend = TorchBackend(tiny_model)
    emb = np.zeros((1, 32, 8, 8), np.float32)
    c, lab = backend_prompts(np.zeros((1, 1, 2)), [[1]])
    with pytest.raises(TypeError, match="model must be a Sam"):
        TorchBackend("vit_t")
    with pytest.raises(ValueError, match=r"x must have shape \(1, 3, 128, 128\)"):
        backend.encode(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(TypeError, match="x must be a numpy array"):
        backend.encode(torch.zeros(1, 3, 128, 128))
    with pytest.raises(TypeError, match="embedding must be a numeric array"):
        backend.decode(emb.astype(bool), c, lab)
    with pytest.raises(ValueError, match=r"embedding must have shape \(1, 32, 8, 8\)"):
        backend.decode(emb[:, :16], c, lab)
    with pytest.raises(ValueError, match=r"coords must have shape \(B, N, 2\)"):
        backend.decode(emb, c[0], lab)
    with pytest.raises(ValueError, match=r"labels must have shape \(B, N\)"):
        backend.decode(emb, c, lab[:, :1])
    with pytest.raises(ValueError, match=r"labels must be -1, 0, 1, 2 or 3, got \[4.0\]"):
        backend.decode(emb, c, np.where(lab == 1, 4, lab))
    with pytest.raises(ValueError, match=r"mask_input must have shape \(1, 1, 32, 32\)"):
        backend.decode(emb, c, lab, np.zeros((1, 1, 64, 64), np.float32))


def test_physical_cores_without_psutil(monkeypatch):
    assert physical_cores() >= 1
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert physical_cores() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert physical_cores() == 1
