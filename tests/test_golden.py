"""Numerical contract with the reference MobileSAM / SAM implementation.

Every case in every ``*_cases.npz`` under the golden folder is discovered from
its keys (no case is named here), so a second golden set in the same format is
checked the same way. Tolerances are those of the golden README.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from napari_mobilesam.build import read_state_dict
from napari_mobilesam.model import ImageEncoderViT
from napari_mobilesam.predictor import Predictor
from napari_mobilesam.transforms import resize_longest_side

from .conftest import GOLDEN, requires_golden

FEATURE_MAX_ABS = 1e-3
FEATURE_REL_L2 = 1e-4
LOGIT_MAX_ABS = 5e-3
IOU_MAX_ABS = 1e-3
NEAR_THRESHOLD = 1e-2
MAX_NEAR_FRACTION = 1e-3


def _case_files():
    return sorted(GOLDEN.glob("*_cases.npz")) if GOLDEN.exists() else []


def _images():
    """(npz path, set prefix, image name) for every image of every golden set."""
    out = []
    for path in _case_files():
        prefix = path.name[: -len("_cases.npz")]
        with np.load(path) as z:
            names = sorted({k.split("/")[0] for k in z.files})
        out += [(path, prefix, name) for name in names]
    return out


IMAGES = _images()


def _ids(items):
    return [f"{prefix}-{name}" for _, prefix, name in items]


# the onnx and auto backends export the golden model first (~20 s): slow
@pytest.fixture(
    scope="module",
    params=[
        "torch",
        pytest.param("onnx", marks=pytest.mark.slow),
        pytest.param("auto", marks=pytest.mark.slow),
    ],
)
def make_predictor(request, golden_model):
    """Predictors on the golden model with each backend (onnx: exported once, onnxruntime;
    auto with the exported folder: onnxruntime encoder + torch decoder)."""
    if request.param == "torch":
        return lambda: Predictor(golden_model)
    folder = request.getfixturevalue("golden_onnx_dir")

    def make():
        pred = Predictor(golden_model, backend=request.param, onnx_folder=folder)
        want = {"onnx": "onnx", "auto": "onnx encoder + torch decoder"}[request.param]
        assert pred.backend_name == want
        return pred

    return make


@pytest.fixture(scope="module")
def embedded(make_predictor):
    """Predictor with each golden image set, computed once per image and backend."""
    cache = {}

    def get(path, prefix, name):
        key = (str(path), name)
        if key not in cache:
            image = np.asarray(
                Image.open(GOLDEN / "images" / f"{prefix}_{name}.png").convert("RGB")
            )
            predictor = make_predictor()
            predictor.set_image(image)
            cache[key] = (image, predictor.get_embedding())
        return cache[key]

    return get


def _prompt_cases(z, name):
    """Keys like '{name}/p3_mm1/' (single prompts) found in the archive."""
    keys = [k for k in z.files if k.startswith(f"{name}/p") and "/refine/" not in k]
    return sorted({k.rsplit("/", 1)[0] + "/" for k in keys})


def _prompt(z, pre):
    def opt(key):
        return z[pre + key] if pre + key in z.files else None

    return {
        "point_coords": opt("in_point_coords"),
        "point_labels": opt("in_point_labels"),
        "box": opt("in_box"),
        "mask_input": opt("in_mask_input"),
    }


def _assert_outputs(pred, z, pre, masks, iou, low_res, logits):
    np.testing.assert_allclose(low_res, z[pre + "low_res_logits"], rtol=0, atol=LOGIT_MAX_ABS)
    np.testing.assert_allclose(iou, z[pre + "iou"], rtol=0, atol=IOU_MAX_ABS)
    expected = z[pre + "masks"]
    assert masks.shape == expected.shape and masks.dtype == np.bool_
    differ = masks != expected
    near = np.abs(logits) < NEAR_THRESHOLD
    assert not (differ & ~near).any(), f"{pre}: masks differ away from the threshold"
    assert differ.sum() <= MAX_NEAR_FRACTION * differ.size


@requires_golden
@pytest.mark.parametrize(("path", "prefix", "name"), IMAGES, ids=_ids(IMAGES))
def test_resize_and_features(path, prefix, name, embedded):
    image, emb = embedded(path, prefix, name)
    with np.load(path) as z:
        np.testing.assert_array_equal(resize_longest_side(image, 1024), z[f"{name}/resized_uint8"])
        assert emb.input_size == tuple(z[f"{name}/input_size"])
        ref = torch.from_numpy(z[f"{name}/features"])
    assert emb.original_size == image.shape[:2]
    diff = emb.features - ref
    assert diff.abs().max().item() <= FEATURE_MAX_ABS
    assert (diff.norm() / ref.norm()).item() <= FEATURE_REL_L2


@requires_golden
@pytest.mark.parametrize(("path", "prefix", "name"), IMAGES, ids=_ids(IMAGES))
def test_predict_cases(path, prefix, name, make_predictor, embedded):
    _, emb = embedded(path, prefix, name)
    pred = make_predictor()
    pred.set_embedding(emb)
    with np.load(path) as z:
        cases = _prompt_cases(z, name)
        assert cases, f"no prompt cases for {name} in {path.name}"
        for pre in cases:
            kw = _prompt(z, pre)
            multimask = pre.rstrip("/").endswith("mm1")
            masks, iou, low_res = pred.predict(**kw, multimask_output=multimask)
            logits, _, _ = pred.predict(**kw, multimask_output=multimask, return_logits=True)
            _assert_outputs(pred, z, pre, masks, iou, low_res, logits)
            refine = pre + "refine/"
            if refine + "in_mask_input" in z.files:
                # the refinement keeps the parent's prompt and adds the mask input
                override = {k: v for k, v in _prompt(z, refine).items() if v is not None}
                kw = {**_prompt(z, pre), **override}
                masks, iou, low_res = pred.predict(**kw, multimask_output=False)
                logits, _, _ = pred.predict(**kw, multimask_output=False, return_logits=True)
                _assert_outputs(pred, z, refine, masks, iou, low_res, logits)


@requires_golden
@pytest.mark.parametrize(("path", "prefix", "name"), IMAGES, ids=_ids(IMAGES))
def test_batch_boxes(path, prefix, name, make_predictor, embedded):
    _, emb = embedded(path, prefix, name)
    pred = make_predictor()
    pred.set_embedding(emb)
    with np.load(path) as z:
        pre = f"{name}/batch_boxes/"
        if pre + "in_boxes" not in z.files:
            pytest.skip(f"{path.name} has no batch case for {name}")
        boxes = z[pre + "in_boxes"]
        masks, iou, low_res = pred.predict_batch(boxes=boxes, multimask_output=False)
        logits, _, _ = pred.predict_batch(boxes=boxes, multimask_output=False, return_logits=True)
        _assert_outputs(pred, z, pre, masks, iou, low_res, logits)


def _vit_cases():
    return sorted(GOLDEN.glob("*_encoder_config.json")) if GOLDEN.exists() else []


@requires_golden
@pytest.mark.parametrize("config_path", _vit_cases(), ids=lambda p: p.name)
def test_vit_encoder(config_path):
    stem = config_path.name[: -len("_config.json")]
    config = json.loads(config_path.read_text())
    encoder = ImageEncoderViT(**config).eval()
    state = read_state_dict(GOLDEN / f"{stem}.pt")
    encoder.load_state_dict({k.removeprefix("image_encoder."): v for k, v in state.items()})
    with np.load(GOLDEN / f"{stem}_case.npz") as z:
        x, ref = torch.from_numpy(z["input"]), torch.from_numpy(z["features"])
    with torch.no_grad():
        out = encoder(x)
    diff = out - ref
    assert diff.abs().max().item() <= FEATURE_MAX_ABS
    assert (diff.norm() / ref.norm()).item() <= FEATURE_REL_L2


@requires_golden
def test_golden_sets_present():
    """The public set must be found, so the tests above cannot pass by finding nothing."""
    assert any(p.name == "public_cases.npz" for p in _case_files())
    assert _vit_cases()
