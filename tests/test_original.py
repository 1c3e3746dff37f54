"""``benchmarks/original.py``: the original code that benchmarks time beside ours.

The original (segment-anything 1.0's predictor, generator, prompt encoder and mask
decoder) is installed into ``<repo>/.original`` by ``.ci/run``; these tests check
that it is wired to reproduce the golden files, so "ours vs original" compares the
same computation. Without it they are skipped with the command that installs it.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
from benchmarks import bench_everything, bench_predictor, original

from .conftest import GOLDEN, GOLDEN_CKPT, requires_golden


def _installed() -> bool:
    saved = list(sys.path)
    try:
        original._add_search_paths()
        return importlib.util.find_spec("segment_anything") is not None
    finally:
        sys.path[:] = saved


requires_original = pytest.mark.skipif(
    not _installed(),
    reason="the original code is not installed: pip install --no-deps --target .original "
    "segment-anything==1.0 torchvision==<the release matching your torch>",
)


@pytest.fixture
def golden_original(isolated):
    return original.load(GOLDEN_CKPT)


def _image(name: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(GOLDEN / "images" / f"public_{name}.png").convert("RGB"))


@requires_golden
@requires_original
@pytest.mark.parametrize("case", ["p0_mm1", "p3_mm0", "p4_mm1", "batch_boxes"])
def test_original_predictor_reproduces_golden(golden_original, case):
    cases = np.load(GOLDEN / "public_cases.npz")
    pred = golden_original.predictor
    pred.set_image(_image("micro"))
    np.testing.assert_allclose(pred.features.numpy(), cases["micro/features"], atol=1e-3)

    def get(key):
        key = f"micro/{case}/{key}"
        return cases[key] if key in cases else None

    if case == "batch_boxes":
        import torch

        boxes = torch.as_tensor(get("in_boxes"))
        boxes = pred.transform.apply_boxes_torch(boxes, pred.original_size)
        with torch.inference_mode():
            out = pred.predict_torch(None, None, boxes, multimask_output=False)
        masks, iou, low = (t.numpy() for t in out)
    else:
        points, labels, box = get("in_point_coords"), get("in_point_labels"), get("in_box")
        masks, iou, low = pred.predict(points, labels, box, multimask_output=case.endswith("1"))
    np.testing.assert_allclose(low, get("low_res_logits"), atol=5e-3)
    np.testing.assert_allclose(iou, get("iou"), atol=1e-3)
    assert (masks != get("masks")).mean() < 1e-3


@requires_golden
@requires_original
@pytest.mark.slow
def test_original_generator_equals_reference_mode(golden_original):
    from napari_mobilesam.build import load_model
    from napari_mobilesam.everything import MaskGenerator

    params = json.loads((GOLDEN / "public_amg0_micro.json").read_text())["params"]
    params["points_per_side"] = 4
    theirs = golden_original.generator(**params).generate(_image("micro"))
    # (max_covered_fraction 1: every mask, as segment-anything keeps them)
    ours = MaskGenerator(
        load_model("vit_t", GOLDEN_CKPT), mode="reference", nms="box", max_covered_fraction=1.0,
        **params,
    )  # fmt: skip
    ours = ours.generate(_image("micro"))
    assert len(theirs) == len(ours) > 0
    for a, b in zip(theirs, ours, strict=True):
        assert np.allclose(a["bbox"], b["bbox"], atol=1)
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-3
        inter = np.logical_and(a["segmentation"], b["segmentation"]).sum()
        assert inter >= 0.99 * np.logical_or(a["segmentation"], b["segmentation"]).sum()


@requires_original
def test_pure_torch_nms_kernel_is_torchvisions_contract(isolated):
    import torch

    kernel = original.import_torchvision()
    import torchvision

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    keep = torchvision.ops.batched_nms(boxes, scores, torch.tensor([0, 0, 0, 1]), 0.5)
    # box 1 overlaps box 0 (IoU 0.68) in the same class; box 3 is alone in its class
    assert keep.tolist() == [3, 0, 2]
    assert kernel in ("torchvision", "pure torch (torchvision's compiled ops do not load)")


def test_missing_original_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILESAM_ORIGINAL", str(tmp_path / "nowhere"))
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name in ("mobile_sam", "segment_anything", "torchvision"):
            return None
        return real(name, *args)

    monkeypatch.setattr(original.importlib.util, "find_spec", find_spec)
    with pytest.raises(original.OriginalUnavailable, match="pip install --no-deps --target"):
        original.load(None)
    with pytest.raises(original.OriginalUnavailable, match="torchvision is not installed"):
        original.import_torchvision()
    # the benchmarks then run without it and say why
    orig, why = bench_predictor._load_original(None, "cpu")
    assert orig is None and "not installed" in why


def test_mobile_sam_alone_needs_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILESAM_ORIGINAL", str(tmp_path / "nowhere"))
    real = importlib.util.find_spec
    present = {"mobile_sam": object()}

    def find_spec(name, *args):
        if name in ("mobile_sam", "segment_anything"):
            return present.get(name)
        return real(name, *args)

    monkeypatch.setattr(original.importlib.util, "find_spec", find_spec)
    with pytest.raises(original.OriginalUnavailable, match="from a checkpoint: give weights"):
        original.load(None)


@requires_golden
@requires_original
@pytest.mark.slow
def test_benchmarks_time_the_original(isolated):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    result = bench_predictor.run(GOLDEN_CKPT, image=image, repeats=1)
    assert result["original"]["available"], result["original"]
    assert result["original"]["max_low_res_logit_diff"] < 5e-3
    assert result["predict_1pt"]["original"]["median"] > 0
    assert "against the original code" in bench_predictor.report(result)
    result = bench_everything.run(grids=(2,), large=0, weights=GOLDEN_CKPT)
    row = result["rows"][0]
    assert row["original"]["objects"] == row["reference"]["objects"] and row["original_ratio"] > 0
    assert "original (segment_anything" in bench_everything.report(result)


@requires_golden
@requires_original
def test_original_encoder_runs_in_the_originals_memory_layout(golden_original):
    """The original never asks for channels-last memory (ours does): its encoder here
    neither, so the layouts that follow are the ones its own operations produce."""
    import torch

    from napari_mobilesam.build import load_model

    def layouts(encoder):
        # every convolution, ours fused (ConvGELU) or not; seen[0]: the first one run
        convs = [m for m in encoder.modules()
                 if getattr(m, "weight", None) is not None and m.weight.dim() == 4]  # fmt: skip
        seen = []
        hooks = [c.register_forward_pre_hook(lambda m, i: seen.append(i[0].is_contiguous()))
                 for c in convs]  # fmt: skip
        try:
            with torch.inference_mode():
                encoder(torch.zeros(1, 3, 1024, 1024))
        finally:
            for hook in hooks:
                hook.remove()
        return all(c.weight.is_contiguous() for c in convs), seen[0]

    assert layouts(golden_original.sam.image_encoder) == (True, True)
    assert layouts(load_model("vit_t", GOLDEN_CKPT).image_encoder) == (False, False)  # ours
