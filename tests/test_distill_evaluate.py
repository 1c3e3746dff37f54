"""``distill.evaluate``: student-vs-teacher mask mIoU and embedding MSE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.draw import disk, polygon, rectangle

from napari_mobilesam.build import build_sam
from napari_mobilesam.distill import data
from napari_mobilesam.distill.evaluate import (
    evaluate,
    format_report,
    mask_iou,
    points_in_mask,
    sample_prompts,
    xywh_to_xyxy,
)
from napari_mobilesam.distill.models import config_to_dict

from .conftest import TINY_CONFIG, _randomize

# -- shared helpers (also used by the fine-tuning tests) -------------------------------


def shape_masks(h: int, w: int, seed: int) -> list[np.ndarray]:
    """Three non-empty bool (h, w) masks: a disk, a rectangle and a triangle."""
    rng = np.random.default_rng(seed)
    out = []
    m = np.zeros((h, w), bool)
    r = min(h, w) // 5
    m[disk((rng.integers(r, h - r), rng.integers(r, w - r)), r, shape=(h, w))] = True
    out.append(m)
    m = np.zeros((h, w), bool)
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    rr, cc = rectangle((y0, x0), extent=(h // 3, w // 4), shape=(h, w))
    m[rr, cc] = True
    out.append(m)
    m = np.zeros((h, w), bool)
    rr, cc = polygon([h - 2, h - 2, h // 2], [2, w // 2, w // 4], shape=(h, w))
    m[rr, cc] = True
    out.append(m)
    return out


def write_image(path: Path, masks: list[np.ndarray], seed: int, annotate: bool) -> None:
    """An RGB PNG: noise with each mask painted in its own colour (+ SA-1B JSON)."""
    rng = np.random.default_rng(seed)
    h, w = masks[0].shape
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    for m in masks:
        img[m] = rng.integers(80, 256, size=3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    if annotate:
        anns = []
        for m in masks:
            ys, xs = np.nonzero(m)
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
            anns.append(
                {
                    "segmentation": data.rle_encode(m),
                    "bbox": bbox,
                    "point_coords": [[int(xs[0]), int(ys[0])]],
                }
            )
        data.annotation_path(path).write_text(
            json.dumps({"image": {"height": h, "width": w}, "annotations": anns})
        )


def write_dataset(folder: Path, annotated=(True, True, False)) -> Path:
    """Images of different sizes (64-128 px), annotated as asked."""
    sizes = [(96, 80), (64, 112), (128, 100)]
    for i, ann in enumerate(annotated):
        h, w = sizes[i % len(sizes)]
        write_image(folder / f"img_{i}.png", shape_masks(h, w, seed=i), seed=i, annotate=ann)
    return folder


def tiny_checkpoint(path: Path, seed: int = 0, encoder_seed: int | None = None) -> Path:
    """A random tiny model saved as a plain state dict. ``encoder_seed``: a student of
    that teacher (same prompt encoder and decoder, another random image encoder)."""
    state = _randomize(build_sam(TINY_CONFIG), seed).state_dict()
    if encoder_seed is not None:
        other = _randomize(build_sam(TINY_CONFIG), encoder_seed).state_dict()
        state = {k: other[k] if k.startswith("image_encoder.") else v for k, v in state.items()}
    torch.save(state, path)
    return path


@pytest.fixture
def setup(tmp_path):
    images = write_dataset(tmp_path / "images")
    teacher = tiny_checkpoint(tmp_path / "teacher.pt", seed=0)
    student = tiny_checkpoint(tmp_path / "student.pt", seed=0, encoder_seed=7)
    return {"images": images, "teacher": teacher, "student": student}


def _run(setup, student=None, **kwargs):
    kwargs.setdefault("n", 6)
    return evaluate(
        student or setup["student"],
        TINY_CONFIG,
        setup["teacher"],
        setup["images"],
        student_model=TINY_CONFIG,
        device="cpu",
        progress=False,
        **kwargs,
    )


# -- the evaluation ----------------------------------------------------------------------


@pytest.mark.parametrize("prompts", ["points", "boxes", "both"])
def test_student_equal_to_teacher_is_perfect(setup, prompts):
    res = _run(setup, student=setup["teacher"], prompts=prompts)
    assert res["miou"] == 1.0 and res["embedding_mse"] == 0.0
    assert res["n_images"] == 3
    assert all(r["miou"] == 1.0 and r["embedding_mse"] == 0.0 for r in res["per_image"])
    assert (res["miou_points"] is None) == (prompts == "boxes")
    assert (res["miou_boxes"] is None) == (prompts == "points")
    # 6 points per image; boxes: 3 annotated boxes (two images), 6 random (the third)
    n_points = 18 if prompts != "boxes" else 0
    n_boxes = 3 + 3 + 6 if prompts != "points" else 0
    assert (res["n_points"], res["n_boxes"]) == (n_points, n_boxes)
    assert res["n_prompts"] == n_points + n_boxes


def test_different_student_scores_below_one(setup):
    res = _run(setup)
    assert 0.0 <= res["miou"] < 1.0
    assert res["embedding_mse"] > 0.0
    assert res["miou_points"] < 1.0 or res["miou_boxes"] < 1.0
    assert [r["image"] for r in res["per_image"]] == ["img_0.png", "img_1.png", "img_2.png"]
    # the overall mIoU pools every prompt
    total = sum(r["miou"] * r["n_prompts"] for r in res["per_image"]) / res["n_prompts"]
    assert res["miou"] == pytest.approx(total, rel=1e-6)


def test_student_model_as_json_config_and_limit(setup, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(config_to_dict(TINY_CONFIG)))
    res = evaluate(
        setup["student"], cfg, setup["teacher"], setup["images"], student_model=cfg,
        n=3, limit=2, device="cpu", progress=False,
    )  # fmt: skip
    assert res["n_images"] == 2 and res["student_model"] == str(cfg)
    full = _run(setup, n=3)
    assert res["per_image"] == full["per_image"][:2]


def test_deterministic_in_seed(setup):
    a = _run(setup, seed=3)
    b = _run(setup, seed=3)
    c = _run(setup, seed=4)
    assert a == b
    assert [r["miou"] for r in a["per_image"]] != [r["miou"] for r in c["per_image"]]


def test_format_report(setup):
    res = _run(setup, prompts="points", n=2)
    text = format_report(res)
    lines = text.splitlines()
    assert lines[0].startswith("mIoU: ") and lines[0] == f"mIoU: {res['miou']:.4f}"
    assert lines[1].startswith("mIoU points: ") and "6 prompts" in lines[1]
    assert lines[2] == "mIoU boxes: n/a"
    assert lines[3].startswith("embedding MSE: ")
    assert "images: 3, prompts: 6" in text


# -- prompts ----------------------------------------------------------------------------


def test_annotated_prompts_follow_the_annotations(tmp_path):
    masks = shape_masks(96, 80, seed=0)
    path = tmp_path / "a.png"
    write_image(path, masks, seed=0, annotate=True)
    anns = data.read_annotations(path)
    p = sample_prompts((96, 80), anns, 30, seed=1, index=0)
    union = np.logical_or.reduce(masks)
    pts = p["points"].astype(int)
    assert p["points"].shape == (30, 2)
    assert union[pts[:, 1], pts[:, 0]].all()  # (x, y): inside an annotated mask
    # every mask is used (30 points cycle over 3 masks)
    hit = [m[pts[:, 1], pts[:, 0]].sum() for m in masks]
    assert all(h >= 10 for h in hit)
    # boxes are the annotated boxes, XYXY
    want = {tuple(xywh_to_xyxy(a["bbox"])) for a in anns}
    assert p["boxes"].shape == (3, 4) and {tuple(b) for b in p["boxes"]} == want
    b = sample_prompts((96, 80), anns, 2, seed=1, index=0, kinds="boxes")
    assert b["boxes"].shape == (2, 4) and b["points"].shape == (0, 2)


def test_random_prompts_without_annotations():
    p = sample_prompts((64, 112), [], 200, seed=0, index=5)
    pts, boxes = p["points"], p["boxes"]
    assert pts.shape == (200, 2) and boxes.shape == (200, 4)
    assert (pts[:, 0] >= 0).all() and (pts[:, 0] < 112).all()
    assert (pts[:, 1] >= 0).all() and (pts[:, 1] < 64).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 112).all() and (boxes[:, 3] <= 64).all()
    assert (boxes[:, 2] - boxes[:, 0] >= 4 - 1e-9).all()  # 64 / 16
    assert (boxes[:, 3] - boxes[:, 1] >= 4 - 1e-9).all()
    # points alone are the points of "both"; seed and index change them
    only = sample_prompts((64, 112), [], 200, seed=0, index=5, kinds="points")
    np.testing.assert_array_equal(only["points"], pts)
    assert not np.array_equal(sample_prompts((64, 112), [], 200, seed=1, index=5)["points"], pts)
    assert not np.array_equal(sample_prompts((64, 112), [], 200, seed=0, index=6)["boxes"], boxes)


def test_points_in_mask_and_iou():
    mask = np.zeros((10, 12), bool)
    mask[2, 7] = True
    pts = points_in_mask(mask, np.random.default_rng(0), 3)
    np.testing.assert_array_equal(pts, [[7, 2]] * 3)
    with pytest.raises(ValueError, match="mask is empty"):
        points_in_mask(np.zeros((4, 4), bool), np.random.default_rng(0))
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[1, :2] = True
    b[1, :1] = True
    a[2, 0] = True
    iou = mask_iou(a, b)
    assert iou.tolist() == [1.0, 0.5, 0.0]


def test_mask_of_wrong_size_is_a_data_error(tmp_path):
    masks = shape_masks(96, 80, seed=0)
    path = tmp_path / "a.png"
    write_image(path, masks, seed=0, annotate=True)
    anns = data.read_annotations(path)
    with pytest.raises(data.DataError, match=r"96x80 mask, the image is 80x96"):
        sample_prompts((80, 96), anns, 3, source="a.png")


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompts": "masks"}, "prompts must be one of"),
        ({"n": 0}, "n must be a positive"),
        ({"n": 2.5}, "n must be a positive"),
        ({"limit": 0}, "limit must be a positive"),
    ],
)
def test_bad_arguments(setup, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(setup, **kwargs)


def test_sample_prompts_bad_arguments():
    with pytest.raises(ValueError, match="prompts must be one of"):
        sample_prompts((8, 8), [], 1, kinds="lines")
    with pytest.raises(ValueError, match="n must be a positive"):
        sample_prompts((8, 8), [], 0)


def test_student_of_another_embedding_shape(setup, tmp_path):
    import dataclasses

    other = dataclasses.replace(
        TINY_CONFIG, encoder=dataclasses.replace(TINY_CONFIG.encoder, img_size=64)
    )
    ckpt = tmp_path / "small.pt"
    torch.save(build_sam(other).state_dict(), ckpt)
    with pytest.raises(ValueError, match="embeds 64 px"):
        evaluate(ckpt, TINY_CONFIG, setup["teacher"], setup["images"], student_model=other,
                 device="cpu", progress=False)  # fmt: skip


def test_no_images(setup, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no images"):
        _run({**setup, "images": tmp_path / "empty"})


# -- teacher embeddings from a store ---------------------------------------------------


def _teacher_store(setup, folder: Path, rows=None, weights=None, shape=None):
    """A store of the teacher's embeddings of ``setup``'s images (rows ``rows`` done)."""
    from napari_mobilesam.distill.models import load_sam
    from napari_mobilesam.distill.store import EmbeddingStore
    from napari_mobilesam.weights import sha256_file

    teacher = load_sam(TINY_CONFIG, setup["teacher"])
    paths = data.find_images(setup["images"])
    rel = [p.relative_to(setup["images"]).as_posix() for p in paths]
    emb = 8
    meta = {
        "teacher": "tiny", "teacher_weights": str(setup["teacher"]),
        "teacher_sha256": sha256_file(weights or setup["teacher"]),
        "img_size": 128, "pixel_mean": list(TINY_CONFIG.pixel_mean),
        "pixel_std": list(TINY_CONFIG.pixel_std),
    }  # fmt: skip
    store = EmbeddingStore.create(folder, rel, shape or (32, emb, emb), meta)
    rows = range(len(paths)) if rows is None else rows
    for r in rows:
        x, _ = data.preprocess(data.load_image(paths[r]), 128)
        with torch.no_grad():
            feat = teacher.image_encoder(x[None])
        store.write([r], feat if shape is None else torch.zeros(1, *shape))
    return folder


def test_teacher_embeddings_from_a_store(setup, tmp_path):
    pytest.importorskip("zarr")
    store = _teacher_store(setup, tmp_path / "store")
    direct = _run(setup, n=8)
    stored = _run(setup, n=8, embeddings=store)
    assert stored["n_images"] == 3 and stored["skipped"] == 0
    assert stored["embeddings"] == str(store)
    # the store rounds the teacher's embeddings to float16: nearly the same result
    for a, b in zip(direct["per_image"], stored["per_image"], strict=True):
        assert a["image"] == b["image"]
        assert b["miou"] == pytest.approx(a["miou"], abs=0.02)
        assert b["embedding_mse"] == pytest.approx(a["embedding_mse"], rel=1e-2)
    same = _run(setup, student=setup["teacher"], n=8, embeddings=store)
    assert same["miou"] > 0.98 and same["embedding_mse"] < 1e-4 * direct["embedding_mse"]


def test_store_rows_not_done_are_skipped(setup, tmp_path):
    pytest.importorskip("zarr")
    store = _teacher_store(setup, tmp_path / "store", rows=[1])
    res = _run(setup, n=2, embeddings=store)
    assert [r["image"] for r in res["per_image"]] == ["img_1.png"] and res["skipped"] == 2
    assert "(2 images skipped)" in format_report(res)
    empty = _teacher_store(setup, tmp_path / "empty", rows=[])
    with pytest.raises(data.DataError, match="no finished embedding"):
        _run(setup, n=2, embeddings=empty)


def test_store_of_other_teacher_weights(setup, tmp_path):
    pytest.importorskip("zarr")
    store = _teacher_store(setup, tmp_path / "store", rows=[], weights=setup["student"])
    with pytest.raises(ValueError, match="sha256"):
        _run(setup, n=2, embeddings=store)


def test_store_of_other_shape(setup, tmp_path):
    pytest.importorskip("zarr")
    store = _teacher_store(setup, tmp_path / "store", rows=[0], shape=(16, 8, 8))
    with pytest.raises(ValueError, match=r"hold \(16, 8, 8\) embeddings"):
        _run(setup, n=2, embeddings=store)


def test_not_a_store(setup, tmp_path):
    with pytest.raises(data.DataError, match="not an embedding store"):
        _run(setup, n=2, embeddings=tmp_path)
