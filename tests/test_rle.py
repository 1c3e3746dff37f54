"""Run-length encodings: known answers, round trips, the reference and COCO strings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mobilesam.everything.rle import (
    _changes_on_device,
    _runs,
    area_from_rle,
    coco_to_rle,
    masks_to_coco,
    masks_to_rle,
    rle_to_coco,
    rle_to_mask,
)


def reference_mask_to_rle(tensor: torch.Tensor) -> list[dict]:
    """segment-anything's ``mask_to_rle_pytorch`` (utils/amg.py), verbatim logic."""
    b, h, w = tensor.shape
    tensor = tensor.permute(0, 2, 1).flatten(1)
    diff = tensor[:, 1:] ^ tensor[:, :-1]
    change_indices = diff.nonzero()
    out = []
    for i in range(b):
        cur_idxs = change_indices[change_indices[:, 0] == i, 1]
        cur_idxs = torch.cat(
            [
                torch.tensor([0], dtype=cur_idxs.dtype),
                cur_idxs + 1,
                torch.tensor([h * w], dtype=cur_idxs.dtype),
            ]
        )
        btw_idxs = cur_idxs[1:] - cur_idxs[:-1]
        counts = [] if tensor[i, 0] == 0 else [0]
        counts.extend(btw_idxs.detach().cpu().tolist())
        out.append({"size": [h, w], "counts": counts})
    return out


def reference_rle_to_mask(rle: dict) -> np.ndarray:
    """segment-anything's ``rle_to_mask`` (a loop over runs)."""
    h, w = rle["size"]
    mask = np.empty(h * w, dtype=bool)
    idx = 0
    parity = False
    for count in rle["counts"]:
        mask[idx : idx + count] = parity
        idx += count
        parity ^= True
    return mask.reshape(w, h).transpose()


def _m(rows) -> np.ndarray:
    return np.array(rows, dtype=bool)


# (mask, counts written by hand from the column-major flattening)
KNOWN = [
    # columns top to bottom: 001 111 100 001 -> 00 11111 0000 1
    (_m([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]]), [2, 5, 4, 1]),
    (_m([[1, 1], [1, 0]]), [0, 3, 1]),  # starts with foreground: empty first run
    (_m(np.zeros((3, 4))), [12]),
    (_m(np.ones((3, 4))), [0, 12]),
    (_m([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), [0, 1, 11]),  # first pixel
    (_m([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]), [11, 1]),  # last pixel
    (_m([[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]), [9, 1, 2]),  # top of last column
    (_m([[0, 1, 1, 0, 1]]), [1, 2, 1, 1]),  # 1 x W
    (_m([[1], [0], [0], [1], [1]]), [0, 1, 2, 2]),  # H x 1
    (_m([[1]]), [0, 1]),
    (_m([[0]]), [1]),
]


@pytest.mark.parametrize(("mask", "counts"), KNOWN)
def test_known_answers(mask, counts):
    h, w = mask.shape
    rle = {"size": [h, w], "counts": counts}
    assert masks_to_rle(mask[None]) == [rle]
    assert masks_to_rle(torch.from_numpy(mask[None])) == [rle]
    assert reference_mask_to_rle(torch.from_numpy(mask[None])) == [rle]
    out = rle_to_mask(rle)
    assert out.dtype == bool and out.shape == (h, w) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, mask)
    assert area_from_rle(rle) == int(mask.sum())


def test_known_batch_in_one_call():
    """Masks of one batch keep their own runs (no bleeding across mask boundaries)."""
    masks = np.stack([_m(np.ones((3, 4))), KNOWN[0][0], _m(np.zeros((3, 4))), KNOWN[4][0]])
    assert [r["counts"] for r in masks_to_rle(masks)] == [[0, 12], [2, 5, 4, 1], [12], [0, 1, 11]]


def _random_batches():
    rng = np.random.default_rng(1234)
    for shape in [(6, 3, 4), (5, 1, 7), (5, 7, 1), (8, 13, 17), (3, 40, 31), (2, 1, 1)]:
        for p in (0.0, 0.03, 0.5, 0.97, 1.0):
            yield rng.random(shape) < p
    # blobs: few long runs, as real masks have
    yy, xx = np.mgrid[:50, :70]
    centres = rng.uniform(0, 70, (6, 2))
    radii = rng.uniform(3, 25, 6)
    yield (yy - centres[:, 1, None, None]) ** 2 + (xx - centres[:, 0, None, None]) ** 2 < (
        radii[:, None, None] ** 2
    )


RANDOM = list(_random_batches())


@pytest.mark.parametrize("masks", RANDOM, ids=lambda m: "x".join(map(str, m.shape)))
def test_matches_reference_and_round_trips(masks):
    ours = masks_to_rle(masks)
    assert ours == reference_mask_to_rle(torch.from_numpy(masks))
    assert masks_to_rle(torch.from_numpy(masks)) == ours
    assert ours == [masks_to_rle(m[None])[0] for m in masks]
    for rle, mask in zip(ours, masks, strict=True):
        assert rle["size"] == list(mask.shape)
        assert all(type(c) is int for c in rle["counts"])
        assert all(c > 0 for c in rle["counts"][1:])
        assert sum(rle["counts"]) == mask.size
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
        np.testing.assert_array_equal(reference_rle_to_mask(rle), mask)
        assert area_from_rle(rle) == int(mask.sum())
        assert type(rle["size"][0]) is int


@pytest.mark.parametrize("masks", RANDOM, ids=lambda m: "x".join(map(str, m.shape)))
def test_device_path_equals_host_path(masks):
    """The GPU path (boundaries found on the device, positions copied), run on CPU tensors."""
    t = torch.from_numpy(masks)
    assert _runs(*_changes_on_device(t)) == masks_to_rle(masks)
    assert _runs(*_changes_on_device(t.transpose(1, 2).contiguous().transpose(1, 2))) == (
        masks_to_rle(masks)
    )


def test_device_path_edge_cases_and_raises():
    assert _runs(*_changes_on_device(torch.zeros((0, 3, 4), dtype=torch.bool))) == []
    no_pixels = _runs(*_changes_on_device(torch.zeros((2, 0, 5), dtype=torch.bool)))
    assert no_pixels == [{"size": [0, 5], "counts": [0]}] * 2
    with pytest.raises(TypeError, match="bool tensor.*float32"):
        _changes_on_device(torch.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match=r"\(N, H, W\).*\(3, 4\)"):
        _changes_on_device(torch.zeros((3, 4), dtype=torch.bool))


def test_torch_input_any_layout():
    masks = torch.from_numpy(RANDOM[17])  # (8, 13, 17), p = 0.5
    t = masks.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    assert not t.is_contiguous()
    assert masks_to_rle(t) == masks_to_rle(masks.numpy()) == reference_mask_to_rle(masks)
    assert masks_to_rle(t[:, 2:, ::2]) == reference_mask_to_rle(t[:, 2:, ::2])


def test_non_contiguous_numpy_input():
    masks = np.asfortranarray(RANDOM[17])
    assert masks_to_rle(masks) == masks_to_rle(np.ascontiguousarray(masks))
    assert masks_to_rle(RANDOM[17][:, ::-1]) == reference_mask_to_rle(
        torch.from_numpy(RANDOM[17][:, ::-1].copy())
    )


def test_empty_batch():
    assert masks_to_rle(np.zeros((0, 3, 4), dtype=bool)) == []
    assert masks_to_rle(torch.zeros((0, 3, 4), dtype=torch.bool)) == []
    assert masks_to_coco(np.zeros((0, 3, 4), dtype=bool)) == []


def test_masks_without_pixels():
    rles = masks_to_rle(np.zeros((2, 0, 5), dtype=bool))
    assert rles == [{"size": [0, 5], "counts": [0]}] * 2
    assert rle_to_mask(rles[0]).shape == (0, 5)
    assert area_from_rle(rles[0]) == 0


def test_output_dicts_are_independent():
    rles = masks_to_rle(np.zeros((2, 2, 2), dtype=bool))
    rles[0]["counts"].append(0)
    rles[0]["size"][0] = 9
    assert rles[1] == {"size": [2, 2], "counts": [4]}


def test_area_from_rle():
    assert area_from_rle({"size": [3, 4], "counts": [2, 5, 4, 1]}) == 6
    assert area_from_rle({"size": [3, 4], "counts": [12]}) == 0
    assert area_from_rle({"size": [3, 4], "counts": [0, 12]}) == 12
    assert type(area_from_rle({"size": [1, 2], "counts": np.array([1, 1])})) is int


# COCO strings computed once with pycocotools 2.0 in a throwaway venv:
#   rle = pycocotools.mask.frPyObjects(uncompressed, h, w)
#   rle["counts"].decode("utf-8")
# (the 3x4 string was also checked with pycocotools.mask.encode on the Fortran array).
COCO_KNOWN = [
    ({"size": [3, 4], "counts": [2, 5, 4, 1]}, "254L"),
    ({"size": [2, 2], "counts": [0, 3, 1]}, "031"),
    # negative and multi-character differences (counts[i] - counts[i - 2] for i > 2)
    ({"size": [10, 30], "counts": [0, 40, 3, 100, 2, 1, 154]}, "0X13l1OmLh4"),
    ({"size": [1000, 1000], "counts": [1000000]}, "Pb`n0"),
    ({"size": [480, 640], "counts": [0, 307200]}, "0PP\\9"),
    ({"size": [3, 4], "counts": [12]}, "<"),
]


@pytest.mark.parametrize(("rle", "string"), COCO_KNOWN)
def test_coco_known_strings(rle, string):
    coco = rle_to_coco(rle)
    assert coco == {"size": rle["size"], "counts": string}
    assert type(coco["counts"]) is str
    assert coco_to_rle(coco) == rle
    assert coco_to_rle({"size": rle["size"], "counts": string.encode()}) == rle


def test_masks_to_coco_known():
    mask = KNOWN[0][0]
    assert masks_to_coco(mask[None]) == [{"size": [3, 4], "counts": "254L"}]
    assert masks_to_coco(torch.from_numpy(mask[None])) == masks_to_coco(mask[None])


@pytest.mark.parametrize("masks", RANDOM, ids=lambda m: "x".join(map(str, m.shape)))
def test_coco_round_trip(masks):
    cocos = masks_to_coco(masks)
    for coco, rle, mask in zip(cocos, masks_to_rle(masks), masks, strict=True):
        assert coco == rle_to_coco(rle)
        assert set(coco["counts"]) <= {chr(c) for c in range(48, 112)}
        assert coco_to_rle(coco) == rle
        np.testing.assert_array_equal(rle_to_mask(coco_to_rle(coco)), mask)


def test_coco_large_counts_round_trip():
    rle = {"size": [70000, 70000], "counts": [4_899_999_999, 1]}  # > 2**32 pixels
    assert coco_to_rle(rle_to_coco(rle)) == rle


@pytest.mark.parametrize(
    ("masks", "error", "match"),
    [
        (np.zeros((1, 3, 4), dtype=np.uint8), TypeError, "bool array.*uint8"),
        (torch.zeros((1, 3, 4)), TypeError, "bool tensor.*float32"),
        ([[[True]]], TypeError, "numpy array or a torch tensor.*list"),
        (np.zeros((3, 4), dtype=bool), ValueError, r"\(N, H, W\).*\(3, 4\)"),
        (torch.zeros((1, 1, 3, 4), dtype=torch.bool), ValueError, r"\(N, H, W\).*\(1, 1, 3, 4\)"),
    ],
)
def test_masks_to_rle_raises(masks, error, match):
    with pytest.raises(error, match=match):
        masks_to_rle(masks)
    with pytest.raises(error, match=match):
        masks_to_coco(masks)


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ({"size": [3, 4], "counts": [2, 5, 4]}, "sum to 11.*12 pixels"),
        ({"size": [3, 4], "counts": [2, 5, 4, 2]}, "sum to 13.*12 pixels"),
        ({"size": [3, 4], "counts": [14, -2]}, "non-negative"),
        ({"size": [-3, -4], "counts": [12]}, "'size' must be non-negative"),
        ({"size": [3, 4], "counts": [2.0, 10.0]}, "must be integers"),
        ({"size": [3, 4]}, "'size' \\[h, w\\] and 'counts'"),
        ({"counts": [12]}, "'size' \\[h, w\\] and 'counts'"),
        ({"size": [3], "counts": [3]}, "'size' \\[h, w\\] and 'counts'"),
        ([12], "'size' \\[h, w\\] and 'counts'"),
    ],
)
def test_bad_rle_raises(rle, match):
    with pytest.raises(ValueError, match=match):
        rle_to_mask(rle)
    with pytest.raises(ValueError, match=match):
        rle_to_coco(rle)


@pytest.mark.parametrize(
    ("coco", "match"),
    [
        ({"size": [3, 4], "counts": "25 4L"}, "outside '0'..'o'.*' '"),
        ({"size": [3, 4], "counts": "254p"}, "outside '0'..'o'.*'p'"),
        ({"size": [3, 4], "counts": "25X"}, "middle of a number"),  # 'X' sets the more bit
        ({"size": [3, 4], "counts": "254"}, "sum to 11.*12 pixels"),
        ({"size": [3, 4], "counts": "O"}, "non-negative"),  # 'O' is -1
        ({"size": [3, 4], "counts": 254}, "'size' \\[h, w\\] and 'counts' str"),
        ({"counts": "254L"}, "'size' \\[h, w\\] and 'counts' str"),
        ({"size": [3, 4], "counts": "254Lé"}, "'size' \\[h, w\\] and 'counts' str"),
    ],
)
def test_bad_coco_raises(coco, match):
    with pytest.raises(ValueError, match=match):
        coco_to_rle(coco)
