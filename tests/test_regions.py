"""remove_small_regions: hand-made masks with known answers, the reference's quirks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_mobilesam.everything.regions import remove_small_regions


def _m(text: str) -> np.ndarray:
    """Mask from rows of '#' (True) and '.' (False)."""
    return np.array([[c == "#" for c in row] for row in text.split()], dtype=bool)


# A 6x6 square with a one-pixel hole; the outer background is a ring of 20 pixels.
HOLE = _m(
    """
    ......
    .####.
    .#.##.
    .####.
    .####.
    ......
    """
)
# A 3x3 island, a 2-pixel island and a single pixel.
ISLANDS = _m(
    """
    ###....
    ###...#
    ###....
    .......
    ....##.
    """
)
# Diagonal contact: 8-connected, so one island of 3 (three islands of 1 if 4-connected).
DIAGONAL = _m(
    """
    #....
    .#...
    ..#..
    .....
    ....#
    """
)

HOLE_FILLED = _m("...... .####. .####. .####. .####. ......")
ISLANDS_NO_1PX = _m("###.... ###.... ###.... ....... ....##.")
ISLANDS_3X3 = _m("###.... ###.... ###.... ....... .......")
DIAGONAL_3 = _m("#.... .#... ..#.. ..... .....")
BORDER_BG = _m(".### .### .### .###")
HOLES_DIAG = _m("#### #.## ##.# ####")
TWO_PAIRS = _m("....## ...... ##.... ......")
ALL_T, ALL_F = np.ones((3, 3), bool), np.zeros((3, 3), bool)

# (id, mask, area_thresh, mode, expected, changed). Every expected mask here was
# also checked against segment-anything's OpenCV implementation (opencv 5.0, 2 threads).
CASES = [
    ("hole-filled", HOLE, 2, "holes", HOLE_FILLED, True),
    ("hole-kept", HOLE, 1, "holes", HOLE, False),
    # the outer background ring (20 px, touches the border) is filled too once small
    ("hole-and-border", HOLE, 21, "holes", np.ones((6, 6), bool), True),
    ("hole-border-kept", HOLE, 20, "holes", HOLE_FILLED, True),
    # background in column 0 touches the border: filled when small, like a hole
    ("border-bg-filled", BORDER_BG, 5, "holes", np.ones((4, 4), bool), True),
    ("border-bg-kept", BORDER_BG, 4, "holes", BORDER_BG, False),
    # two background pixels touching diagonally form one component of 2
    ("holes-diagonal", HOLES_DIAG, 2, "holes", HOLES_DIAG, False),
    ("holes-diagonal-fill", HOLES_DIAG, 3, "holes", np.ones((4, 4), bool), True),
    ("holes-all-true", ALL_T, 100, "holes", ALL_T, False),
    ("holes-empty", ALL_F, 9, "holes", ALL_F, False),
    ("holes-empty-fill", ALL_F, 10, "holes", ALL_T, True),
    ("islands-1", ISLANDS, 2, "islands", ISLANDS_NO_1PX, True),
    ("islands-2", ISLANDS, 3, "islands", ISLANDS_3X3, True),
    ("islands-kept", ISLANDS, 1, "islands", ISLANDS, False),
    ("islands-thresh-0", ISLANDS, 0, "islands", ISLANDS, False),
    # all below the threshold: the largest (the 3x3) is kept
    ("islands-all-small", ISLANDS, 100, "islands", ISLANDS_3X3, True),
    ("islands-diagonal", DIAGONAL, 2, "islands", DIAGONAL_3, True),
    ("islands-diagonal-3", DIAGONAL, 3, "islands", DIAGONAL_3, True),
    # all small, largest kept: the mask is unchanged but the reference still says changed
    ("islands-diagonal-4", DIAGONAL, 4, "islands", DIAGONAL_3, True),
    ("islands-single-all-small", _m("... .#. ..."), 5, "islands", _m("... .#. ..."), True),
    ("islands-empty", ALL_F, 5, "islands", ALL_F, False),
    # ties, all small: OpenCV numbers components by their first 2x2 block in raster
    # order of blocks, not by their first pixel. Here (0, 3) comes first in pixel
    # order but (1, 0) is in block (0, 0), so OpenCV (and we) keep (1, 0).
    ("tie-block-order", _m("...# #..."), 5, "islands", _m(".... #..."), True),
    ("tie-same-row", _m("#.#. ...."), 5, "islands", _m("#... ...."), True),
    ("tie-block-rows", _m("..... ....# #...."), 5, "islands", _m("..... ....# ....."), True),
    ("tie-2px", TWO_PAIRS, 3, "islands", _m("....## ...... ...... ......"), True),
    ("largest-unique", _m("#.#.# ..... ##..#"), 5, "islands", _m("..... ..... ##..."), True),
]


@pytest.mark.parametrize(
    ("mask", "area_thresh", "mode", "expected", "changed"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_known_answers(mask, area_thresh, mode, expected, changed):
    before = mask.copy()
    out, was_changed = remove_small_regions(mask, area_thresh, mode)
    assert was_changed is changed
    assert out.dtype == bool and out.shape == mask.shape
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(mask, before)  # input untouched
    if not changed:
        assert out is mask


def test_float_threshold():
    assert remove_small_regions(ISLANDS, 1.5, "islands")[1] is True
    np.testing.assert_array_equal(
        remove_small_regions(ISLANDS, 2.5, "islands")[0],
        remove_small_regions(ISLANDS, 3, "islands")[0],
    )


def test_tie_sparse_opencv_answer():
    """Many single-pixel islands, all small: the kept one is OpenCV's label 1.

    First pixel in raster order is (0, 5); OpenCV's first block (rows 0-1, cols
    2-3) holds (1, 2). Answer taken from cv2.connectedComponentsWithStats.
    """
    mask = _m(
        """
        .....#....
        ..#......#
        #......#..
        ....#.....
        .#....#...
        """
    )
    out, changed = remove_small_regions(mask, 2, "islands")
    assert changed
    assert list(zip(*np.nonzero(out), strict=True)) == [(1, 2)]


def _reference_port(mask, area_thresh, mode):
    """segment-anything's remove_small_regions with scipy labels instead of OpenCV.

    scipy numbers components in pixel raster order, so this agrees with OpenCV
    except when islands are all small and the largest ones tie (tested above).
    """
    correct_holes = mode == "holes"
    working_mask = correct_holes ^ mask
    regions, n_labels = ndimage.label(working_mask, structure=np.ones((3, 3)))
    sizes = np.bincount(regions.ravel(), minlength=n_labels + 1)[1:]
    small_regions = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if len(small_regions) == 0:
        return mask, False, False
    fill_labels = [0, *small_regions]
    tie = False
    if not correct_holes:
        fill_labels = [i for i in range(n_labels + 1) if i not in fill_labels]
        if len(fill_labels) == 0:
            tie = int((sizes == sizes.max()).sum()) > 1
            fill_labels = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill_labels), True, tie


def test_random_masks_match_reference_port():
    rng = np.random.default_rng(7)
    compared = 0
    for i in range(120):
        h, w = rng.integers(1, 30, 2)
        if i % 2:
            mask = ndimage.gaussian_filter(rng.random((h, w)), 1.5) > rng.uniform(0.45, 0.55)
        else:
            mask = rng.random((h, w)) < rng.random()
        for mode in ("holes", "islands"):
            for thresh in (0, 1, 2, 4, 9, 30, 1e9):
                expected, changed, tie = _reference_port(mask, thresh, mode)
                out, was_changed = remove_small_regions(mask, thresh, mode)
                assert was_changed is changed
                if not tie:
                    np.testing.assert_array_equal(out, expected)
                    compared += 1
                else:  # one of the largest islands, and nothing else
                    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
                    kept = np.unique(labels[out])
                    assert kept.size == 1 and kept[0] > 0
                    assert out.sum() == expected.sum()
                    np.testing.assert_array_equal(out, labels == kept[0])
    assert compared > 1500


def test_only_small_regions_change():
    """Holes mode only adds pixels, islands mode only removes them."""
    rng = np.random.default_rng(3)
    mask = ndimage.gaussian_filter(rng.random((40, 50)), 1.0) > 0.5
    filled, _ = remove_small_regions(mask, 10, "holes")
    assert np.all(filled >= mask)
    cleaned, _ = remove_small_regions(mask, 10, "islands")
    assert np.all(cleaned <= mask)


@pytest.mark.parametrize("mode", ["hole", "Islands", "", None])
def test_bad_mode_raises(mode):
    with pytest.raises(ValueError, match=f"mode must be 'holes' or 'islands', got {mode!r}"):
        remove_small_regions(HOLE, 2, mode)


@pytest.mark.parametrize("area_thresh", [-1, -0.5])
def test_negative_threshold_raises(area_thresh):
    with pytest.raises(ValueError, match=f"area_thresh must be >= 0, got {area_thresh}"):
        remove_small_regions(HOLE, area_thresh, "holes")


def test_non_bool_mask_raises():
    with pytest.raises(TypeError, match="mask must be a bool array, got dtype uint8"):
        remove_small_regions(HOLE.astype(np.uint8), 2, "holes")


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4)])
def test_wrong_ndim_raises(shape):
    with pytest.raises(ValueError, match=r"mask must have shape \(H, W\), got shape"):
        remove_small_regions(np.zeros(shape, bool), 2, "islands")
