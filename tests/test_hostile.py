"""Hostile inputs, each built here: the failures of issue "Reliability" stay fixed.

Every case names the failure it guards against. The batch tool runs in-process on the
tiny model (``run_tool``), as in tests/test_batch_cli.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.predictor import Predictor
from napari_mobilesam.transforms import preprocess_shape

# -- 7. API edges ---------------------------------------------------------------------


@pytest.mark.parametrize("multimask, c", [(True, 3), (False, 1)])
@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize(
    "prompts",
    [
        {"boxes": np.zeros((0, 4))},
        {"point_coords": np.zeros((0, 2, 2)), "point_labels": np.zeros((0, 2))},
        {"point_coords": np.zeros((0, 1, 2)), "point_labels": np.zeros((0, 1)),
         "boxes": np.zeros((0, 4))},
    ],
)  # fmt: skip
def test_predict_batch_with_zero_prompts_gives_empty_arrays(
    tiny_model, prompts, multimask, c, logits
):
    predictor = Predictor(tiny_model)
    predictor.set_image(np.zeros((40, 60, 3), np.uint8))
    masks, scores, low_res = predictor.predict_batch(
        **prompts, multimask_output=multimask, return_logits=logits
    )
    low = tiny_model.prompt_encoder.mask_input_size
    assert masks.shape == (0, c, 40, 60)
    assert masks.dtype == (np.float32 if logits else bool)
    assert scores.shape == (0, c) and scores.dtype == np.float32
    assert low_res.shape == (0, c, *low) and low_res.dtype == np.float32
    # the same shapes as one prompt gives, less its row
    one = predictor.predict_batch(boxes=np.array([[0, 0, 9, 9.0]]), multimask_output=multimask)
    assert [a.shape[1:] for a in one] == [masks.shape[1:], scores.shape[1:], low_res.shape[1:]]


@pytest.mark.parametrize("shape", [(1, 20000), (20000, 1), (3, 800)])
def test_extreme_aspect_ratio_is_refused_naming_shape_and_limit(tiny_model, shape):
    predictor = Predictor(tiny_model)  # 128-pixel input: at most 256:1
    with pytest.raises(ValueError, match=rf"shape \({shape[0]}, {shape[1]}\).*limit of 256:1"):
        predictor.set_image(np.zeros(shape, np.uint8))


def test_aspect_ratio_limit_is_2048_to_1_for_1024_pixels():
    assert preprocess_shape(1, 2048, 1024) == (1, 1024)  # 2048:1 still fits
    with pytest.raises(ValueError, match=r"\(1, 2049\).*limit of 2048:1"):
        preprocess_shape(1, 2049, 1024)
    with pytest.raises(ValueError, match=r"\(20000, 1\).*limit of 2048:1"):
        preprocess_shape(20000, 1, 1024)
