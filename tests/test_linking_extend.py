"""Extending linked 3D objects into planes where they were missed (``linking.extend``)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.linking.extend import BoxPrompter, extend_objects, extend_stack

from .extend_support import oracle


def _truth(n_z=6, shape=(40, 60)):
    """Two true cells: id 1 in planes 0-5 (a disk whose radius varies), id 2 in planes
    1-3, apart from each other."""
    truth = np.zeros((n_z, *shape), np.uint16)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for z in range(n_z):
        r = 5 + min(z, n_z - 1 - z) * 2
        truth[z][(yy - 20) ** 2 + (xx - 18) ** 2 <= r * r] = 1
        if 1 <= z <= 3:
            truth[z][(yy - 20) ** 2 + (xx - 46) ** 2 <= 36] = 2
    return truth


def test_missing_ends_and_gaps_are_filled_from_the_neighbouring_planes():
    truth = _truth()
    found = truth.copy()
    found[[0, 1, 4, 5]] = np.where(found[[0, 1, 4, 5]] == 1, 0, found[[0, 1, 4, 5]])
    found[2][found[2] == 2] = 0  # id 2: planes 1 and 3, a gap at 2
    calls = []
    ticks = []
    ext = extend_objects(found, oracle(truth, calls=calls), progress=ticks.append)
    np.testing.assert_array_equal(ext.labels, truth)
    assert found[0].max() == 0  # the input is not changed
    # forward: 2 <- 1 (id 2's gap), 4 <- 3, 5 <- 4; backward: 1 <- 2, 0 <- 1
    assert [(z, i) for z, i, _, _ in ext.added] == [(2, 2), (4, 1), (5, 1), (1, 1), (0, 1)]
    assert all(area == int((truth[z] == i).sum()) for z, i, area, _ in ext.added)
    assert all(score == 0.9 for *_, score in ext.added)
    assert ext.planes_prompted == len(calls) == 5 and len(ticks) == 2 * (len(truth) - 1)
    # each prompt: the inclusive XYXY box of the object's section in the source plane
    z, boxes = calls[0]
    assert z == 2  # the first plane prompted: id 2's gap
    rows, cols = np.nonzero(found[1] == 2)
    np.testing.assert_array_equal(boxes, [[cols.min(), rows.min(), cols.max(), rows.max()]])


def test_extend_stack_reads_and_writes_one_plane_at_a_time():
    """The streaming form: planes read as fresh copies (as from disk), each written back
    once per sweep that added to it, at most two held; the same result as in memory."""
    truth = _truth()
    found = truth.copy()
    found[[0, 1, 4, 5]] = np.where(found[[0, 1, 4, 5]] == 1, 0, found[[0, 1, 4, 5]])
    disk = {z: found[z].copy() for z in range(len(found))}
    reads, writes = [], []

    def read(z):
        reads.append(z)
        return disk[z].copy()

    def write(z, plane, added):
        assert added and all(row[0] == z for row in added)
        writes.append(z)
        disk[z] = plane.copy()

    added, prompted = extend_stack(len(found), read, write, oracle(truth))
    np.testing.assert_array_equal(np.stack([disk[z] for z in range(len(found))]), truth)
    expected = extend_objects(found, oracle(truth))
    assert added == expected.added and prompted == expected.planes_prompted
    assert writes == [4, 5, 1, 0]  # forward: 4, 5; backward: 1, 0
    assert reads == [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0]  # each plane once per sweep
    assert extend_stack(1, read, write, oracle(truth)) == ([], 0)


def test_objects_end_where_the_model_does_not_find_them():
    truth = _truth()
    found = truth.copy()
    found[[0, 5]] = 0
    # a low score keeps nothing
    ext = extend_objects(found, oracle(truth, score=0.5))
    np.testing.assert_array_equal(ext.labels, found)
    assert ext.added == []
    ext = extend_objects(found, oracle(truth, score=0.5), min_score=0.4)
    np.testing.assert_array_equal(ext.labels, truth)

    # an answer unlike the section it came from (a neighbour) is not the same cell
    def elsewhere(z, boxes):
        mask = np.zeros((len(boxes), *truth.shape[1:]), bool)
        mask[:, 30:, 50:] = True
        return mask, np.ones(len(boxes))

    assert extend_objects(found, elsewhere).added == []
    assert len(extend_objects(found, elsewhere, min_iou=0.0).added) > 0


def test_kept_masks_paint_only_unlabelled_pixels():
    truth = _truth()
    found = truth.copy()
    found[4][found[4] == 1] = 0
    found[4, 10:30, 5:12] = 7  # another object covers part of cell 1's section in plane 4
    ext = extend_objects(found, oracle(truth))
    assert (ext.labels[4, 10:30, 5:12] == 7).all()
    added = (ext.labels[4] == 1) & (found[4] == 0)
    assert added.sum() == ((truth[4] == 1) & (found[4] != 7)).sum()
    # most of the mask on other objects: not kept
    found[4][truth[4] == 1] = 7
    assert (4, 1) not in [(z, i) for z, i, _, _ in extend_objects(found, oracle(truth)).added]


def test_bad_input_is_named():
    predict = oracle(_truth())
    with pytest.raises(ValueError, match=r"\(Z, H, W\) integer array, got float64"):
        extend_objects(np.zeros((2, 4, 4)), predict)
    with pytest.raises(ValueError, match=r"\(Z, H, W\) integer array"):
        extend_objects(np.zeros((4, 4), int), predict)
    for name in ("min_score", "min_iou", "min_free"):
        with pytest.raises(ValueError, match=f"{name} must be in"):
            extend_objects(np.zeros((2, 4, 4), int), predict, **{name: 1.5})
    labels = np.zeros((2, 8, 8), np.int32)
    labels[0, 2:5, 2:5] = 1

    def wrong(z, boxes):
        return np.zeros((len(boxes), 4, 4), bool), np.ones(len(boxes))

    with pytest.raises(ValueError, match=r"predict\(1, boxes\) gave masks of shape"):
        extend_objects(labels, wrong)


def test_box_prompter_embeds_each_plane_once_per_run_of_prompts():
    class Fake:
        def __init__(self):
            self.images, self.batches = [], []

        def set_image(self, image):
            self.images.append(int(image[0, 0, 0]))

        def predict_batch(self, boxes, multimask_output):
            assert multimask_output is False
            self.batches.append(len(boxes))
            k = len(boxes)
            return np.ones((k, 1, 3, 4), bool), np.full((k, 1), 0.7), None

    fake = Fake()
    planes = [np.full((3, 4, 3), z, np.uint8) for z in range(3)]
    prompter = BoxPrompter(fake, planes)
    masks, scores = prompter(1, np.zeros((2, 4)))
    assert masks.shape == (2, 3, 4) and scores.tolist() == [0.7, 0.7]
    prompter(1, np.zeros((1, 4)))
    prompter(2, np.zeros((1, 4)))
    assert fake.images == [1, 2] and prompter.embedded == 2 and fake.batches == [2, 1, 1]
    read = []
    lazy = BoxPrompter(Fake(), lambda z: read.append(z) or planes[z])
    lazy(0, np.zeros((1, 4)))
    assert read == [0]


def test_box_prompter_with_a_model(tiny_predictor):
    labels = np.zeros((2, 32, 40), np.int32)
    labels[0, 8:20, 10:25] = 1
    planes = [np.zeros((32, 40, 3), np.uint8)] * 2
    prompter = BoxPrompter(tiny_predictor, planes)
    masks, scores = prompter(1, np.array([[10.0, 8.0, 24.0, 19.0]]))
    assert masks.shape == (1, 32, 40) and masks.dtype == bool and scores.shape == (1,)
    ext = extend_objects(labels, prompter, min_score=0.0, min_iou=0.0, min_free=0.0)
    assert ext.planes_prompted == 1 and prompter.embedded == 1
