"""The segment-everything generator on a tiny model (its building blocks are tested in
test_everything_parts.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk

from napari_mobilesam.engine import Prompts
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.everything.rle import rle_to_coco, rle_to_mask
from napari_mobilesam.predictor import Predictor

# -- the generator ------------------------------------------------------------------------------


@pytest.fixture
def image(rng):
    img = np.full((90, 120, 3), 30, np.uint8)
    for r, c in [(30, 30), (60, 80), (20, 95)]:
        img[disk((r, c), 12, shape=img.shape[:2])] = rng.integers(100, 255, 3)
    return img


ALL_PASS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "points_per_side": 6}


@pytest.mark.parametrize("nms_kind", ["mask", "box"])
def test_generate_records(tiny_model, image, nms_kind):
    gen = MaskGenerator(tiny_model, **ALL_PASS, nms=nms_kind)
    records = gen.generate(image)
    assert records, "all-pass thresholds on a random model give masks"
    for r in records:
        assert set(r) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
                          "stability_score", "crop_box"}  # fmt: skip
        seg = r["segmentation"]
        assert seg.shape == (90, 120) and seg.dtype == bool
        assert r["area"] == seg.sum() > 0
        ys, xs = np.nonzero(seg)
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert r["crop_box"] == [0, 0, 120, 90]


def test_output_modes_agree(tiny_model, image):
    outs = {
        mode: MaskGenerator(tiny_model, **ALL_PASS, output_mode=mode).generate(image)
        for mode in ("binary_mask", "uncompressed_rle", "coco_rle")
    }
    for b, u, c in zip(*outs.values(), strict=True):
        np.testing.assert_array_equal(rle_to_mask(u["segmentation"]), b["segmentation"])
        assert c["segmentation"] == rle_to_coco(u["segmentation"])


def test_generate_labels(tiny_model, image):
    gen = MaskGenerator(tiny_model, **ALL_PASS)
    labels = gen.generate_labels(image)
    assert labels.shape == (90, 120) and labels.dtype == np.uint32
    ids = np.unique(labels)
    assert ids[0] == 0 and (ids[1:] == np.arange(1, len(ids))).all()


def test_generate_labels_info_matches_records(tiny_model, image):
    gen = MaskGenerator(
        tiny_model, **ALL_PASS, box_nms_thresh=1.0, nms="box", min_visible_fraction=0.0,
        max_covered_fraction=1.0,
    )  # fmt: skip
    records = gen.generate(image)
    labels, info = gen.generate_labels(image, return_info=True)
    n = int(labels.max())
    assert n > 1 and all(len(v) == n for v in info.values())
    # a higher predicted IoU gets the lower id, and every id comes from one record
    assert (np.diff(info["predicted_iou"]) <= 0).all()
    for k, i in enumerate(info["order"]):
        rec = records[i]
        assert info["predicted_iou"][k] == rec["predicted_iou"]
        assert info["stability_score"][k] == rec["stability_score"]
        assert info["mask_area"][k] == rec["area"]
        assert info["point_coords"][k].tolist() == rec["point_coords"][0]
        # the label's pixels are a subset of its mask
        assert rec["segmentation"][labels == k + 1].all()


def test_generate_labels_min_visible_fraction(tiny_model, image):
    """The default drops objects mostly hidden under better ones; 0 keeps their slivers."""
    kw = dict(ALL_PASS, box_nms_thresh=1.0, nms="box", max_covered_fraction=1.0)
    keep_all, info_all = MaskGenerator(tiny_model, **kw, min_visible_fraction=0.0).generate_labels(
        image, return_info=True
    )
    labels, info = MaskGenerator(tiny_model, **kw).generate_labels(image, return_info=True)
    visible = np.bincount(keep_all.ravel(), minlength=len(info_all["order"]) + 1)[1:]
    slivers = visible < 0.5 * info_all["mask_area"]
    assert slivers.any() and not slivers.all()  # random masks overlap a lot
    # the same objects minus the slivers, in the same order, with dense ids
    np.testing.assert_array_equal(info["order"], info_all["order"][~slivers])
    assert labels.max() == (~slivers).sum()
    for k, i in enumerate(info_all["order"]):
        if slivers[k]:
            assert not labels[keep_all == k + 1].any()  # background, not handed on
        else:
            new = int(np.flatnonzero(info["order"] == i)[0]) + 1
            np.testing.assert_array_equal(labels == new, keep_all == k + 1)


def test_nothing_passes_is_normal(tiny_model, image):
    gen = MaskGenerator(tiny_model, points_per_side=4, pred_iou_thresh=1.0)
    assert gen.generate(image) == []
    labels = gen.generate_labels(image)
    assert labels.shape == (90, 120) and not labels.any()
    labels, info = gen.generate_labels(image, return_info=True)
    assert not labels.any() and info["predicted_iou"].shape == (0,)
    assert info["point_coords"].shape == (0, 2)


def test_crop_layers_tiles_and_small_regions(tiny_model, rng):
    img = rng.integers(0, 255, size=(150, 300), dtype=np.uint16)
    gen = MaskGenerator(
        tiny_model, **ALL_PASS, crop_n_layers=1, min_mask_region_area=20, tile_size=100,
        tile_overlap=30, output_mode="uncompressed_rle",
    )  # fmt: skip
    records = gen.generate(img)
    crop_boxes = {tuple(r["crop_box"]) for r in records}
    assert all(x0 + w <= 300 and y0 + h <= 150 for x0, y0, w, h in crop_boxes)
    labels = gen.generate_labels(img)
    assert labels.max() <= len(records)


def test_auto_tiles_only_for_large_images(tiny_model):
    gen = MaskGenerator(tiny_model, points_per_side=2)
    assert len(gen._crop_boxes((200, 250))[0]) == 1  # tiny model input is 128: limit 256
    boxes, layers = gen._crop_boxes((300, 600))
    assert len(boxes) > 1 and boxes[0] == [0, 0, 600, 300] and set(layers) == {0}
    assert (
        len(MaskGenerator(tiny_model, points_per_side=2, tile_size=0)._crop_boxes((300, 600))[0])
        == 1
    )


def test_reference_and_fast_agree_on_tiny_model(tiny_model, image):
    fast = MaskGenerator(tiny_model, **ALL_PASS, nms="box").generate(image)
    ref = MaskGenerator(tiny_model, **ALL_PASS, nms="box", mode="reference").generate(image)
    ref = [r for r in ref if r["area"] > 0]
    assert len(fast) == len(ref)
    for f, r in zip(fast, ref, strict=True):
        inter = np.count_nonzero(f["segmentation"] & r["segmentation"])
        union = np.count_nonzero(f["segmentation"] | r["segmentation"])
        assert inter / union > 0.99


def test_accepts_predictor_and_rejects_other(tiny_model):
    MaskGenerator(Predictor(tiny_model), points_per_side=2)
    with pytest.raises(TypeError, match="Sam model, a Predictor or a registry name"):
        MaskGenerator(3.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"points_per_side": None}, "exactly one of points_per_side and point_grids"),
        ({"point_grids": [np.zeros((1, 2))]}, "exactly one of"),
        ({"points_per_side": 0}, r"points_per_side must be in \[1, 1024\], got 0"),
        ({"points_per_batch": 0}, "points_per_batch must be >= 1"),
        ({"crop_n_layers": -1}, "crop_n_layers must be >= 0"),
        ({"crop_n_points_downscale_factor": 0}, "crop_n_points_downscale_factor"),
        ({"min_mask_region_area": -5}, "min_mask_region_area"),
        ({"points_per_side": 1025}, r"points_per_side must be in \[1, 1024\], got 1025"),
        ({"pred_iou_thresh": 1.5}, r"pred_iou_thresh must be a number in \[0, 1\]"),
        ({"stability_score_thresh": -0.1}, "stability_score_thresh"),
        ({"box_nms_thresh": "a"}, "box_nms_thresh"),
        ({"crop_nms_thresh": 2}, "crop_nms_thresh"),
        ({"crop_overlap_ratio": -1}, "crop_overlap_ratio"),
        ({"min_visible_fraction": 1.2}, r"min_visible_fraction must be a number in \[0, 1\]"),
        ({"max_covered_fraction": -0.5}, r"max_covered_fraction must be a number in \[0, 1\]"),
        ({"max_covered_fraction": None}, "max_covered_fraction"),
        ({"stability_score_offset": 0}, "stability_score_offset must be a positive number"),
        ({"output_mode": "png"}, "output_mode must be one of"),
        ({"nms": "soft"}, "nms must be 'auto', 'mask' or 'box'"),
        ({"mode": "turbo"}, "mode must be 'auto', 'fast', 'reference' or 'device'"),
        ({"mode": "reference", "nms": "mask"}, "uses nms='box'"),
        ({"mode": "device", "nms": "mask"}, "uses nms='box'"),
        ({"tile_size": -1}, "tile_size must be >= 0"),
        ({"tile_size": 100, "tile_overlap": 100}, "tile_overlap .* smaller than tile_size"),
        ({"tile_overlap": -1}, "tile_overlap must be >= 0"),
        (
            {"points_per_side": None, "point_grids": [np.zeros((2, 2))], "crop_n_layers": 1},
            "one grid per crop layer",
        ),
        ({"points_per_side": None, "point_grids": [np.full((2, 2), 2.0)]}, r"values in \[0, 1\]"),
    ],
)
def test_parameter_errors(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskGenerator(tiny_model, **kwargs)


def test_integer_parameters_must_be_ints(tiny_model):
    with pytest.raises(TypeError, match="points_per_batch must be an int, got 2.5"):
        MaskGenerator(tiny_model, points_per_batch=2.5)
    with pytest.raises(TypeError, match="points_per_side must be an int, got True"):
        MaskGenerator(tiny_model, points_per_side=True)


@torch.no_grad()
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_early_iou_filter_changes_nothing(tiny_model, image, rng, precision):
    pred = Predictor(tiny_model, precision=precision)
    pred.set_image(image)
    decoder = pred.engine.grid_decoder  # in chunks of a few prompts on a CPU
    state = decoder.prepare(pred.features)
    coords = torch.as_tensor(rng.uniform(0, 128, size=(9, 1, 2)), dtype=torch.float32)
    prompts = Prompts(coords, torch.ones(9, 1, dtype=torch.int64))
    every = decoder.decode(state, prompts)
    assert every.rows.tolist() == list(range(9))
    thresh = float(every.iou.max(dim=1).values.median())  # some prompts pass, some do not
    got = decoder.decode(state, prompts, min_iou=thresh)
    want = torch.nonzero((every.iou > thresh).any(dim=1)).flatten()
    assert 0 < len(got.rows) < 9 and got.rows.tolist() == want.tolist()
    torch.testing.assert_close(got.iou, every.iou[got.rows])
    torch.testing.assert_close(got.low_res, every.low_res[got.rows], rtol=1e-5, atol=1e-5)
    none = decoder.decode(state, prompts, min_iou=1e9)
    assert none.low_res.shape == (0, 3, 32, 32) and len(none.rows) == 0


def test_reference_mode_runs_the_reference_computation(tiny_model):
    gen = MaskGenerator(tiny_model, points_per_side=2, mode="reference", nms="box")
    engine = gen.predictor.engine
    assert (
        gen.pipeline.decoder is engine.reference_decoder and engine.reference_decoder.is_reference
    )
    assert gen.model is tiny_model
    pred = Predictor(tiny_model)
    ref = MaskGenerator(pred, points_per_side=2, mode="reference", nms="box")
    assert ref.predictor is pred  # no second predictor: the same engine's reference decoder
    assert pred.decoder_cache and pred.factorized


def test_precision_goes_to_the_predictor_and_reference_mode(tiny_model):
    from napari_mobilesam.predictor import Predictor

    gen = MaskGenerator(tiny_model, points_per_side=2, precision="bf16")
    assert gen.predictor.precision == "bf16"
    ref = MaskGenerator(
        tiny_model, points_per_side=2, precision="bf16", mode="reference", nms="box"
    )
    assert ref.predictor.precision == "bf16" and ref.pipeline.decoder.is_reference
    assert MaskGenerator(tiny_model, points_per_side=2).predictor.precision == "fp32"
    labels = gen.generate_labels(np.zeros((40, 50, 3), np.uint8))
    assert labels.shape == (40, 50)
    with pytest.raises(ValueError, match="precision= are for a model or a name"):
        MaskGenerator(Predictor(tiny_model), points_per_side=2, precision="fp16")


def test_device_mode_needs_box_nms(tiny_model):
    with pytest.raises(ValueError, match="mode='device' follows segment-anything"):
        MaskGenerator(tiny_model, mode="device", nms="mask")
    assert MaskGenerator(tiny_model, mode="device").nms == "box"  # nms="auto"
    with pytest.raises(ValueError, match="'fast', 'reference' or 'device'"):
        MaskGenerator(tiny_model, mode="gpu")
