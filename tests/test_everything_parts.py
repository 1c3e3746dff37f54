"""Segment-everything's building blocks with known answers: grids, crops and tiles,
boxes and NMS, stability, RLE, mask data, window upsampling and region cleanup, and the
two label painters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk, rectangle

from napari_mobilesam.everything import MaskData
from napari_mobilesam.everything.boxes import (
    batched_mask_to_box,
    box_iou,
    box_xyxy_to_xywh,
    is_box_near_crop_edge,
    nms,
)
from napari_mobilesam.everything.fast import clean_crop
from napari_mobilesam.everything.grid import (
    build_all_layer_point_grids,
    build_point_grid,
    generate_crop_boxes,
    generate_tiles,
)
from napari_mobilesam.everything.labels import masks_to_labels
from napari_mobilesam.everything.masks import crop_to_rle, mask_nms, paste, tight_crop
from napari_mobilesam.everything.regions import remove_small_regions
from napari_mobilesam.everything.rle import masks_to_rle
from napari_mobilesam.everything.stability import calculate_stability_score
from napari_mobilesam.everything.upsample import Upsampler

# -- grids, crops, tiles ------------------------------------------------------------------


def test_point_grid():
    np.testing.assert_allclose(
        build_point_grid(2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    )
    assert [len(g) for g in build_all_layer_point_grids(8, 2, 2)] == [64, 16, 4]
    with pytest.raises(ValueError, match="points_per_side must be >= 1"):
        build_point_grid(0)


def test_crop_boxes_known_answer():
    boxes, layers = generate_crop_boxes((100, 200), 1, 0.5)
    # short side 100, 2 crops per side, overlap 50: crops 125 x 75 at x 0/75, y 0/25
    assert boxes == [
        [0, 0, 200, 100],
        [0, 0, 125, 75],
        [0, 25, 125, 100],
        [75, 0, 200, 75],
        [75, 25, 200, 100],
    ]
    assert layers == [0, 1, 1, 1, 1]


@pytest.mark.parametrize(
    ("size", "tile", "overlap"), [((1000, 2500), 1024, 256), ((300, 100), 64, 16)]
)
def test_tiles_cover_with_overlap(size, tile, overlap):
    tiles = generate_tiles(size, tile, overlap)
    covered = np.zeros(size, dtype=int)
    for x0, y0, x1, y1 in tiles:
        assert x1 - x0 <= tile and y1 - y0 <= tile
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    xs = sorted({t[0] for t in tiles})
    ends = sorted({t[2] for t in tiles})
    assert ends[-1] == size[1]
    for a_end, b_start in zip(ends[:-1], xs[1:], strict=True):
        assert a_end - b_start >= overlap  # neighbours share at least the overlap


def test_tiles_errors_and_small_image():
    assert generate_tiles((50, 60), 64, 16) == [[0, 0, 60, 50]]
    with pytest.raises(ValueError, match="tile_size must be >= 1"):
        generate_tiles((50, 60), 0, 0)
    with pytest.raises(ValueError, match="tile_overlap"):
        generate_tiles((50, 60), 64, 64)


# -- boxes and NMS ---------------------------------------------------------------------------


def test_mask_to_box():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 9, 11] = True
    boxes = batched_mask_to_box(masks)
    assert boxes.tolist() == [[3, 2, 8, 4], [11, 9, 11, 9], [0, 0, 0, 0]]
    assert batched_mask_to_box(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)
    assert box_xyxy_to_xywh(np.array([3, 2, 8, 4])).tolist() == [3, 2, 5, 2]


def test_box_near_crop_edge():
    crop = [100, 0, 200, 100]  # interior left edge at x = 100, image 300 x 100
    boxes = torch.tensor([[0, 10, 50, 60], [30, 10, 70, 60], [50, 0, 99, 99]])  # crop coords
    near = is_box_near_crop_edge(boxes, crop, [0, 0, 300, 100])
    # touches the interior left edge; inside; touches the right interior edge (x1=199)
    assert near.tolist() == [True, False, True]


def test_nms_known_answer_and_ties():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]]).float()
    scores = torch.tensor([0.9, 0.8, 0.7, 0.9])
    # 0 and 3 tie: the earlier wins; 1 overlaps 0 by 81/119 = 0.68
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    empty = torch.zeros(3, 4)
    assert torch.isnan(box_iou(empty)).all()  # 0 / 0: never suppresses, like torchvision
    assert nms(empty, torch.tensor([0.3, 0.2, 0.1]), 0.5).tolist() == [0, 1, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def _crop(mask):
    c, b = tight_crop(mask, 0, 0)
    return c, b


def test_mask_nms_sees_what_boxes_miss():
    shape = (40, 40)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[5:35, 5:8] = True
    a[32:35, 5:35] = True  # an L
    b[5:8, 5:35] = True
    b[5:35, 32:35] = True  # the rotated L: same box, little overlap
    c = a.copy()
    c[20, 20] = True  # nearly identical to a
    crops, boxes = zip(*(_crop(m) for m in (a, b, c)), strict=True)
    boxes = np.array(boxes)
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert mask_nms(list(crops), boxes, scores, 0.7).tolist() == [0, 1]
    assert nms(torch.as_tensor(boxes).float(), scores, 0.7).tolist() == [0]


def test_stability_known_answer():
    logits = torch.tensor([[[2.0, 0.5, -0.5, -2.0]]])
    # > +1: 1 pixel; > -1: 3 pixels
    assert calculate_stability_score(logits, 0.0, 1.0).tolist() == pytest.approx([1 / 3])
    assert torch.isnan(calculate_stability_score(torch.full((1, 2, 2), -5.0), 0.0, 1.0)).all()


# -- containers, crops, RLE, labels ----------------------------------------------------------


def test_mask_data():
    d = MaskData(a=torch.arange(4), b=np.arange(4) * 10, c=list("wxyz"))
    d.filter(torch.tensor([True, False, True, True]))
    assert d["a"].tolist() == [0, 2, 3] and d["c"] == ["w", "y", "z"]
    d.filter(np.array([2, 0]))
    assert d["b"].tolist() == [30, 0] and len(d) == 2
    d.cat(MaskData(a=torch.tensor([7]), b=np.array([70]), c=["q"]))
    assert d["a"].tolist() == [3, 0, 7] and d["c"] == ["z", "w", "q"]
    with pytest.raises(ValueError, match="fields differ"):
        d.cat(MaskData(a=torch.tensor([1])))
    with pytest.raises(TypeError, match="lists, arrays and tensors"):
        MaskData(a=3)
    empty = MaskData()
    empty.cat(d)
    assert len(empty) == 3


@pytest.mark.parametrize("seed", range(6))
def test_crop_to_rle_equals_full_rle(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 30, size=2)
    full = np.zeros((h, w), bool)
    y0, x0 = rng.integers(0, h), rng.integers(0, w)
    y1, x1 = rng.integers(y0, h), rng.integers(x0, w)
    full[y0 : y1 + 1, x0 : x1 + 1] = rng.random((y1 - y0 + 1, x1 - x0 + 1)) < 0.6
    if seed == 0:
        full[:] = True  # starts with foreground at index 0, ends at the last pixel
    found = tight_crop(full, 0, 0)
    if found is None:
        return
    crop, box = found
    np.testing.assert_array_equal(paste(crop, box, (h, w)), full)
    assert crop_to_rle(crop, box, (h, w)) == masks_to_rle(full[None])[0]


def test_labels_priority_and_dense_ids():
    shape = (20, 20)
    a = np.zeros(shape, bool)
    a[2:12, 2:12] = True
    b = np.zeros(shape, bool)
    b[8:18, 8:18] = True
    c = np.zeros(shape, bool)
    c[9:11, 9:11] = True  # inside the overlap of a and b: loses everywhere
    crops, boxes = zip(*(_crop(m) for m in (a, b, c)), strict=True)
    labels = masks_to_labels(list(crops), np.array(boxes), np.array([0.5, 0.9, 0.1]), shape)
    assert labels.dtype == np.uint32
    assert set(np.unique(labels)) == {0, 1, 2}  # c got no pixel, no gap in ids
    assert (labels[b] == 1).all()  # b has the higher score: id 1, owns the overlap
    assert (labels[a & ~b] == 2).all()
    assert (labels[~(a | b)] == 0).all()


def test_labels_min_visible_drops_slivers():
    shape = (20, 30)
    left, right, both = (np.zeros(shape, bool) for _ in range(3))
    left[5:15, 2:12] = True
    right[5:15, 14:24] = True
    both[4:16, 1:25] = True  # two touching cells as one mask: 288 px, 88 left visible
    crops, boxes = zip(*(_crop(m) for m in (left, right, both)), strict=True)
    args = (list(crops), np.array(boxes), np.array([0.9, 0.8, 0.7]), shape)
    kept, src = masks_to_labels(*args, return_sources=True)
    assert set(np.unique(kept)) == {0, 1, 2, 3} and src.tolist() == [0, 1, 2]
    labels, src = masks_to_labels(*args, min_visible=0.5, return_sources=True)
    assert src.tolist() == [0, 1] and (labels[left] == 1).all() and (labels[right] == 2).all()
    assert not labels[both & ~(left | right)].any()  # the sliver is background
    # at exactly the visible fraction the mask stays
    labels = masks_to_labels(*args, min_visible=88 / 288)
    assert labels.max() == 3


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_labels_min_visible_must_be_a_fraction(bad):
    from napari_mobilesam.everything.device import labels_from_masks

    crops, boxes = [np.ones((2, 2), bool)], np.array([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="min_visible must be a number in"):
        masks_to_labels(crops, boxes, np.array([1.0]), (4, 4), min_visible=bad)
    with pytest.raises(ValueError, match="min_visible must be a number in"):
        labels_from_masks(torch.ones(1, 4, 4, dtype=torch.bool), torch.ones(1), min_visible=bad)


def test_upsampler_window_equals_full_postprocess(tiny_model, rng):
    low = torch.full((32, 32), -3.0)
    low[10:14, 5:9] = torch.as_tensor(rng.normal(2, 1, size=(4, 4)), dtype=torch.float32)
    input_size, size = (128, 97), (300, 227)
    full = tiny_model.postprocess_masks(low[None, None], input_size, size)[0, 0]
    up = Upsampler.create((32, 32), 128, input_size, size)
    box = batched_mask_to_box(low[None] > 0)[0].tolist()
    r0, r1, c0, c1 = up.window(tuple(box))
    win = up.logits(low, (r0, r1, c0, c1))
    torch.testing.assert_close(win, full[r0:r1, c0:c1], rtol=1e-5, atol=1e-5)
    outside = full > 0
    outside[r0:r1, c0:c1] = False
    assert not outside.any()  # nothing positive outside the window


def test_small_region_cleanup_in_a_window_equals_full_image(rng):
    shape = (60, 70)
    for _ in range(20):
        mask = np.zeros(shape, bool)
        rr, cc = rectangle(
            tuple(rng.integers(0, 30, 2)), extent=tuple(rng.integers(5, 30, 2)), shape=shape
        )
        mask[rr, cc] = True
        mask &= rng.random(shape) > 0.1  # holes
        mask[tuple(rng.integers(0, 60, 2))] = True  # maybe an island
        want, _ = remove_small_regions(mask, 25, "holes")
        want, _ = remove_small_regions(want, 25, "islands")
        crop, box = tight_crop(mask, 0, 0)
        got_crop, got_box, _ = clean_crop(crop, box, 25, shape)
        np.testing.assert_array_equal(paste(got_crop, got_box, shape), want)


# -- tile merging ---------------------------------------------------------------------------


def test_object_cut_by_a_tile_border_is_kept_once():
    """An object across the border of two tiles: cut in one (dropped), whole in the other."""
    shape = (100, 180)
    obj = np.zeros(shape, bool)
    obj[disk((50, 95), 12, shape=shape)] = True  # spans x 83..107
    tiles = generate_tiles(shape, 100, 40)  # x in [0, 100), [40, 140), [80, 180)
    assert [t[:3:2] for t in tiles] == [[0, 100], [40, 140], [80, 180]]
    kept_crops, kept_boxes = [], []
    for x0, y0, x1, y1 in tiles:
        part = obj[y0:y1, x0:x1]
        crop, box = tight_crop(part, 0, 0)
        cut = is_box_near_crop_edge(torch.tensor([box]), [x0, y0, x1, y1], [0, 0, 180, 100])
        if not cut[0]:
            kept_crops.append(crop)
            kept_boxes.append([box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0])
    # cut by the first tile (x = 100), within 20 px of the third's edge: only the
    # middle tile keeps it
    assert len(kept_crops) == 1
    np.testing.assert_array_equal(paste(kept_crops[0], kept_boxes[0], shape), obj)
    # the same object found again by the whole-image pass is merged by mask NMS
    whole, box = tight_crop(obj, 0, 0)
    keep = mask_nms(
        [kept_crops[0], whole], np.array([kept_boxes[0], box]), torch.tensor([1.0, 0.5]), 0.7
    )
    assert keep.tolist() == [0]


@pytest.mark.parametrize("seed", range(4))
def test_mask_nms_equals_brute_force(seed):
    """Packed-bit intersections and IoU-bound pruning change no decision."""
    rng = np.random.default_rng(seed)
    shape = (70, 200)  # wider than 3 words of 64 columns
    fulls, crops, boxes = [], [], []
    while len(fulls) < 25:
        m = np.zeros(shape, bool)
        y, x = rng.integers(0, 60), rng.integers(0, 180)
        m[y : y + rng.integers(3, 40), x : x + rng.integers(3, 120)] = True
        m &= rng.random(shape) > rng.uniform(0, 0.5)
        found = tight_crop(m, 0, 0)
        if found is not None:
            fulls.append(m)
            crops.append(found[0])
            boxes.append(found[1])
    scores = torch.as_tensor(rng.random(len(fulls)))
    for thresh in (0.1, 0.3, 0.7):
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()
        keep, dropped = [], set()
        for pos, i in enumerate(order):
            if i in dropped:
                continue
            keep.append(i)
            for j in order[pos + 1 :]:
                inter = np.count_nonzero(fulls[i] & fulls[j])
                if inter / np.count_nonzero(fulls[i] | fulls[j]) > thresh:
                    dropped.add(j)
        assert mask_nms(crops, np.array(boxes), scores, thresh).tolist() == keep


def test_device_label_painting_equals_masks_to_labels(rng):
    """labels_from_masks (vectorised, chunked) == masks_to_labels (per mask), with ties,
    masks hidden under better ones, empty masks, and chunk borders."""
    from napari_mobilesam.everything.device import labels_from_masks
    from napari_mobilesam.everything.masks import tight_crop

    h, w, m = 40, 50, 23
    masks = np.zeros((m, h, w), bool)
    for k in range(m):
        y, x = rng.integers(0, h - 5), rng.integers(0, w - 5)
        masks[k, y : y + rng.integers(3, 25), x : x + rng.integers(3, 25)] = True
    masks[5] = masks[2]  # an identical mask: hidden if it scores lower
    masks[7] = False  # an empty mask
    scores = rng.random(m).round(1)  # many ties
    crops, boxes = [], []
    for k in range(m):
        found = tight_crop(masks[k], 0, 0)
        crop, box = found if found is not None else (np.zeros((1, 1), bool), [0, 0, 0, 0])
        crops.append(crop)
        boxes.append(box)
    for frac in (0.0, 0.5):
        want, want_src = masks_to_labels(
            crops, np.asarray(boxes), scores, (h, w), min_visible=frac, return_sources=True
        )
        for chunk in (1, 4, 64):
            got, src = labels_from_masks(
                torch.as_tensor(masks), torch.as_tensor(scores), chunk=chunk, min_visible=frac
            )
            np.testing.assert_array_equal(got.numpy(), want)
            np.testing.assert_array_equal(src.numpy(), want_src)
        assert want.max() > 5
    n_all = masks_to_labels(crops, np.asarray(boxes), scores, (h, w)).max()
    assert want.max() < n_all  # 0.5 dropped some
