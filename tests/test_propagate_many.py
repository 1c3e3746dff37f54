"""Multi-object propagation: every object of a plane through z (or t) at once, one decoder
call per plane (issue 20), against single-object propagation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.draw import disk

from napari_mobilesam.interactive import Prediction, PromptSession, Propagated, PropagationRule
from napari_mobilesam.interactive.propagate import follow, mask_prompt
from napari_mobilesam.interactive.propagate_many import follow_many, paint_order
from napari_mobilesam.predictor import Predictor

H, W = 60, 80
CENTRES = {3: (20, 15), 5: (20, 45), 9: (45, 62)}  # label id -> disk centre (row, col)
ANY = {"min_score": -math.inf, "min_area_ratio": 1e-6}  # accept every non-empty mask


def _disk(centre, radius=8, shift=0) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[disk((centre[0], centre[1] + shift), radius, shape=(H, W))] = True
    return mask


def _label_plane(dtype=np.uint16) -> np.ndarray:
    labels = np.zeros((H, W), dtype=dtype)
    for i, centre in CENTRES.items():
        labels[_disk(centre)] = i
    return labels


def _stack(n: int = 6) -> np.ndarray:
    """(n, H, W) uint16: three bright disks drifting right 1 px per plane."""
    planes = []
    for z in range(n):
        img = np.full((H, W), 200, np.uint16)
        for centre in CENTRES.values():
            img[_disk(centre, shift=z)] = 3000 + 100 * z
        planes.append(img)
    return np.stack(planes)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core machine two threads run ~50x slower here
    (conftest restores the count after each test)."""
    torch.set_num_threads(1)


@pytest.fixture
def pred(tiny_model):
    return Predictor(tiny_model)


# --------------------------------------------------------------------------- scripted


class Script:
    """``segment`` / ``segment_batch`` answering from a script: object k (found by the
    column of its prompt point) on plane z gets ``(area, score)`` = script[k][z]; the
    mask is object k's disk cut to ``area`` pixels (the disk itself when area is None)."""

    def __init__(self, script: dict[int, dict[int, tuple[int | None, float]]]):
        self.script = script
        self.calls: list[tuple[tuple[int, ...], int, object]] = []  # (index, B, mask_inputs)

    def _object(self, point_rc) -> int:
        return min(CENTRES, key=lambda i: abs(CENTRES[i][1] - point_rc[1]))

    def _one(self, index, point_rc) -> Prediction:
        k = self._object(point_rc)
        area, score = self.script.get(k, {}).get(index[0], (None, 0.9))
        mask = _disk(CENTRES[k])
        if area is not None:
            keep = np.flatnonzero(mask)[:area]
            mask = np.zeros((H, W), dtype=bool)
            mask.flat[keep] = True
        low_res = np.full((1, 32, 32), float(len(self.calls)), np.float32)
        return Prediction(mask[None], np.array([score], np.float32), low_res, 0)

    def batch(self, index, points_rc, boxes_rc, mask_inputs):
        assert points_rc.shape == (len(boxes_rc), 1, 2) and boxes_rc.shape[1] == 4
        self.calls.append((index, len(points_rc), mask_inputs))
        return [self._one(index, p[0]) for p in points_rc]

    def single(self, index, points_rc, box_rc, mask_input):
        return self.batch(index, points_rc[None], box_rc[None], mask_input)[0]


def _masks() -> dict[int, np.ndarray]:
    return {i: _disk(c) for i, c in CENTRES.items()}


AREA = int(_disk((20, 15)).sum())
SCRIPT = {
    3: {4: (None, 0.5)},  # score too low on plane 4: planes 3 only (upwards)
    5: {},  # goes on to the last plane
    9: {3: (AREA // 4, 0.9)},  # shrinks too much on plane 3: nothing upwards
}


def test_follow_many_equals_follow_per_object_and_stops_each_on_its_own():
    rule = PropagationRule(direction=1)
    script = Script(SCRIPT)
    seen = []
    got = follow_many(
        (2,), _masks(), 0, (6,), script.batch, rule, progress=lambda i, s: seen.append((i, s))
    )
    assert {k: list(v) for k, v in got.items()} == {
        3: [(3,)],
        5: [(3,), (4,), (5,)],
        9: [],
    }
    for obj, mask in _masks().items():
        want = follow((2,), mask, 0, (6,), Script(SCRIPT).single, rule)
        assert list(want) == list(got[obj])
        for idx in want:
            np.testing.assert_array_equal(want[idx], got[obj][idx])
    # one decoder call per plane, with the objects still going
    assert [(c[0], c[1]) for c in script.calls] == [((3,), 3), ((4,), 2), ((5,), 1)]
    assert [(i, sorted(s)) for i, s in seen] == [((3,), [3, 5]), ((4,), [5]), ((5,), [5])]
    assert seen[0][1][3] == pytest.approx(0.9)


def test_follow_many_both_directions_limits_and_prompts():
    script = Script({3: {1: (0, 0.9)}, 5: {}, 9: {}})  # object 3: empty on plane 1
    got = follow_many((2,), _masks(), 0, (6,), script.batch, PropagationRule(direction=0))
    assert list(got[3]) == [(3,), (4,), (5,)]  # higher first, then lower
    assert list(got[5]) == [(3,), (4,), (5,), (1,), (0,)]
    # each direction starts again from the start plane with every object
    assert [(c[0], c[1]) for c in script.calls] == [
        ((3,), 3), ((4,), 3), ((5,), 3), ((1,), 3), ((0,), 2),
    ]  # fmt: skip
    got = follow_many((2,), _masks(), 0, (6,), Script({}).batch, PropagationRule(max_planes=1))
    assert all(list(v) == [(3,), (1,)] for v in got.values())
    assert follow_many((5,), _masks(), 0, (6,), script.batch, PropagationRule(1)) == {
        3: {}, 5: {}, 9: {},
    }  # fmt: skip
    assert follow_many((2,), {}, 0, (6,), script.batch, PropagationRule()) == {}


def test_follow_many_mask_input_option():
    script = Script({})
    follow_many((2,), _masks(), 0, (6,), script.batch, PropagationRule(1, use_mask_input=True))
    inputs = [c[2] for c in script.calls]
    assert inputs[0] is None  # the first plane has no logits yet
    assert inputs[1].shape == (3, 1, 32, 32) and (inputs[1] == 1).all()  # from call 1
    assert (inputs[2] == 2).all()
    script = Script({})
    follow_many((2,), _masks(), 0, (6,), script.batch, PropagationRule(1))
    assert all(c[2] is None for c in script.calls)


def test_follow_many_stop_keeps_the_planes_done():
    stops = iter([False, False, True, False, True])
    got = follow_many(
        (2,), _masks(), 0, (6,), Script({}).batch, PropagationRule(0),
        should_stop=lambda: next(stops),
    )  # fmt: skip
    assert all(list(v) == [(3,), (4,), (1,)] for v in got.values())


def test_paint_order_higher_score_keeps_the_overlap():
    labels = np.zeros((H, W), np.uint16)
    a, b = _disk((30, 30), 10), _disk((30, 36), 10)
    assert paint_order(labels, [a, b], [0.8, 0.9], overwrite=False) == [1, 0]
    assert paint_order(labels, [a, b], [0.9, 0.9], overwrite=False) == [0, 1]  # ties: order
    assert paint_order(labels, [a, a], [0.9, 0.8], overwrite=False) == [0]  # nothing left
    labels[a] = 7  # an object already there
    assert paint_order(labels, [a, b], [0.9, 0.8], overwrite=False) == [1]
    assert paint_order(labels, [a, b], [0.9, 0.8], overwrite=True) == [0, 1]


def test_propagated_planes():
    m = np.ones((2, 2), bool)
    p = Propagated({1: {(3,): m, (1,): m}, 2: {(3,): m, (4,): m}, 5: {}})
    assert p.planes() == {(3,): [1, 2], (1,): [1], (4,): [2]}


# --------------------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def session(tiny_state_dict):
    """A session on the stack, every plane embedded (propagation keeps no other state)."""
    from napari_mobilesam.build import build_sam

    from .conftest import TINY_CONFIG

    model = build_sam(TINY_CONFIG)
    model.load_state_dict(tiny_state_dict)
    s = PromptSession(Predictor(model.eval()), _stack(), cache_key="disks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s.precompute()
    finally:
        torch.set_num_threads(threads)
    return s


def test_predict_batch_agrees_with_predict_for_propagation_prompts(pred):
    """The prompt form of propagation (a point and a box, with and without mask input):
    a batch of one is bitwise the one-prompt call; larger batches agree to 1e-5."""
    pred.set_image(_stack()[2])
    prompts = [mask_prompt(m) for m in _masks().values()]
    points_xy = np.stack([p[::-1] for _, p in prompts])[:, None]
    boxes_xyxy = np.stack([b[[1, 0, 3, 2]] for b, _ in prompts])
    labels = np.ones((3, 1), np.int64)
    masks_in = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    for mask_input in (None, masks_in):
        batch = pred.predict_batch(points_xy, labels, boxes_xyxy, mask_input, False, True)
        for j in range(3):
            m_in = None if mask_input is None else mask_input[j]
            one = pred.predict(points_xy[j], labels[j], boxes_xyxy[j], m_in, False, True)
            first = pred.predict_batch(
                points_xy[j : j + 1], labels[j : j + 1], boxes_xyxy[j : j + 1],
                None if mask_input is None else mask_input[j : j + 1], False, True,
            )  # fmt: skip
            for got1, got, want in zip(first, batch, one, strict=True):
                np.testing.assert_array_equal(got1[0], want)
                np.testing.assert_allclose(got[j], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_mask_input", [False, True])
def test_propagate_all_equals_propagate_per_object(session, use_mask_input):
    labels = _label_plane()
    kw = {**ANY, "use_mask_input": use_mask_input}
    got = session.propagate_all((2,), labels, 0, **kw)
    assert set(got.masks) == set(CENTRES)
    assert any(got.masks.values())
    for i in CENTRES:
        want = session.propagate((2,), labels == i, 0, **kw)
        # masks identical here; see propagate_many's notes on batching
        assert list(got.masks[i]) == list(want)
        for idx, mask in want.items():
            np.testing.assert_array_equal(got.masks[i][idx], mask)
        assert list(got.scores[i]) == list(want)
        assert all(isinstance(s, float) for s in got.scores[i].values())
        stability = {}
        session.propagate((2,), labels == i, 0, stability=stability, **kw)
        assert got.stability[i] == pytest.approx(stability)  # the same planes' stability
    assert session.current is None  # propagation never changes the current plane


def test_propagate_all_ids_progress_and_stop(session):
    labels = _label_plane()
    seen = []
    got = session.propagate_all(
        (2,), labels, 0, ids=[9, 3], direction=1, progress=lambda i, s: seen.append((i, s)), **ANY
    )
    assert list(got.masks) == [9, 3]
    assert [i for i, _ in seen] == [(3,), (4,), (5,)][: len(seen)] and seen
    for idx, scores in seen:
        assert scores == {i: got.scores[i][idx] for i in scores}
    stops = iter([False, True, True])
    got = session.propagate_all((2,), labels, 0, should_stop=lambda: next(stops), **ANY)
    assert {tuple(v) for v in got.masks.values()} <= {((3,),), ()}
    # a score nobody reaches: every object stops at once
    got = session.propagate_all((2,), labels, 0, min_score=1.01)
    assert got.masks == {3: {}, 5: {}, 9: {}} and got.planes() == {}


@pytest.mark.parametrize(
    ("labels", "kwargs", "error", "match"),
    [
        (np.zeros((H, W), np.float32), {}, TypeError, "labels must be an integer numpy array"),
        ([[1, 2]], {}, TypeError, "labels must be an integer numpy array"),
        (np.zeros((4, 4), np.uint16), {}, ValueError, r"labels must be one label plane of shape"),
        (np.zeros((H, W), np.uint16), {}, ValueError, "labels has no object"),
        (
            "plane",
            {"ids": [3, 4]},
            ValueError,
            r"ids must name objects of labels; not in it: \[4\]",
        ),
        ("plane", {"ids": []}, ValueError, "not in it: none given"),
        ("plane", {"ids": [3.5]}, TypeError, "ids must be an int"),
        ("plane", {"direction": 2}, ValueError, "direction must be 1, -1 or 0"),
        ("plane", {"axis": 1}, ValueError, "axis must index a plane axis"),
        ("plane", {"start": (9,)}, ValueError, "plane index within"),
    ],
)
def test_propagate_all_errors(pred, labels, kwargs, error, match):
    s = PromptSession(pred, _stack())
    labels = _label_plane() if isinstance(labels, str) else labels
    start, axis = kwargs.pop("start", (2,)), kwargs.pop("axis", 0)
    with pytest.raises(error, match=match):
        s.propagate_all(start, labels, axis, **kwargs)
    assert s.current is None and not any(s.is_cached((z,)) for z in range(6))


# --------------------------------------------------------------------------- commit


def _propagated() -> Propagated:
    """Objects 3 and 5 on planes 3 and 1; on plane 3 they overlap, 5 scoring higher."""
    a, b = _disk((30, 30), 10), _disk((30, 36), 10)
    return Propagated(
        {3: {(3,): a, (1,): a}, 5: {(3,): b, (1,): _disk((10, 70), 5)}},
        {3: {(3,): 0.8, (1,): 0.9}, 5: {(3,): 0.95, (1,): 0.9}},
    )


def test_commit_propagated_own_ids_overlap_and_undo(pred):
    s = PromptSession(pred, _stack())
    stack = np.zeros((6, H, W), np.uint16)
    stack[1][_disk((10, 70), 5)] = 8  # object 5's plane-1 mask lies inside object 8
    p = _propagated()
    painted = s.commit_propagated(stack, p)
    assert painted == {(3,): [5, 3], (1,): [3]}  # plane 1: object 5 skipped
    b = p.masks[5][(3,)]
    np.testing.assert_array_equal(stack[3] == 5, b)  # the higher score keeps the overlap
    np.testing.assert_array_equal(stack[3] == 3, p.masks[3][(3,)] & ~b)
    np.testing.assert_array_equal(stack[1] == 3, p.masks[3][(1,)])
    assert (stack[1] == 8).sum() == _disk((10, 70), 5).sum()
    assert s.undo() == [3] and not (stack[1] == 3).any()  # one undo step per plane
    assert s.undo() == [5, 3] and not stack[3].any()
    assert s.undo() is None

    painted = s.commit_propagated(stack, p, overwrite=True)
    assert painted == {(3,): [5, 3], (1,): [3, 5]}
    assert not (stack[1] == 8).any()


@pytest.mark.parametrize(
    ("labels", "propagated", "error", "match"),
    [
        (np.zeros((6, H, W), np.uint16), {3: {}}, TypeError, "propagated must be what"),
        (np.zeros((H, W), np.uint16), "ok", ValueError, r"labels must be the label stack.*\(6, 60"),
        ([[0]], "ok", ValueError, "labels must be the label stack"),
        (np.zeros((6, H, W), np.uint8), "big", ValueError, r"label_id must be in \[1, 255\]"),
    ],
)
def test_commit_propagated_errors(pred, labels, propagated, error, match):
    s = PromptSession(pred, _stack())
    if propagated == "ok":
        propagated = _propagated()
    elif propagated == "big":
        m = _disk((30, 30))
        propagated = Propagated({300: {(1,): m}}, {300: {(1,): 0.9}})
    with pytest.raises(error, match=match):
        s.commit_propagated(labels, propagated)
    assert not s.can_undo
    if isinstance(labels, np.ndarray):
        assert not labels.any()


# --------------------------------------------------------------------------- benchmark


def test_bench_propagate_many_runs(tiny_model):
    """benchmarks/bench_propagate_many.py at a tiny size (its numbers are not checked)."""
    from benchmarks import bench_propagate_many

    result = bench_propagate_many.run(
        planes=3, size=64, n_objects=2, max_planes=1, repeats=1, model=tiny_model
    )
    assert 1 <= result["objects"] <= 2  # the cells on the middle plane, at most 2
    assert set(result["median_s"]) == {
        "cold, 1 object", "cold, N objects", "warm, 1 object", "warm, N objects",
        "warm, N one by one",
    }  # fmt: skip
    # the batched walk finds what one object at a time finds
    assert (
        result["object_planes"]["warm, N objects"] == result["object_planes"]["warm, N one by one"]
    )
    assert result["ratio_cold"] > 0 and "target < 3x" in bench_propagate_many.report(result)
