"""Segment everything against the reference's outputs (``*_amg*_*.json`` in golden/).

Reference mode must reproduce them (same count, one-to-one masks with IoU >= 0.99,
scores within 1e-3, boxes within 1 px); fast mode with box NMS must find >= 95%
of the reference's non-empty masks with IoU >= 0.95 (fast mode drops empty
masks, which the reference keeps when its thresholds are 0).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.everything.rle import rle_to_mask

from .conftest import GOLDEN, requires_golden

CASES = sorted(GOLDEN.glob("*_amg*_*.json")) if GOLDEN.exists() else []
#: segment-anything's records keep masks inside better-scored ones (a part next to its
#: object); MaskGenerator drops them unless told to keep every mask
SAM_RECORDS = {"max_covered_fraction": 1.0}


def _load(path):
    case = json.loads(path.read_text())
    image = np.asarray(Image.open(GOLDEN / case["image"]).convert("RGB"))
    return case, image


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _match(ours, ref, min_iou, score_tol):
    """Greedy one-to-one matching; returns the IoU of each reference record's match."""
    ours_masks = [rle_to_mask(r["segmentation"]) for r in ours]
    ref_masks = [rle_to_mask(r["segmentation"]) for r in ref]
    used: set[int] = set()
    best_iou = np.zeros(len(ref))
    pairs = {}
    for j, (rm, rr) in enumerate(zip(ref_masks, ref, strict=True)):
        best, best_i = -1.0, None
        for i, (om, orec) in enumerate(zip(ours_masks, ours, strict=True)):
            if i in used or abs(orec["predicted_iou"] - rr["predicted_iou"]) > score_tol:
                continue
            iou = _iou(om, rm)
            if iou > best:
                best, best_i = iou, i
        if best_i is not None and best >= min_iou:
            used.add(best_i)
            best_iou[j] = best
            pairs[j] = best_i
    return best_iou, pairs


@requires_golden
def test_cases_present():
    assert len(CASES) >= 4, "the public golden set has four segment-everything cases"


def _reproduces_reference(path, model, mode: str):
    """Run ``mode`` on a golden case and check the golden tolerances on every record:
    same count, each matched (IoU >= 0.99, scores within 1e-3), stability within 1e-3,
    boxes within 1 px. Returns (ours, reference, {reference index: our index})."""
    case, image = _load(path)
    gen = MaskGenerator(
        model, **case["params"], **SAM_RECORDS, output_mode="uncompressed_rle", mode=mode,
        nms="box",
    )  # fmt: skip
    ours = gen.generate(image)
    ref = case["annotations"]
    assert len(ours) == len(ref)
    _, pairs = _match(ours, ref, min_iou=0.99, score_tol=1e-3)
    assert len(pairs) == len(ref), f"{len(ref) - len(pairs)} reference masks unmatched"
    for j, i in pairs.items():
        assert abs(ours[i]["stability_score"] - ref[j]["stability_score"]) <= 1e-3
        assert np.abs(np.subtract(ours[i]["bbox"], ref[j]["bbox"])).max() <= 1
    return ours, ref, pairs


@requires_golden
@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
@pytest.mark.slow
def test_reference_mode_reproduces_reference(path, golden_model):
    ours, ref, pairs = _reproduces_reference(path, golden_model, "reference")
    for j, i in pairs.items():
        o, r = ours[i], ref[j]
        assert o["area"] == pytest.approx(r["area"], rel=0.01, abs=2)
        assert o["crop_box"] == r["crop_box"]
        np.testing.assert_allclose(o["point_coords"], r["point_coords"], atol=1e-6)


@requires_golden
@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
@pytest.mark.slow
def test_fast_mode_agrees_with_reference(path, golden_model):
    case, image = _load(path)
    gen = MaskGenerator(
        golden_model, **case["params"], **SAM_RECORDS, output_mode="uncompressed_rle",
        mode="fast", nms="box",
    )  # fmt: skip
    ours = gen.generate(image)
    ref = [r for r in case["annotations"] if r["area"] > 0]
    assert all(r["area"] > 0 for r in ours)  # fast mode never returns empty masks
    ious, _ = _match(ours, ref, min_iou=0.95, score_tol=1e-2)
    assert np.mean(ious >= 0.95) >= 0.95
    assert len(ours) <= len(ref) / 0.95  # and finds little the reference does not


@requires_golden
@pytest.mark.slow
@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_device_mode_reproduces_reference(path, golden_model):
    """mode='device' (reference decisions on batched tensors, cached decoder) gives the
    reference's records, crop layers and min_mask_region_area included."""
    _reproduces_reference(path, golden_model, "device")


@requires_golden
@pytest.mark.slow
def test_device_labels_equal_reference_labels(golden_model):
    """generate_labels in device mode drops covered masks and paints on the device; same
    labels and info as the label image made from reference mode's masks."""
    case, image = _load(GOLDEN / "public_amg0_micro.json")
    params = {**case["params"], "points_per_side": 8}
    ref = MaskGenerator(golden_model, **params, mode="reference", nms="box")
    dev = MaskGenerator(golden_model, **params, mode="device", nms="box")
    want, want_info = ref.generate_labels(image, return_info=True)
    got, got_info = dev.generate_labels(image, return_info=True)
    assert got.dtype == np.uint32 and got.shape == image.shape[:2]
    assert want.max() >= 1
    np.testing.assert_array_equal(got, want)
    for key in ("order", "mask_area"):
        np.testing.assert_array_equal(got_info[key], want_info[key])
    for key in ("predicted_iou", "stability_score", "point_coords"):
        np.testing.assert_allclose(got_info[key], want_info[key], atol=1e-4)
