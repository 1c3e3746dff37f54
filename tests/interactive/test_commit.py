"""PromptSession: committing masks into labels, and undo."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.interactive import PromptSession

# --------------------------------------------------------------------------- commit / undo


def test_commit_and_undo(pred):
    s = PromptSession(pred, np.zeros((4, 5)))
    labels = np.zeros((4, 5), dtype=np.uint32)
    a = np.zeros((4, 5), dtype=bool)
    a[:2, :3] = True
    b = np.zeros((4, 5), dtype=bool)
    b[1:3, 2:5] = True
    states = [labels.copy()]
    assert s.commit(labels, a) == 1
    states.append(labels.copy())
    assert s.commit(labels, b) == 2
    states.append(labels.copy())
    # only background was painted: the overlap keeps id 1
    assert labels[1, 2] == 1 and labels[2, 4] == 2 and (labels[~(a | b)] == 0).all()
    assert s.commit(labels, b, overwrite=True) == 3
    assert (labels[b] == 3).all() and labels[0, 0] == 1
    assert s.commit(labels, a, label_id=7, overwrite=True) == 7
    assert s.commit(labels, ~(a | b)) == 8
    assert s.can_undo
    assert s.undo() == [8] and s.undo() == [7] and s.undo() == [3]
    np.testing.assert_array_equal(labels, states[2])
    assert s.undo() == [2]
    np.testing.assert_array_equal(labels, states[1])
    assert s.undo() == [1]
    np.testing.assert_array_equal(labels, states[0])
    assert s.undo() is None and not s.can_undo


def test_commit_into_stack_view_and_undo_into_copy(pred):
    s = PromptSession(pred, np.zeros((3, 4, 5)))
    stack = np.zeros((3, 4, 5), dtype=np.int16)
    stack[1, 0, 0] = 5
    after = np.full((4, 5), 6, dtype=np.int16)
    after[0, 0] = 5
    mask = np.ones((4, 5), dtype=bool)
    assert s.commit(stack[1], mask) == 6  # max of the plane + 1
    np.testing.assert_array_equal(stack[1], after)
    assert stack[0].max() == 0 and stack[2].max() == 0
    copy = stack[1].copy()
    assert s.undo(copy) == [6]
    assert copy[0, 0] == 5 and copy.sum() == 5
    np.testing.assert_array_equal(stack[1], after)
    s.commit(stack[1], mask, overwrite=True, label_id=2)
    assert (stack[1] == 2).all()
    with pytest.raises(ValueError, match=r"labels must be an array of shape \(4, 5\)"):
        s.undo(np.zeros((2, 2), dtype=np.int16))
    assert s.undo() == [2]  # the failed undo left the step
    np.testing.assert_array_equal(stack[1], after)


def test_a_new_session_adopts_the_undo_steps(pred):
    old = PromptSession(pred, np.zeros((4, 5)))
    labels = np.zeros((4, 5), dtype=np.uint32)
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:3] = True
    assert old.commit(labels, mask) == 1
    new = PromptSession(pred, np.ones((4, 5)))  # e.g. the same image with another model
    assert not new.can_undo
    new.adopt_undo(old)
    assert new.can_undo and new.undo() == [1] and labels.max() == 0
    with pytest.raises(ValueError, match=r"planes \(4, 5\) into a session of planes \(2, 2\)"):
        PromptSession(pred, np.zeros((2, 2))).adopt_undo(old)


def test_undo_depth_is_bounded(pred, monkeypatch):
    s = PromptSession(pred, np.zeros((2, 2)))
    assert s.max_undo == 64
    monkeypatch.setattr(s, "max_undo", 2)
    labels = np.zeros((2, 2), dtype=np.uint8)
    for i in range(4):
        m = np.zeros((2, 2), dtype=bool)
        m.flat[i] = True
        s.commit(labels, m)
    assert s.undo() == [4] and s.undo() == [3] and s.undo() is None
    np.testing.assert_array_equal(labels, [[1, 2], [0, 0]])


@pytest.mark.parametrize(
    ("labels", "mask", "kwargs", "error", "match"),
    [
        ([[0, 0], [0, 0]], "ones", {}, TypeError, "labels must be a numpy array"),
        (np.zeros((2, 2), float), "ones", {}, ValueError, "labels must have an integer dtype"),
        (np.zeros((2, 2), bool), "ones", {}, ValueError, "labels must have an integer dtype"),
        (np.zeros((2, 3), np.uint8), "ones", {}, ValueError, r"labels must have shape \(2, 2\)"),
        (np.zeros((2, 2), np.uint8), np.ones((2, 3), bool), {}, ValueError, "mask must have shape"),
        (np.zeros((2, 2), np.uint8), np.ones((2, 2)), {}, TypeError, "mask must be a bool array"),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2), bool), {}, ValueError, "mask is empty"),
        (np.ones((2, 2), np.uint8), "ones", {}, ValueError, "overwrite=True"),
        (np.full((2, 2), 255, np.uint8), "ones", {}, ValueError, "largest uint8 id"),
        (np.zeros((2, 2), np.uint8), "ones", {"label_id": 0}, ValueError, r"in \[1, 255\]"),
        (np.zeros((2, 2), np.uint8), "ones", {"label_id": 256}, ValueError, "label_id must be"),
        (np.zeros((2, 2), np.uint8), "ones", {"label_id": 1.0}, TypeError, "label_id must be"),
        (np.zeros((2, 2), np.uint8), "ones", {"label_id": True}, TypeError, "label_id must be"),
    ],
)
def test_commit_errors(pred, labels, mask, kwargs, error, match):
    s = PromptSession(pred, np.zeros((2, 2)))
    if isinstance(mask, str):
        mask = np.ones((2, 2), dtype=bool)
    with pytest.raises(error, match=match):
        s.commit(labels, mask, **kwargs)
    assert not s.can_undo


def test_commit_min_free_refuses_masks_mostly_inside_objects(pred):
    s = PromptSession(pred, np.zeros((4, 4)))
    labels = np.zeros((4, 4), np.uint8)
    labels[:2, :3] = 7  # 6 of the mask's 8 pixels labelled
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    before = labels.copy()
    with pytest.raises(ValueError, match=r"mostly inside existing objects: 2 of its 8 pixels"):
        s.commit(labels, mask, min_free=0.5)
    np.testing.assert_array_equal(labels, before)
    assert not s.can_undo
    with pytest.raises(ValueError, match=r"masks\[1\] lies mostly inside"):
        s.commit_many(labels, [np.eye(4, dtype=bool), mask], min_free=0.3)
    with pytest.raises(ValueError, match=r"min_free must be in \[0, 1\]"):
        s.commit(labels, mask, min_free=1.5)
    assert s.commit(labels, mask, min_free=0.25) == 8  # 2 of 8 free: enough
    assert (labels == 8).sum() == 2
    assert s.commit(labels, mask, overwrite=True, min_free=1.0) == 9  # overwrite: no rule
    assert (labels[:2] == 9).all()


def test_commit_read_only(pred):
    s = PromptSession(pred, np.zeros((2, 2)))
    labels = np.zeros((2, 2), np.uint8)
    labels.flags.writeable = False
    with pytest.raises(ValueError, match="labels is read-only"):
        s.commit(labels, np.ones((2, 2), bool))


def test_commit_many_is_one_undo_step(pred):
    s = PromptSession(pred, np.zeros((4, 5)))
    labels = np.zeros((4, 5), dtype=np.uint16)
    labels[0, 0] = 3
    a = np.zeros((4, 5), dtype=bool)
    a[:2, :2] = True
    b = np.zeros((4, 5), dtype=bool)
    b[1:, 1:] = True
    before = labels.copy()
    assert s.commit_many(labels, [a, b]) == [4, 5]
    assert labels[0, 0] == 3 and labels[1, 1] == 4  # the existing object and the first mask
    assert labels[3, 4] == 5 and (labels[~(a | b)] == 0).all()
    assert s.commit_many(labels, np.stack([b, a]), label_ids=[9, 8], overwrite=True) == [9, 8]
    assert labels[1, 1] == 9 and labels[0, 0] == 8
    assert s.undo() == [9, 8] and s.undo() == [4, 5]
    np.testing.assert_array_equal(labels, before)


@pytest.mark.parametrize(
    ("masks", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "masks is empty"),
        ("one", {}, ValueError, r"use commit\(labels, \[mask\]\)"),
        ("pair", {"label_ids": [5]}, ValueError, "label_ids must hold 2 distinct ids"),
        ("pair", {"label_ids": [5, 5]}, ValueError, "label_ids must hold 2 distinct ids"),
        ("pair", {"label_ids": [5, 1.0]}, TypeError, "label_id must be an int"),
        ("same", {}, ValueError, r"masks\[1\] covers only pixels that already have a label"),
        ("pair_empty", {}, ValueError, r"masks\[1\] is empty"),
        ("full", {}, ValueError, "2 new id"),
    ],
)
def test_commit_many_errors(pred, masks, kwargs, error, match):
    s = PromptSession(pred, np.zeros((2, 2)))
    labels = np.zeros((2, 2), np.uint8)
    one = np.array([[True, False], [False, False]])
    other = np.array([[False, True], [False, False]])
    if isinstance(masks, str):
        masks = {
            "one": one, "pair": [one, other], "same": [one, one],
            "pair_empty": [one, np.zeros((2, 2), bool)], "full": [one, other],
        }[masks]  # fmt: skip
    if kwargs == {} and match == "2 new id":
        labels[1, 1] = 254
    before = labels.copy()
    with pytest.raises(error, match=match):
        s.commit_many(labels, masks, **kwargs)
    np.testing.assert_array_equal(labels, before)  # nothing painted
    assert not s.can_undo


def test_max_undo_errors_and_zero(pred):
    s = PromptSession(pred, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="max_undo must be >= 0"):
        s.max_undo = -1
    s.max_undo = 0
    labels = np.zeros((2, 2), np.uint8)
    assert s.commit(labels, np.ones((2, 2), bool)) == 1
    assert not s.can_undo and s.undo() is None
