"""Training pieces: window logits, prompts, losses, the step, data, metrics, evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from napari_mobilesam import synthetic
from napari_mobilesam.training import metrics
from napari_mobilesam.training.data import DataError, Pair, find_pairs, load_examples, split_pairs
from napari_mobilesam.training.decoder import Window, decode_tokens, window_logits
from napari_mobilesam.training.evaluate import centre_point, evaluate
from napari_mobilesam.training.losses import dice_loss_per_mask, focal_loss_per_mask, mask_iou
from napari_mobilesam.training.prompts import (
    background_points,
    corrective_points,
    noisy_boxes,
    points_from_masks,
)
from napari_mobilesam.training.step import StepConfig, interactive_loss


@pytest.mark.parametrize("multimask", [True, False])
def test_window_logits_equal_the_full_decoder_output(tiny_model, multimask):
    torch.manual_seed(0)
    emb = torch.randn(1, 32, 8, 8)
    coords = torch.rand(3, 2, 2) * 128
    labels = torch.tensor([[1, 0], [1, 1], [1, -1]])
    with torch.no_grad():
        sparse, dense = tiny_model.prompt_encoder((coords, labels), None, None)
        full, iou_full = tiny_model.mask_decoder(
            emb, tiny_model.prompt_encoder.get_dense_pe(), sparse, dense, multimask
        )
        hyper, iou, keys = decode_tokens(tiny_model, emb, sparse, dense, multimask)
        torch.testing.assert_close(iou, iou_full, rtol=1e-5, atol=1e-5)
        win = Window(1, 5, 2, 8)
        far = torch.tensor([0, 9, 63])
        for b in range(3):
            w, f = window_logits(tiny_model, keys[b : b + 1], hyper[b], (8, 8), win, far)
            torch.testing.assert_close(w, full[b][:, 4:20, 8:32], rtol=1e-4, atol=1e-4)
            for k, t in enumerate(far.tolist()):
                r, c = divmod(t, 8)
                block = full[b][:, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
                torch.testing.assert_close(f[:, k], block, rtol=1e-4, atol=1e-4)


def test_window_around_covers_the_target_with_a_margin():
    t = torch.zeros(32, 32, dtype=torch.bool)
    t[10:14, 20:22] = True
    w = Window.around(t, (8, 8), grow=0.5, min_tokens=2)
    rows, cols = w.pixels
    assert rows.start <= 10 and rows.stop >= 14 and cols.start <= 20 and cols.stop >= 22
    assert 0 <= w.t0 < w.t1 <= 8 and 0 <= w.u0 < w.u1 <= 8


def test_points_from_masks_fall_inside_and_scale():
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[0, 2, 3] = True
    masks[1, 7:9, 1:3] = True
    gen = torch.Generator().manual_seed(0)
    xy = points_from_masks(masks, gen, scale=2.0)
    assert xy[0].tolist() == [6.0, 4.0]
    x, y = (xy[1] / 2).long().tolist()
    assert masks[1, y, x]
    with pytest.raises(ValueError, match="non-empty"):
        points_from_masks(torch.zeros(1, 4, 4, dtype=torch.bool), gen, 1.0)


def test_noisy_boxes_stay_ordered_and_bounded():
    gen = torch.Generator().manual_seed(1)
    boxes = torch.tensor([[10.0, 10.0, 20.0, 30.0]]).repeat(200, 1)
    out = noisy_boxes(boxes, gen, frac=0.5, max_px=3.0)
    assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()
    assert (out - boxes).abs().max() <= 6.0  # a swap can move a corner by 2 * max_px
    assert (out != boxes).any()


def test_corrective_points_come_from_the_error_region():
    target = torch.zeros(3, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    pred = target.clone()
    pred[0, 2:6, 2:4] = False  # missed part -> foreground click there
    pred[1, 0, 0] = True  # spill -> background click on it
    gen = torch.Generator().manual_seed(0)
    xy, lab = corrective_points(pred, target, gen, scale=1.0)
    assert lab.tolist() == [1, 0, 1]  # no error: a confirming click inside the object
    assert 2 <= xy[0, 0] + 0.5 < 4 and 2 <= xy[0, 1] + 0.5 < 6
    assert xy[1].tolist() == [0.0, 0.0]
    assert target[2, int(xy[2, 1]), int(xy[2, 0])]


def test_background_points_avoid_objects():
    labels = np.zeros((40, 40), np.uint32)
    labels[5:35, 5:35] = 1
    pts = background_points(labels, 50, np.random.default_rng(0), margin=2)
    assert len(pts) == 50
    assert not labels[pts[:, 1].astype(int), pts[:, 0].astype(int)].any()
    assert len(background_points(np.ones((5, 5), np.uint32), 3, np.random.default_rng(0))) == 0


def test_losses_are_low_for_right_and_high_for_wrong_logits():
    target = torch.zeros(1, 16, 16)
    target[0, 4:12, 4:12] = 1
    right = (target * 2 - 1) * 10
    assert focal_loss_per_mask(right, target) < 1e-4
    assert dice_loss_per_mask(right, target) < 0.01
    assert focal_loss_per_mask(-right, target) > 1 and dice_loss_per_mask(-right, target) > 0.9
    assert mask_iou(right > 0, target.bool()).item() == 1.0
    assert mask_iou(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4)).item() == 1.0


def _labels(seed=0, shape=(128, 128)):
    return synthetic.cells_2d(shape, seed=seed, radius=(10, 20)).labels


def test_interactive_loss_backpropagates_into_decoder_and_encoder(tiny_model):
    tiny_model.train()
    x = torch.randn(1, 3, 128, 128)
    emb = tiny_model.image_encoder(x)
    cfg = StepConfig(objects=4, rounds=3, background=2, far_tokens=4)
    loss, parts = interactive_loss(
        tiny_model, emb, (128, 128), _labels(), cfg, np.random.default_rng(0)
    )
    assert torch.isfinite(loss) and 0 <= parts["miou"] <= 1 and parts["objects"] == 4
    loss.backward()
    grads = [p.grad for p in tiny_model.mask_decoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert tiny_model.image_encoder.neck[0].weight.grad.abs().sum() > 0


def test_interactive_loss_is_none_without_objects(tiny_model):
    emb = torch.randn(1, 32, 8, 8)
    labels = np.zeros((64, 64), np.uint32)
    labels[0, 0] = 1  # below min_area
    assert (
        interactive_loss(
            tiny_model, emb, (128, 128), labels, StepConfig(), np.random.default_rng(0)
        )
        is None
    )


def test_neighbour_weight_charges_masks_that_spill_into_touching_cells():
    from napari_mobilesam.training.decoder import Window
    from napari_mobilesam.training.step import _Losses, _Prompt

    target = torch.zeros(16, 16, dtype=torch.bool)
    target[4:12, 2:8] = True
    others = torch.zeros(16, 16, dtype=torch.bool)
    others[4:12, 8:14] = True  # a touching cell on the right
    p = _Prompt(target=target, window=Window(0, 4, 0, 4), others=others)
    right = (target.float() * 2 - 1) * 3
    merged = ((target | others).float() * 2 - 1) * 3
    logits = torch.stack([right, merged])  # (M=2, 16, 16): two candidate masks

    def score(weight):
        return _Losses(StepConfig(neighbour_weight=weight)).score(logits, None, 1.0, p)

    plain, plain_iou = score(1.0)
    heavy, heavy_iou = score(4.0)
    # a merged mask costs more, relative to the right one, than without the weight
    assert float(heavy[1] - heavy[0]) > 1.5 * float(plain[1] - plain[0]) > 0
    # the IoU (the IoU head's target) is the plain one either way
    assert torch.equal(plain_iou, heavy_iou)
    assert float(plain_iou[0]) == 1.0 and float(plain_iou[1]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"neighbour_weight": 0.5}, "neighbour_weight"),
     ({"objects": 0}, "objects"), ({"rounds": 0}, "rounds"), ({"background": -1}, "background"),
     ({"box_fraction": 2.0}, "box_fraction"), ({"iou_weight": -1.0}, "iou_weight")],
)  # fmt: skip
def test_step_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepConfig(**kwargs)


# ---------------------------------------------------------------------------- data


def _write(folder, name, image, labels, labels_name=None):
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / f"{name}.tif", image)
    tifffile.imwrite(folder / (labels_name or f"{name}_labels.tif"), labels)


def test_find_pairs_suffix_layout_and_stacks(tmp_path):
    s = synthetic.cells_2d((64, 64), seed=0, radius=(6, 10))
    _write(tmp_path, "a", s.image, s.labels)
    stack = synthetic.cells_3d((3, 64, 64), seed=0, z_radius=(2, 3))
    _write(tmp_path / "sub", "b", stack.image, stack.labels)
    tifffile.imwrite(tmp_path / "lonely.tif", s.image)  # no labels: not a training image
    pairs = find_pairs(tmp_path)
    assert [p.name for p in pairs] == ["a", "b"]
    planes = load_examples(pairs[1])
    assert 1 <= len(planes) <= 3 and planes[0].name.startswith("b[")
    assert planes[0].image.shape == planes[0].labels.shape == (64, 64)


def test_find_pairs_folders_layout(tmp_path):
    s = synthetic.cells_2d((64, 64), seed=1, radius=(6, 10))
    _write(tmp_path / "images", "x", s.image, s.labels, labels_name="unused_labels.tif")
    (tmp_path / "images" / "unused_labels.tif").unlink()
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "labels" / "x.tif", s.labels)
    (pair,) = find_pairs(tmp_path)
    assert pair.labels == tmp_path / "labels" / "x.tif"
    tifffile.imwrite(tmp_path / "images" / "y.tif", s.image)
    with pytest.raises(DataError, match=r"y\.tif.*no label image"):
        find_pairs(tmp_path)


def test_sa1b_json_is_read_as_labels(tmp_path):
    from PIL import Image

    from napari_mobilesam.distill.data import rle_encode

    big = np.zeros((32, 40), bool)
    big[4:28, 4:36] = True
    small = np.zeros((32, 40), bool)
    small[10:14, 10:14] = True
    Image.fromarray(np.full((32, 40, 3), 90, np.uint8)).save(tmp_path / "sa_1.jpg")
    anns = [{"segmentation": rle_encode(m)} for m in (small, big)]
    (tmp_path / "sa_1.json").write_text(json.dumps({"annotations": anns}))
    (ex,) = load_examples(find_pairs(tmp_path)[0])
    assert ex.image.shape == (32, 40, 3)
    assert (ex.labels[small] == 1).all()  # the small mask is painted over the large one
    assert (ex.labels[big & ~small] == 2).all()


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.zeros((64, 64), np.uint16), "no object"),
        (np.full((64, 64), 1.5, np.float32), "non-integer"),
        (np.ones((32, 64), np.uint16), "shape"),
        (-np.ones((64, 64), np.int16), "negative"),
        (np.ones((64, 64), np.complex64), "dtype"),
    ],
)
def test_bad_label_images_are_named(tmp_path, labels, match):
    _write(tmp_path, "img", np.zeros((64, 64), np.uint16), labels)
    (pair,) = find_pairs(tmp_path)
    with pytest.raises(DataError, match=match) as err:
        load_examples(pair)
    assert "img" in str(err.value)


def test_unreadable_file_and_empty_folder(tmp_path):
    (tmp_path / "img.tif").write_bytes(b"not a tiff")
    tifffile.imwrite(tmp_path / "img_labels.tif", np.ones((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"cannot read .*img\.tif"):
        load_examples(find_pairs(tmp_path)[0])
    with pytest.raises(DataError, match="no annotated images"):
        find_pairs(_empty(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        find_pairs(tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_split_is_stable_and_never_empty(tmp_path):
    pairs = [Pair(tmp_path / f"i{k}.tif", tmp_path / f"i{k}_labels.tif") for k in range(20)]
    train, held = split_pairs(pairs, 0.2, seed=0)
    assert len(train) + len(held) == 20 and set(train).isdisjoint(held) and held
    _, held2 = split_pairs([*pairs, Pair(tmp_path / "new.tif", tmp_path / "n.tif")], 0.2)
    assert set(held).issubset(set(held2))  # old files keep their side
    assert split_pairs(pairs[:2], 0.01)[1]  # at least one held out
    assert split_pairs(pairs[:1], 0.5) == (pairs[:1], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_pairs(pairs, 1.0)


# ---------------------------------------------------------------------------- metrics


def test_iou_matrix_and_matching():
    truth = np.zeros((10, 10), np.uint32)
    truth[0:4, 0:4] = 1
    truth[6:10, 6:10] = 7
    good = truth == 1
    half = np.zeros((10, 10), bool)
    half[6:10, 6:8] = True
    ious = metrics.iou_matrix([good, half, np.zeros((10, 10), bool)], truth)
    assert ious.shape == (3, 2)
    assert ious[0, 0] == 1.0 and ious[1, 1] == 0.5 and ious[2].sum() == 0
    m = metrics.match_counts(ious, 0.5)
    assert (m["tp"], m["n_pred"], m["n_true"]) == (2, 3, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0
    assert metrics.match_counts(np.zeros((0, 0)))["f1"] == 1.0
    assert np.array_equal(metrics.iou_matrix(truth, truth), np.eye(2))
    with pytest.raises(ValueError, match="shape"):
        metrics.iou_matrix([np.zeros((3, 3), bool)], truth)


def test_average_precision():
    ious = np.array([[0.9, 0.0], [0.0, 0.8], [0.1, 0.1]])
    assert metrics.average_precision([(ious, np.array([0.9, 0.8, 0.1]))]) == pytest.approx(1.0)
    # the false positive ranked first: precision 1/2 then 2/3, made monotone (2/3 at both)
    ap = metrics.average_precision([(ious, np.array([0.5, 0.4, 0.9]))])
    assert ap == pytest.approx(2 / 3)
    assert np.isnan(metrics.average_precision([(np.zeros((1, 0)), np.array([0.3]))]))


def test_centre_point_is_deep_inside():
    m = np.zeros((20, 30), bool)
    m[2:19, 3:12] = True
    x, y = centre_point(m)
    assert m[int(y), int(x)] and 6 <= x <= 8 and 9 <= y <= 11
    with pytest.raises(ValueError, match="non-empty"):
        centre_point(np.zeros((3, 3), bool))


def test_evaluate_reports_every_score_in_range(tiny_model):
    from napari_mobilesam.training.data import Example

    s = synthetic.cells_2d((96, 96), seed=0, radius=(8, 14))
    res = evaluate(tiny_model, [Example("a", s.image, s.labels)], points_per_side=4, max_objects=5)
    for key in ("point_miou", "point_oracle_miou", "random_point_miou", "box_miou",
                "precision", "recall", "f1"):  # fmt: skip
        assert 0 <= res[key] <= 1, key
    assert res["point_oracle_miou"] >= res["point_miou"]  # the best of the three by real IoU
    assert res["n_objects"] == 5 and res["n_images"] == 1
    res = evaluate(tiny_model, [Example("a", s.image, s.labels)], points_per_side=None)
    assert "f1" not in res


def test_evaluate_scores_the_chosen_and_the_best_of_three_masks(tiny_model, monkeypatch):
    """A predictor whose highest-scored mask of three is a quarter of the object, the
    second the object itself, the third empty (a box gives the object)."""
    from napari_mobilesam import predictor as predictor_module
    from napari_mobilesam.training.data import Example

    labels = np.zeros((40, 40), np.int32)
    labels[4:20, 4:20], labels[24:36, 20:36] = 1, 2

    class Fake:
        def __init__(self, model):
            pass

        def set_image(self, image):
            pass

        def predict_batch(self, coords=None, labels_=None, boxes=None, multimask_output=True):
            if coords is None:  # a box: the object at its centre
                coords = ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None]
            objs = [labels == labels[int(c[0, 1]), int(c[0, 0])] for c in coords]
            if not multimask_output:
                return np.stack(objs)[:, None], np.ones((len(objs), 1)), None
            out = []
            for m in objs:
                quarter = m.copy()
                quarter[: np.nonzero(m.any(1))[0].mean().astype(int)] = False
                quarter[:, : np.nonzero(m.any(0))[0].mean().astype(int)] = False
                out.append([quarter, m, np.zeros_like(m)])
            scores = np.tile([0.9, 0.5, 0.1], (len(objs), 1))
            return np.array(out), scores, None

    monkeypatch.setattr(predictor_module, "Predictor", Fake)
    ex = Example("a", np.zeros((40, 40), np.uint8), labels)
    res = evaluate(tiny_model, [ex], points_per_side=None, min_area=1)
    assert res["point_miou"] == pytest.approx((81 / 256 + 63 / 192) / 2)  # the highest-scored
    assert res["box_miou"] == 1.0
    assert res["point_oracle_miou"] == 1.0


def test_train_config_round_trips_through_its_stored_json(tmp_path):
    from napari_mobilesam.training.config import TrainConfig

    cfg = TrainConfig(out=tmp_path / "run", synthetic=8, step=StepConfig(objects=3),
                      far_ramp=(0.2, 0.4), input_size=256)  # fmt: skip
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match=r"unknown training settings \['colour'\]"):
        TrainConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="incomplete training settings"):
        TrainConfig.from_dict({"synthetic": 8})


def test_synthetic_source_radius_sets_the_cells_size():
    from napari_mobilesam.training.sources import SyntheticSource

    def median_radius(radius):
        ex = SyntheticSource(1, seed=3, size=(256, 256), radius=radius).make(9)
        _, counts = np.unique(ex.labels[ex.labels > 0], return_counts=True)
        return float(np.median(np.sqrt(counts / np.pi)))

    assert median_radius((3.0, 4.0)) < 12 < median_radius((14.0, 16.0))
    # the default is the range the stand-in phases' images were drawn from
    assert SyntheticSource(1).radius == (4.0, 16.0)


def test_synthetic_source_planes_of_3d_stacks(monkeypatch):
    from napari_mobilesam.training.sources import SyntheticSource, _seed

    seeds = [_seed(5, "t", i) for i in range(40)]
    # planes=0 (the default) never makes a plane: the images are those of before
    assert SyntheticSource(1).planes == 0.0
    flat = SyntheticSource(1, seed=5, size=(64, 64), radius=(4.0, 5.0))
    monkeypatch.setattr(SyntheticSource, "_plane", lambda self, s: pytest.fail("a plane"))
    assert all(not flat.make(s).name.startswith("synthetic-plane") for s in seeds[:3])
    monkeypatch.undo()
    # the fraction decides per seed (without making the images)
    made = []
    monkeypatch.setattr(SyntheticSource, "_plane", lambda self, s: made.append(s) or "plane")
    half = SyntheticSource(1, seed=5, size=(64, 64), radius=(4.0, 5.0), planes=0.5)
    kinds = [half.make(s) == "plane" for s in seeds]
    assert 10 <= sum(kinds) <= 30 and made == [s for s, k in zip(seeds, kinds, strict=True) if k]
    # the 2D images are unchanged by the option: the same seed, the same image
    first2d = seeds[kinds.index(False)]
    np.testing.assert_array_equal(half.make(first2d).image, flat.make(first2d).image)
    monkeypatch.undo()
    # a plane: one (Y, X) section of a seeded synthetic stack, its cells labelled
    ex = SyntheticSource(1, seed=5, planes=1.0).make(seeds[0])
    again = SyntheticSource(1, seed=5, planes=1.0).make(seeds[0])
    assert ex.name.startswith("synthetic-plane") and ex.image.ndim == ex.labels.ndim == 2
    assert ex.image.shape == ex.labels.shape and 256 <= ex.image.shape[0] <= 512
    np.testing.assert_array_equal(ex.image, again.image)
    np.testing.assert_array_equal(ex.labels, again.labels)


def test_synthetic_source_small_cell_planes(monkeypatch):
    from napari_mobilesam.training import sources
    from napari_mobilesam.training.sources import SyntheticSource, _seed

    # the real kind: 1024 px planes whose smallest cells have a radius of 5-12 px
    assert sources.SMALL_CELLS == ((1024, 1024), (5.0, 12.0))
    monkeypatch.setattr(sources, "SMALL_CELLS", ((96, 96), (3.0, 4.0)))  # small, to be quick
    seeds = [_seed(6, "t", i) for i in range(24)]
    plain = SyntheticSource(1, seed=6, size=(64, 80), radius=(6.0, 8.0))
    mixed = SyntheticSource(1, seed=6, size=(64, 80), radius=(6.0, 8.0), small=0.5)
    assert SyntheticSource(1).small == 0.0
    kinds = [mixed.make(s).image.shape == (96, 96) for s in seeds]
    assert 5 <= sum(kinds) <= 19
    for s, small in zip(seeds[:8], kinds[:8], strict=True):
        if not small:  # the other images are those made without the option
            np.testing.assert_array_equal(mixed.make(s).image, plain.make(s).image)
    # their cells are the small kind's
    ex = mixed.make(seeds[kinds.index(True)])
    _, counts = np.unique(ex.labels[ex.labels > 0], return_counts=True)
    assert np.sqrt(counts.min() / np.pi) < 6.0


def test_synthetic_source_plane_without_cells_gives_way(monkeypatch):
    from napari_mobilesam import synthetic
    from napari_mobilesam.training.sources import SyntheticSource

    def stack(shape, **kwargs):
        labels = np.zeros(shape, np.uint32)
        labels[2, 10:20, 10:20] = 1  # one plane of the stack holds a cell
        return synthetic.Sample(labels.astype(np.uint16) * 500, labels, "ZYX")

    monkeypatch.setattr(synthetic, "cells_3d", stack)
    for seed in range(5):
        ex = SyntheticSource(1, planes=1.0).make(seed)
        assert ex.labels.max() == 1 and ex.image.max() == 500
