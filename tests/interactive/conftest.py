"""Fixtures of the PromptSession tests: a predictor on the tiny model, a 2D image and a
session on it, and a record of what the encoder runs on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mobilesam.interactive import PromptSession
from napari_mobilesam.predictor import Predictor

from .common import H, W


@pytest.fixture
def pred(tiny_model):
    return Predictor(tiny_model)


@pytest.fixture
def image2d(rng):
    return rng.integers(0, 4000, size=(H, W), dtype=np.uint16)


@pytest.fixture
def session2d(pred, image2d):
    s = PromptSession(pred, image2d, contrast_limits=(0, 4000))
    s.embed(())
    return s


@pytest.fixture
def direct(tiny_model, image2d):
    p = Predictor(tiny_model)
    p.set_image(image2d, contrast_limits=(0, 4000))
    return p


@pytest.fixture
def encoder_inputs(tiny_model):
    """Every (1, 3, S, S) tensor the tiny model's image encoder runs on, in order.

    The tiny random encoder's output hardly depends on its input (embeddings of
    unrelated images agree to 1e-7), so tests compare what goes *into* it.
    """
    seen: list[torch.Tensor] = []
    handle = tiny_model.image_encoder.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    yield seen
    handle.remove()
