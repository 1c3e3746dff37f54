"""``distill.finetune``: mask-decoder fine-tuning with the image encoder frozen."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from napari_mobilesam.build import build_sam, load_state_dict_checked, read_state_dict
from napari_mobilesam.distill import data
from napari_mobilesam.distill.finetune import (
    LOG_FIELDS,
    dice_loss,
    finetune_decoder,
    low_res_target,
    sigmoid_focal_loss,
)

from .conftest import TINY_CONFIG
from .test_distill_evaluate import tiny_checkpoint, write_dataset


@pytest.fixture
def setup(tmp_path):
    images = write_dataset(tmp_path / "images", annotated=(True, True, False))
    ckpt = tiny_checkpoint(tmp_path / "student.pt", seed=0)
    return {"images": images, "checkpoint": ckpt, "out": tmp_path / "run"}


def _run(setup, **kwargs):
    kwargs.setdefault("masks_per_image", 4)
    return finetune_decoder(
        setup["checkpoint"], setup["images"], setup["out"], model=TINY_CONFIG, device="cpu",
        progress=False, **kwargs,
    )  # fmt: skip


def test_finetune_lowers_the_loss_and_trains_only_the_decoder(setup):
    res = _run(setup, epochs=6, lr=3e-3)
    assert res["steps"] == 12 and res["images"] == 2 and res["epochs"] == 6
    with open(res["log"]) as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == LOG_FIELDS
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert [int(r["epoch"]) for r in rows] == [e for e in range(6) for _ in range(2)]
    loss = np.array([float(r["loss"]) for r in rows])
    assert res["first_loss"] == pytest.approx(loss[0]) and res["final_loss"] == pytest.approx(
        loss[-1]
    )
    assert loss[-4:].mean() < 0.85 * loss[:4].mean()
    for r in rows:  # the logged total is the weighted sum of its terms
        total = 20 * float(r["focal"]) + float(r["dice"]) + float(r["iou_loss"])
        assert float(r["loss"]) == pytest.approx(total, rel=1e-5)
        assert float(r["lr"]) == 3e-3

    before = read_state_dict(setup["checkpoint"])
    after = read_state_dict(res["checkpoint"])
    for key, value in before.items():
        if key.startswith(("image_encoder.", "prompt_encoder.")):
            assert torch.equal(after[key], value), key
    changed = [k for k in before if k.startswith("mask_decoder.") and
               not torch.equal(after[k], before[k])]  # fmt: skip
    assert len(changed) > 10
    # a complete checkpoint in the official format
    model = build_sam(TINY_CONFIG)
    load_state_dict_checked(model, after, source="finetuned.pt")
    assert "image_encoder.head.weight" in after  # TinyViT's classifier keys, as official


def test_finetune_is_deterministic(setup, tmp_path):
    a = _run(setup, seed=1)
    b = _run({**setup, "out": tmp_path / "b"}, seed=1)
    c = _run({**setup, "out": tmp_path / "c"}, seed=2)
    assert (a["first_loss"], a["final_loss"]) == (b["first_loss"], b["final_loss"])
    assert (a["first_loss"], a["final_loss"]) != (c["first_loss"], c["final_loss"])


def test_loss_weights_and_limit(setup):
    res = _run(setup, epochs=1, limit=1, focal_weight=0.0, dice_weight=1.0, iou_weight=0.0)
    assert res["steps"] == 1 and res["images"] == 1
    with open(res["log"]) as fh:
        row = next(csv.DictReader(fh))
    assert float(row["loss"]) == pytest.approx(float(row["dice"]))


def test_no_annotations_is_a_data_error(tmp_path):
    images = write_dataset(tmp_path / "images", annotated=(False, False))
    ckpt = tiny_checkpoint(tmp_path / "s.pt")
    with pytest.raises(data.DataError, match="no SA-1B annotations .* found in .*images"):
        finetune_decoder(ckpt, images, tmp_path / "out", model=TINY_CONFIG, progress=False)


def test_only_empty_masks_is_a_data_error(tmp_path):
    images = write_dataset(tmp_path / "images", annotated=(False,))
    empty = {"segmentation": data.rle_encode(np.zeros((96, 80), bool)), "bbox": [0, 0, 0, 0]}
    data.annotation_path(images / "img_0.png").write_text(json.dumps({"annotations": [empty]}))
    ckpt = tiny_checkpoint(tmp_path / "s.pt")
    with pytest.raises(data.DataError, match="no non-empty annotated mask"):
        finetune_decoder(ckpt, images, tmp_path / "out", model=TINY_CONFIG, device="cpu",
                         progress=False)  # fmt: skip


def test_mask_of_wrong_size_is_a_data_error(tmp_path):
    images = write_dataset(tmp_path / "images", annotated=(False,))
    wrong = {"segmentation": data.rle_encode(np.ones((80, 96), bool)), "bbox": [0, 0, 96, 80]}
    data.annotation_path(images / "img_0.png").write_text(json.dumps({"annotations": [wrong]}))
    ckpt = tiny_checkpoint(tmp_path / "s.pt")
    with pytest.raises(data.DataError, match="80x96 mask, the image is 96x80"):
        finetune_decoder(ckpt, images, tmp_path / "out", model=TINY_CONFIG, device="cpu",
                         progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"masks_per_image": 0}, "masks_per_image"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"focal_weight": -1.0}, "focal_weight"),
        ({"dice_weight": "1"}, "dice_weight"),
        ({"iou_weight": -0.5}, "iou_weight"),
        ({"limit": 0}, "limit"),
    ],
)
def test_bad_arguments(setup, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        _run(setup, **kwargs)


def test_all_loss_weights_zero(setup):
    with pytest.raises(ValueError, match="must not all be 0"):
        _run(setup, focal_weight=0.0, dice_weight=0.0, iou_weight=0.0)


def test_low_res_target_frame():
    # a 100 x 50 (H x W) image -> 128 x 64 input inside a 128 square -> 32 x 32 logits
    mask = torch.zeros(1, 100, 50, dtype=torch.bool)
    mask[0, :50, :25] = True  # the top-left quarter of the image
    t = low_res_target(mask, 128, (128, 64), (32, 32))
    assert t.shape == (1, 1, 32, 32) and t.dtype == torch.float32
    expected = torch.zeros(32, 32)
    expected[:16, :8] = 1
    assert torch.equal(t[0, 0], expected)


def test_loss_functions():
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    perfect = torch.tensor([[20.0, -20.0, 20.0, -20.0]])
    wrong = -perfect
    assert sigmoid_focal_loss(perfect, target) < 1e-8 < sigmoid_focal_loss(wrong, target)
    assert dice_loss(perfect, target) < 1e-6
    assert dice_loss(wrong, target) == pytest.approx(1 - 1 / 5, abs=1e-6)  # 1 - 1 / (2 + 2 + 1)
    # focal at logit 0: alpha_t * 0.5**2 * log 2 averaged over y=1 (0.25) and y=0 (0.75)
    zero = torch.zeros(1, 4)
    assert sigmoid_focal_loss(zero, target) == pytest.approx(0.5 * 0.25 * np.log(2), rel=1e-6)
