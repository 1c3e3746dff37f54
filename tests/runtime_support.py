"""Helpers of the backend tests (test_runtime*.py): tiny models, prompts in the backend
convention, Sam's own decoder as the reference."""

from __future__ import annotations

import re

import numpy as np
import torch

from napari_mobilesam.accel import optimize
from napari_mobilesam.build import build_sam

from .conftest import TINY_CONFIG

HINT = re.escape('pip install "napari-mobilesam[onnx]"')
FILES = {"encoder.onnx", "decoder.onnx", "encoder.int8.onnx", "decoder.int8.onnx"}


# ---------------------------------------------------------------------------- helpers


def tiny(state_dict, optimized: bool):
    model = build_sam(TINY_CONFIG)
    model.load_state_dict(state_dict)
    model.eval()
    return optimize(model) if optimized else model  # as load_model does


def image(model, seed: int = 0) -> np.ndarray:
    """A preprocessed (1, 3, S, S) float32 image with bottom/right padding."""
    gen = torch.Generator().manual_seed(seed)
    s = model.img_size
    img = torch.rand(1, 3, s, s * 3 // 4, generator=gen) * 255
    return model.preprocess(img).numpy()


def backend_prompts(points=None, labels=None, boxes=None, b=1):
    """The backend convention: boxes as corners 2 / 3, else one padding point appended."""
    coords, labs = [], []
    if points is not None:
        coords.append(np.asarray(points, np.float32))
        labs.append(np.asarray(labels, np.float32))
        b = len(points)
    if boxes is not None:
        boxes = np.asarray(boxes, np.float32)
        coords.append(boxes.reshape(-1, 2, 2))
        labs.append(np.tile(np.float32([2, 3]), (len(boxes), 1)))
    else:
        coords.append(np.zeros((b, 1, 2), np.float32))
        labs.append(np.full((b, 1), -1, np.float32))
    return np.concatenate(coords, axis=1), np.concatenate(labs, axis=1)


@torch.no_grad()
def sam_reference(model, emb, points=None, labels=None, boxes=None, masks=None):
    """Sam's own prompt encoder + mask decoder, single-mask and multimask outputs joined."""
    t = torch.as_tensor
    pts = None if points is None else (t(points).float(), t(labels).long())
    sparse, dense = model.prompt_encoder(
        pts,
        None if boxes is None else t(boxes).float(),
        None if masks is None else t(masks).float(),
    )
    pe = model.prompt_encoder.get_dense_pe()
    out = [model.mask_decoder(t(emb), pe, sparse, dense, mm) for mm in (False, True)]
    low = torch.cat([out[0][0], out[1][0]], dim=1).numpy()
    iou = torch.cat([out[0][1], out[1][1]], dim=1).numpy()
    return low, iou


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def assert_close(got, want, tol, what):
    err = float(np.abs(got - want).max())
    scale = max(1.0, float(np.abs(want).max()))
    assert err <= tol * scale, f"{what}: max abs diff {err:.3g} (scale {scale:.3g})"
